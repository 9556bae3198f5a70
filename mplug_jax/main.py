"""Command-line entry point of the training loop.

    python -m mplug_jax.main --config=configs/pretrain.py:tiny --workdir=DIR [--config.x=y ...]

`--config` is an ml_collections config file with its argument after ':'; every field can be
overridden with `--config.a.b=value`. The run resumes automatically from DIR's checkpoints.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Directory of JAX's persistent compilation cache ('off' "
    "disables it); default $MPLUG_JAX_CACHE_DIR, else ~/.cache/mplug_jax/jax_cache.")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint stage at INFO
    from mplug_jax import compilation_cache
    try:
        compilation_cache.setup(_CACHE.value)  # before anything compiles
    except ValueError as err:
        sys.exit(f"error: {err}")
    from mplug_jax import distributed
    distributed.maybe_initialize()  # no-op for single-process runs
    from mplug_jax import trainer
    result = trainer.run(_CONFIG.value, _WORKDIR.value)
    if result["stopped"] != "done":
        sys.exit(143)  # 128 + SIGTERM: the scheduler sees the preemption


def cli(argv: list[str] | None = None) -> None:
    """Parse absl flags from `argv` (default sys.argv) and run; used by `mplug-jax train`."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, argv=argv)


if __name__ == "__main__":
    cli()
