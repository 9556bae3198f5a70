"""`python -m mplug_jax.cli ARGS` = `mplug-jax ARGS`."""
import sys

from mplug_jax.cli import main

sys.exit(main())
