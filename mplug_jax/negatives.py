"""Where the retrieval tasks draw their in-batch negatives from: `config.task.negatives`.

- 'global': ITC's in-batch columns and ITM's hard negatives come from the whole (micro-)batch.
- 'per_device': from each batch shard's own rows, as the official PyTorch DDP runs, where each
  GPU's forward sees its own per-GPU batch (128 of the release's 1024) and DDP averages the
  per-GPU gradients. `per_pool` runs the pool's part of the loss under `jax.shard_map` over the
  batch mesh axes ('data', 'fsdp') of the mesh the step is traced under (`jax.set_mesh`, as
  the trainer does): a shard's scalars (e.g. its ITC loss) are averaged over the shards, its
  per-row outputs (e.g. its ITM pairs) are laid end to end in shard order. Parameters never
  enter it, so every sharding preset works unchanged. The pool's size is the per-device batch
  (input.batch_size / optim.accum_steps / batch shards): the official 128 needs 8 batch shards
  for the release's 1024. Traced without a mesh, the batch is one pool ('global').

Random draws: one pool (global, or a single batch shard) uses the step's key itself; with
n > 1 shards, shard s (its rows s*b .. s*b + b - 1 of the batch) uses `fold_in(key, s)`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec as P

from mplug_jax.sharding import BATCH_AXES

CHOICES = ("global", "per_device")


def check(value: str) -> str:
    """`value` if it is one of `CHOICES`, else a one-line ValueError."""
    if value not in CHOICES:
        raise ValueError(f"task.negatives must be one of {', '.join(map(repr, CHOICES))}, "
                         f"got {value!r}")
    return value


def _batch_mesh():
    """The abstract mesh of the trace if it has the batch axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def pools(mode: str) -> int:
    """How many pools the (micro-)batch traced now is split into: its batch shards for
    'per_device' under a mesh, else 1."""
    mesh = _batch_mesh() if mode == "per_device" else None
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def pool_key(key: jax.Array, pool: jax.Array | int, n: int) -> jax.Array:
    """The random key of pool `pool` of `n` (module docstring)."""
    return key if n == 1 else jax.random.fold_in(key, pool)


def per_pool(fn: Callable, mode: str, key: jax.Array, shared: Any, rows: Any) -> tuple[Any, Any]:
    """`fn(key, shared, rows) -> (scalars, row_outputs)` on each pool of the batch.

    Args:
      fn: one pool's computation; `rows` and `row_outputs` are trees of batch-major arrays
        [b, ...] (b = the pool's rows), `scalars` a tree of float32[].
      mode: 'global' (one call on the whole batch) or 'per_device' (module docstring).
      key: the step's key for `fn`'s draws (`pool_key`); shared: arrays every pool sees whole
        (queues, temperature); rows: the batch's rows [B, ...].
    Returns:
      (scalars averaged over the pools, row outputs [n * b', ...] in pool order).
    """
    mesh = _batch_mesh() if mode == "per_device" else None
    if mesh is None:
        return fn(key, shared, rows)
    n = pools(mode)

    def one(key, shared, rows):
        scalars, out = fn(pool_key(key, jax.lax.axis_index(BATCH_AXES), n), shared, rows)
        return jax.tree.map(lambda x: jax.lax.pmean(x, BATCH_AXES), scalars), out

    return jax.shard_map(one, mesh=mesh, in_specs=(P(), P(), P(BATCH_AXES)),
                         out_specs=(P(), P(BATCH_AXES)))(key, shared, rows)
