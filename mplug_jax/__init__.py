"""mplug-jax: mPLUG (Li et al., EMNLP 2022: cross-modal skip-connections) in JAX/Flax.

mPLUG-2 is planned, not implemented: `mplug_jax.data` reads its annotation formats (video QA
and captioning included), but there is no mPLUG-2 model, task or checkpoint import yet.
"""

__version__ = "0.1.0"
