"""mplug-jax: mPLUG (cross-modal skip-connections) and mPLUG-2 in JAX/Flax."""

__version__ = "0.1.0"
