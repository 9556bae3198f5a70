"""The one training loop for every task (big_vision `train.py` main, split into functions).

workdir lock + config check -> mesh -> data -> task -> abstract state + shardings (logical
axes) -> jit(init, out_shardings) -> resume (newest readable workdir checkpoint >
`config.resume` > scratch) -> AOT-compiled step (state donated, explicit in/out shardings)
-> loop (metrics fetched on log steps; periodic evals and the best checkpoint, `selection`;
checkpoints; SIGTERM save) -> wait for checkpoints -> final evals -> `test_on_best` evals on
the selected checkpoint -> loss-curve PNG.

The step is generic: `task.begin_step`, value_and_grad of `task.loss` (optionally accumulated
over micro-batches), one optax update, non-finite steps skipped (params, optimizer state and
task extras kept) and counted; global norms as metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any

import einops
import jax
import jax.numpy as jnp
import optax

from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import config_checks
from mplug_jax import distributed
from mplug_jax import metrics as mlib
from mplug_jax import optim
from mplug_jax import rng as rng_lib
from mplug_jax import selection
from mplug_jax import sharding as shd
from mplug_jax import tasks
from mplug_jax import train_state as ts
from mplug_jax import workdir as workdir_lib
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.data.prefetch import DevicePrefetch
from mplug_jax.models import layers


class NonFiniteError(RuntimeError):
    """Raised after `max_nonfinite_steps` consecutive steps with a non-finite loss or grads."""


def split_microbatches(batch: dict, k: int) -> dict:
    """[B, ...] leaves -> [k, B / k, ...]; micro-batch j holds rows j, j + k, j + 2k, ...

    Strided (not contiguous) rows, so every device's shard of the batch contributes equally to
    every micro-batch and the data-parallel split of each micro-batch needs no communication.
    """
    return jax.tree.map(lambda x: einops.rearrange(x, "(n k) ... -> k n ...", k=k), batch)


def make_train_step(task, tx: optax.GradientTransformation, schedules: dict,
                    accum_steps: int = 1, rng_impl: str = rng_lib.DEFAULT):
    """The generic step: (TrainState, batch) -> (TrainState, metrics of float32[]).

    Per step: `task.begin_step` (e.g. the momentum update), gradients of `task.loss` on the
    global batch, one optimizer update, `task.after_update` (e.g. clamping a temperature). With `accum_steps` k > 1 the batch is split into k
    micro-batches (`split_microbatches`) run one after another in a `lax.scan` (activation
    memory of one micro-batch); their gradients and metrics are averaged and the task extras
    (e.g. feature queues) are threaded through them in order. `rng_impl`: the PRNG of the
    state's base key (`mplug_jax.rng`); the task gets a typed key of that implementation.
    """
    rng_lib.check(rng_impl)

    def grads(params, extra, batch, rng, step):
        def loss_fn(p):
            return task.loss(p, extra, batch, rng, step)

        (loss, (aux, new_extra)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, aux, new_extra, g

    def accumulated(params, extra, batch, rng, step):
        def body(carry, xs):
            g_sum, extra = carry
            micro, i = xs
            loss, aux, extra, g = grads(params, extra, micro, jax.random.fold_in(rng, i), step)
            return (jax.tree.map(jnp.add, g_sum, g), extra), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g_sum, new_extra), (loss, aux) = jax.lax.scan(
            body, (zeros, extra), (split_microbatches(batch, accum_steps),
                                   jnp.arange(accum_steps)))
        mean = functools.partial(jnp.mean, axis=0)
        return (mean(loss), jax.tree.map(mean, aux), new_extra,
                jax.tree.map(lambda g: g / accum_steps, g_sum))

    def step_fn(state: ts.TrainState, batch: dict):
        rng = jax.random.fold_in(rng_lib.wrap(state.rng, rng_impl), state.step)
        extra = task.begin_step(state.params, state.extra)
        compute = grads if accum_steps == 1 else accumulated
        loss, aux, new_extra, grads_ = compute(state.params, extra, batch, rng, state.step)
        updates, new_opt = tx.update(grads_, state.opt_state, state.params)
        new_params = task.after_update(optax.apply_updates(state.params, updates))
        l2_grads = optax.tree.norm(grads_)
        finite = jnp.isfinite(loss) & jnp.isfinite(l2_grads)

        def keep(new, old):  # skip the whole update when anything is non-finite
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state), extra=keep(new_extra, state.extra),
            nonfinite_total=state.nonfinite_total + bad,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        out = {f"train/{k}": v for k, v in aux.items()}
        out.update({"train/l2_grads": l2_grads, "train/l2_params": optax.tree.norm(
            new_state.params), "train/l2_updates": optax.tree.norm(updates),
            "train/nonfinite_total": new_state.nonfinite_total,
            "train/nonfinite_streak": new_state.nonfinite_streak})
        for k, v in optim.learning_rates(schedules, state.step).items():
            out[f"train/{k}"] = jnp.asarray(v, jnp.float32)
        return new_state, out

    return step_fn


def total_steps(config, steps_per_epoch: int) -> int:
    if (config.total_steps > 0) == (config.total_epochs > 0):
        raise ValueError("set exactly one of total_steps / total_epochs to a value > 0, got "
                         f"{config.total_steps} / {config.total_epochs}")
    return int(config.total_steps or round(config.total_epochs * steps_per_epoch))


@dataclasses.dataclass
class Setup:
    """Everything built before the loop (returned by `setup` for tests and benchmarks)."""
    mesh: Any
    task: Any
    tx: Any
    schedules: dict
    abstract: ts.TrainState
    shardings: ts.TrainState
    total_steps: int
    steps_per_epoch: int
    init: Any = None  # jitted rng -> TrainState with `shardings`
    rules: tuple = ()  # logical-axis rules of the sharding preset
    rng_impl: str = rng_lib.DEFAULT  # PRNG implementation (config.rng_impl)


def setup(config, steps_per_epoch: int, mesh=None) -> Setup:
    """Mesh, task, optimizer and the state's shapes and shardings (no compute)."""
    mesh = mesh if mesh is not None else shd.make_mesh(config.mesh.shape)
    rule_set = shd.rules(config.mesh.sharding)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = int(config.optim.accum_steps)
    if accum < 1:
        raise ValueError(f"optim.accum_steps must be >= 1, got {accum}")
    if config.input.batch_size % (n_batch * accum):
        raise ValueError(
            f"input.batch_size {config.input.batch_size} must be divisible by the {n_batch} "
            f"batch shards of mesh {dict(mesh.shape)} times optim.accum_steps {accum} (each "
            f"micro-batch is split over the batch shards)")
    steps = total_steps(config, steps_per_epoch)
    impl = rng_lib.impl_name(config)
    task = tasks.build(config, steps_per_epoch)
    tx, schedules, abstract, shardings = ts.state_spec(task, config.optim, steps, mesh, rule_set,
                                                       steps_per_epoch, impl)
    init = jax.jit(functools.partial(ts.init_state, task.init_params, task.init_extra, tx),
                   out_shardings=shardings)
    return Setup(mesh, task, tx, schedules, abstract, shardings, steps, steps_per_epoch, init,
                 rule_set, impl)


_log = selection.log


def init_state(s: Setup, seed: int) -> ts.TrainState:
    """Fresh state, created directly with its shardings."""
    return s.init(rng_lib.seed_key(seed, s.rng_impl))


def compile_step(s: Setup, config, batch_abstract: dict, compiler_options: dict | None = None):
    """AOT-compiled train step with donated state and explicit shardings.

    Traced under the mesh and the preset's logical-axis rules, so the activation constraints
    of the model (`layers.constrain`) apply. `compiler_options`: XLA options (tests use -O0).
    """
    step_fn = make_train_step(s.task, s.tx, s.schedules, config.optim.accum_steps, s.rng_impl)
    bsh = shd.batch_sharding(s.mesh)
    jitted = jax.jit(step_fn, in_shardings=(s.shardings, bsh),
                     out_shardings=(s.shardings, shd.replicated(s.mesh)), donate_argnums=0)
    state_abs = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                             s.abstract, s.shardings)
    batch_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bsh),
                             batch_abstract)
    with jax.set_mesh(s.mesh), layers.activation_sharding(s.rules):
        lowered = jitted.lower(state_abs, batch_abs)
    return lowered.compile(compiler_options)


def global_batch_shapes(local_batch: dict) -> dict:
    """ShapeDtypeStructs of the global batch made from process-local batches like this one."""
    n = jax.process_count()
    return {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype)
            for k, v in local_batch.items()}


class _Stop:
    """Stop-on-SIGTERM, at the same step on every process.

    One process: a Python SIGTERM handler sets a flag, read after every step. Several processes
    (after `jax.distributed.initialize`): orbax's `reached_preemption`, which asks JAX's
    preemption sync manager (it catches SIGTERM on any host) for the first step every process
    can still reach; a Python handler would replace its C-level one, so none is installed.
    Either way the loop saves a checkpoint and returns.
    """

    def __init__(self, ckpt: ckpt_lib.Checkpointer):
        self.ckpt, self.requested, self._old = ckpt, False, None
        self.multi = jax.process_count() > 1

    def __enter__(self):
        if not self.multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no signal handling
                self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def check(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step on every process)."""
        if self.multi:
            self.requested = self.requested or self.ckpt.reached_preemption(step)
        return self.requested

    def __exit__(self, *_):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


_PREPARED: dict = {}  # compiled steps of earlier `run`s in this process, by config


def prepare(config, n_train: int, batch_abstract: dict):
    """(Setup, compiled step, its FLOPs/memory); reused by later runs of the same config."""
    key = (config.to_json_best_effort(sort_keys=True), n_train, tuple(
        d.id for d in jax.devices()), tuple(sorted((k, v.shape) for k, v in
                                                   batch_abstract.items())))
    if key not in _PREPARED:
        s = setup(config, max(n_train // config.input.batch_size, 1))
        step_c = compile_step(s, config, batch_abstract)
        _PREPARED[key] = (s, step_c, mlib.compiled_stats(step_c))
    return _PREPARED[key]


def run(config, workdir: str) -> dict:
    """Train `config.task` (resuming from `workdir` if it holds a checkpoint), then evaluate.

    Resume order: a checkpoint in `workdir` > `config.resume` (another run's workdir) >
    `config.init` (the task's pretrained initialisation) > scratch.

    Returns:
      {'step': last step, 'evals': {name: metrics} (the final params' evals, then the
       `test_on_best` ones), 'selected_step': the step `test_on_best` evaluated (None: none
       ran), 'stopped': 'done'|'sigterm', 'state': the final TrainState}.
    Raises `WorkdirBusy` (another trainer holds `workdir`), `ConfigMismatch` (its checkpoints
    are of another task or model) or `CheckpointError` (none of them can be read).
    """
    config = config.copy_and_resolve_references()
    config_checks.check(config, workdir=workdir)  # before anything is built or written
    workdir = workdir_lib.resolve(workdir)
    with workdir_lib.claim(workdir, config):  # the lock and config check, before any write
        return _train(config, workdir)


def _train(config, workdir) -> dict:
    """`run` once the workdir is held."""
    task_cls = tasks.get_class(config.task.name)
    host_iter, n_train = task_cls.train_input(config)
    t0 = time.perf_counter()
    first_local = host_iter.get_state()
    batch0 = next(host_iter)
    host_iter.set_state(first_local)  # the loop reads batch 0 again (through the prefetcher)
    s, step_c, stats = prepare(config, n_train, global_batch_shapes(batch0))
    distributed.barrier("compiled")  # before the first cross-process collective (orbax's)
    data = DevicePrefetch(host_iter, lambda b: make_global_batch(b, s.mesh))
    writer = mlib.MetricWriter(workdir)
    ckpt = ckpt_lib.Checkpointer(workdir / "ckpt", keep=config.keep_ckpts,
                                 keep_period=selection.keep_period(config, s.steps_per_epoch))
    # No evals at all (e.g. a smoke run that drops them): nothing can be best.
    best = workdir_lib.BestKeeper(workdir, config) \
        if config.get("best", {}).get("eval") and config.get("evals") else None
    state, origin, own_step = _initial_state(config, s, ckpt, data)
    _log(origin)
    workdir_lib.write_config(workdir, config)  # only now: a failed restore leaves the old one
    selection.write_epochs(workdir, s.steps_per_epoch, s.total_steps, config.input.batch_size)
    dropped = writer.keep_until(own_step)  # rows the restored state has not seen
    if dropped:
        _log(dropped)
    first = int(jax.device_get(state.step))
    b = config.input.batch_size
    peak, how = mlib.peak_flops_per_device(config.peak_flops)
    _log(f"ready in {time.perf_counter() - t0:.1f}s: {stats['flops'] / 1e9:.2f} GFLOP/device, "
         f"peak memory {stats['peak_bytes'] / 2**20:.0f} MiB/device; peak {peak / 1e9:.1f} "
         f"GFLOP/s/device ({how}) x {s.mesh.size}; {s.total_steps} steps of {b}")
    evals = {}  # built on first use
    if first == 0 and config.get("eval_at_start", False):
        selection.run_evals(config, s, state.params, 0, writer, evals)  # baseline, step 0
    chrono = mlib.Chrono(first, s.total_steps, b)
    warned = mlib.CounterWatch("train/dropped_", s.task.capacity_hint)
    stopped, step, prev = "done", first, None
    with _Stop(ckpt) as stop:
        for step in range(first + 1, s.total_steps + 1):
            state, out = step_c(state, s.task.prepare_batch(state.params, next(data)))
            data.prefetch()  # the host reads the next batch while the step runs
            if prev is not None and int(prev["train/nonfinite_streak"]) >= \
                    config.max_nonfinite_steps:
                ckpt.save(step, state, data, force=True)
                ckpt.close()
                raise NonFiniteError(
                    f"{int(prev['train/nonfinite_streak'])} consecutive steps with a non-finite "
                    f"loss or gradients (up to step {step - 1}); updates were skipped; "
                    f"checkpoint saved at step {step} in {ckpt.directory}")
            prev = out
            if step % config.log_every_steps == 0 or step == s.total_steps or step == first + 1:
                row = mlib.to_floats(out)
                row.update(chrono.tick(step))
                if "step_time_s" in row:
                    row["mfu"] = stats["flops"] / (row["step_time_s"] * peak)  # per device
                writer.write(step, row, console=False)
                _log(mlib.progress_line(step, s.total_steps, row))
                for msg in warned.check(row):
                    _log(f"WARNING at step {step}: {msg}")
            # The final step's evals run after the loop.
            if step < s.total_steps:
                ran = selection.run_evals(config, s, state.params, step, writer, evals,
                                          periodic=True)
                if ran:
                    selection.keep_best(best, step, ran, state)
                    chrono.restart(step)  # eval time (and a best save) is not step time
            stopping = stop.check(step)
            if selection.ckpt_due(config, step, s.steps_per_epoch) or step == s.total_steps \
                    or stopping:
                ckpt.save(step, state, data, force=True)
            if stopping:
                stopped = "sigterm"
                _log(f"SIGTERM: checkpoint saved at step {step}; rerun to resume")
                break
    ckpt.close()
    results = {"step": step, "stopped": stopped, "evals": {}, "state": state,
               "selected_step": None}
    if stopped == "done":
        results["evals"] = selection.run_evals(config, s, state.params, step, writer, evals)
        selection.keep_best(best, step, results["evals"], state)
        if config.get("test_on_best"):
            tested, results["selected_step"] = selection.test_on_best(
                config, s, best, state, step, writer, evals)
            results["evals"].update(tested)
    if best is not None:
        best.close()
    writer.close()
    png = mlib.plot_losses(workdir)
    if png:
        _log(f"metrics: {workdir / 'metrics.jsonl'}, TensorBoard {workdir / 'tb'}, "
             f"loss curves {png}")
    return results


def _initial_state(config, s: Setup, ckpt: ckpt_lib.Checkpointer, data) -> tuple[Any, str,
                                                                                  int | None]:
    """(state, where it came from, its step if it is this workdir's): this workdir's newest
    readable checkpoint, else the newest of `config.resume`'s, else a fresh state initialised
    by the task from `config.init`. Unreadable steps are skipped (`restore_latest`)."""
    try:
        found = ckpt.restore_latest(s.abstract, s.shardings, data)
    except ckpt_lib.CheckpointError:
        ckpt.close()  # no half-open async manager left behind
        raise
    if found is not None:
        moved = ckpt.set_aside(found[1])
        return found[0], f"resumed from {ckpt.directory} at step {found[1]}" + (
            f" (unreadable newer steps kept as {', '.join(moved)})" if moved else ""), found[1]
    if config.resume:
        other = ckpt_lib.Checkpointer(workdir_lib.resolve(config.resume) / "ckpt", keep=None,
                                      async_save=False, create=False)
        try:
            workdir_lib.check_same_rng(workdir_lib.resolve(config.resume), config)
            found = other.restore_latest(s.abstract, s.shardings, data)
            if found is None:
                raise FileNotFoundError(f"config.resume={config.resume!r} has no checkpoint "
                                        f"under {other.directory}")
        finally:
            other.close()
        return found[0], f"resumed from {other.directory} at step {found[1]}", None
    return s.task.init_from_pretrained(init_state(s, config.seed)), "started fresh", None
