"""Train state: step, params, optimizer state, task extras (momentum params, queues), RNG.

`TrainState` is a flax struct dataclass (a pytree). Its sharding is declared once by
`abstract_state`, from the logical axes of the params (momentum params reuse them; queues and
counters are replicated). Also here: the two state updates of ALBEF-style pretraining,
`momentum_update` and `enqueue`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mplug_jax import optim
from mplug_jax import rng as rng_lib
from mplug_jax import sharding as shd


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: int32[] train steps taken (skipped non-finite steps included).
      params: model parameters (unboxed).
      opt_state: optax state.
      extra: task state outside the optimizer, e.g. {'params_m', 'image_queue': float32[Q, E],
        'text_queue': float32[Q, E], 'queue_ptr': int32[]} for pretraining; {} when unused.
      rng: uint32[2] (threefry) or uint32[4] (rbg, unsafe_rbg) raw data of the base PRNG key;
        step keys are `fold_in(wrap(rng), step)` (`mplug_jax.rng`).
      nonfinite_total: int32[] steps skipped because the loss or grads were not finite.
      nonfinite_streak: int32[] consecutive skipped steps (0 after a finite one).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any
    rng: jax.Array
    nonfinite_total: jax.Array
    nonfinite_streak: jax.Array


def momentum_update(params_m: Any, params: Any, momentum: float) -> Any:
    """`m * params_m + (1 - m) * params` leaf-wise, without gradient into `params`."""
    return jax.tree.map(
        lambda pm, p: (momentum * pm + (1.0 - momentum) * jax.lax.stop_gradient(p)).astype(
            pm.dtype), params_m, params)


def enqueue(queue: jax.Array, ptr: jax.Array, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write `feats` into the circular `queue` at `ptr`.

    Args:
      queue: float32[Q, E].
      ptr: int32[] next write position (a multiple of B).
      feats: float[B, E]; Q must be a multiple of B, so writes never wrap mid-batch.
    Returns:
      (float32[Q, E] new queue, int32[] new pointer (ptr + B) mod Q).
    """
    q, b = queue.shape[0], feats.shape[0]
    if q % b:
        raise ValueError(f"queue size {q} must be a multiple of the global batch size {b}")
    feats = jax.lax.stop_gradient(feats).astype(queue.dtype)
    new = jax.lax.dynamic_update_slice(queue, feats, (ptr, jnp.zeros((), ptr.dtype)))
    return new, ((ptr + b) % q).astype(ptr.dtype)


def init_state(init_params: Callable, init_extra: Callable, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
    """A fresh state (call under `jax.jit(out_shardings=...)` to create it sharded).

    Args:
      init_params: rng -> params (leaves may be `nn.LogicallyPartitioned`).
      init_extra: (params, rng) -> extra; keeps boxes of the params it copies.
      tx: optimizer.
      rng: seed key; split into params / extra / the state's base key.
    """
    k_params, k_extra, k_state = jax.random.split(rng, 3)
    boxed = init_params(k_params)
    params = nn.meta.unbox(boxed)
    extra = nn.meta.unbox(init_extra(boxed, k_extra))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), extra=extra,
                      rng=jax.random.key_data(k_state), nonfinite_total=zero,
                      nonfinite_streak=zero)


def abstract_state(init_params: Callable, init_extra: Callable,
                   tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                   rule_set: tuple, boxed_params: Any = None) -> tuple[TrainState, TrainState]:
    """Shapes and shardings of the state, from the params' logical axes (no compute).

    `boxed_params`: `jax.eval_shape(init_params, rng)` if the caller has it already. The
    model's init is traced once: tracing it is most of the time a workdir restore takes.

    Returns:
      (abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings).
    """
    if boxed_params is None:
        boxed_params = jax.eval_shape(init_params, rng)
    boxed_extra = jax.eval_shape(init_extra, boxed_params, rng)

    def known_params(_):  # zeros of the known shapes (boxes kept) instead of a second trace
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), boxed_params)

    abstract = jax.eval_shape(lambda k: init_state(known_params, init_extra, tx, k), rng)
    param_sh = shd.logical_shardings(boxed_params, mesh, rule_set)
    rep = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: rep)
    shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                           extra=shd.logical_shardings(boxed_extra, mesh, rule_set), rng=rep,
                           nonfinite_total=rep, nonfinite_streak=rep)
    shd.check_divisible(abstract, shardings, mesh)
    return abstract, shardings


def state_spec(task, optim_cfg, total_steps: int, mesh: Mesh, rule_set: tuple,
               steps_per_epoch: int | None = None, rng_impl: str = "threefry"):
    """Optimizer and state layout of a task (no compute).

    Args:
      task: provides `init_params(rng)` and `init_extra(params, rng)`.
      optim_cfg: the `optim` config block.
      total_steps: optimizer updates of the run (schedules).
      mesh, rule_set: where the state lives and the logical-axis rules.
      steps_per_epoch: optimizer updates per epoch (schedule 'epoch_cosine' needs it).
      rng_impl: PRNG implementation of the run (`mplug_jax.rng`; sets the base key's shape).
    Returns:
      (tx, {group: lr schedule}, abstract TrainState, TrainState of NamedShardings).
    """
    rng = rng_lib.seed_key(0, rng_impl)  # shapes do not depend on the key's value
    boxed = jax.eval_shape(task.init_params, rng)
    tx, schedules = optim.make_optimizer(optim_cfg, nn.meta.unbox(boxed), total_steps,
                                         steps_per_epoch)
    abstract, shardings = abstract_state(task.init_params, task.init_extra, tx, rng, mesh,
                                         rule_set, boxed)
    return tx, schedules, abstract, shardings
