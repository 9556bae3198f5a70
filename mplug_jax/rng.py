"""The random-number generator of a training run, a config choice (`config.rng_impl`).

JAX has several PRNG implementations behind one key API:
  threefry    counter-based Threefry-2x32 (JAX's default): the same numbers whatever the
              sharding (`jax_threefry_partitionable`), the most compute per random bit.
  rbg         XLA's RngBitGenerator seeded by Threefry: cheaper bits on GPU / TPU.
  unsafe_rbg  RngBitGenerator also for split / fold_in: cheapest, weaker key derivation.
The run's base key lives in the train state as raw key data (uint32[2] for threefry, [4] for
the two rbg kinds) so checkpoints stay plain arrays; the step wraps it with the run's impl.
"""
from __future__ import annotations

import jax

IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}
DEFAULT = "threefry"


def impl_name(config) -> str:
    """`config.rng_impl` checked ('threefry' when the field is absent: older workdirs)."""
    name = config.get("rng_impl", DEFAULT) if hasattr(config, "get") else DEFAULT
    return check(name)


def check(name: str) -> str:
    """`name` if it is a known implementation, else a one-line ValueError."""
    if name not in IMPLS:
        raise ValueError(f"unknown rng_impl {name!r}; valid: {', '.join(IMPLS)}")
    return name


def seed_key(seed: int, name: str = DEFAULT) -> jax.Array:
    """A typed key of implementation `name` from an integer seed."""
    return jax.random.key(seed, impl=IMPLS[check(name)])


def wrap(data: jax.Array, name: str = DEFAULT) -> jax.Array:
    """Raw key data (uint32[2] or [4], as stored in the train state) -> typed key of `name`."""
    return jax.random.wrap_key_data(data, impl=IMPLS[check(name)])


def key_data_shape(name: str = DEFAULT) -> tuple:
    """Shape of one key's raw data for `name` (threefry (2,), rbg kinds (4,))."""
    return tuple(jax.eval_shape(lambda: jax.random.key_data(seed_key(0, name))).shape)


def check_resume(previous, config, where) -> None:
    """One-line ValueError when `config` would resume a run (`previous`: that run's config)
    made with another implementation: its stored base key has another shape and meaning."""
    old, new = impl_name(previous), impl_name(config)
    if old != new:
        raise ValueError(f"{where} was trained with rng_impl={old!r}; resume it with "
                         f"--config.rng_impl={old} (this config says {new!r})")

