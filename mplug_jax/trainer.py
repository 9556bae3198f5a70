"""The one training loop for every task (big_vision `train.py` main, split into functions).

mesh -> data -> task -> abstract state + shardings (logical axes) -> jit(init, out_shardings)
-> resume (workdir checkpoint > `config.resume` > scratch) -> AOT-compiled step (state donated,
explicit in/out shardings) -> loop (metrics fetched on log steps; checkpoints; SIGTERM save)
-> wait for checkpoints -> evaluators -> loss-curve PNG.

The step is generic: `task.begin_step`, value_and_grad of `task.loss` (optionally accumulated
over micro-batches), one optax update, non-finite steps skipped (params, optimizer state and
task extras kept) and counted; global norms as metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import metrics as mlib
from mplug_jax import optim
from mplug_jax import sharding as shd
from mplug_jax import train_state as ts
from mplug_jax.models import layers
from mplug_jax.tasks.pretrain import PretrainTask

TASKS = {"pretrain": PretrainTask}


def _evaluators():
    from mplug_jax.evaluators.pretrain_eval import PretrainZeroShot
    return {"pretrain_zeroshot": PretrainZeroShot}


class NonFiniteError(RuntimeError):
    """Raised after `max_nonfinite_steps` consecutive steps with a non-finite loss or grads."""


def split_microbatches(batch: dict, k: int) -> dict:
    """[B, ...] leaves -> [k, B / k, ...]; micro-batch j holds rows j, j + k, j + 2k, ...

    Strided (not contiguous) rows, so every device's shard of the batch contributes equally to
    every micro-batch and the data-parallel split of each micro-batch needs no communication.
    """
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(task, tx: optax.GradientTransformation, schedules: dict,
                    accum_steps: int = 1):
    """The generic step: (TrainState, batch) -> (TrainState, metrics of float32[]).

    Per step: `task.begin_step` (e.g. the momentum update), gradients of `task.loss` on the
    global batch, one optimizer update. With `accum_steps` k > 1 the batch is split into k
    micro-batches (`split_microbatches`) run one after another in a `lax.scan` (activation
    memory of one micro-batch); their gradients and metrics are averaged and the task extras
    (e.g. feature queues) are threaded through them in order.
    """

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
        rng = jax.random.fold_in(state.rng, state.step)
        extra = task.begin_step(state.params, state.extra)
        compute = grads if accum_steps == 1 else accumulated
        loss, aux, new_extra, grads_ = compute(state.params, extra, batch, rng, state.step)
        updates, new_opt = tx.update(grads_, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
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


def make_source(input_cfg, split: str, size: int, image_size: int, seed: int):
    """Random-access records of `input.dataset`.

    'synthetic': the built-in `SyntheticShapes` ('train' / 'heldout' splits of `size` records).
    'json': official pretraining json lists (`input.annotations`, images under
      `input.image_root`); the 'heldout' split reads `input.eval_annotations`.
    'tfds': a dataset written by `mplug-jax prepare --format pretrain` (`input.tfds_dir`); the
      'heldout' split is `input.eval_split` of it.
    """
    kind = input_cfg.dataset
    if kind == "synthetic":
        from mplug_jax.data.synthetic import SyntheticShapes
        return SyntheticShapes(split, size, image_size=image_size, seed=seed)
    if kind == "json":
        from mplug_jax.data import sources
        files = input_cfg.get("annotations") if split == "train" else \
            input_cfg.get("eval_annotations")
        if not files:
            raise ValueError(f"input.dataset='json' needs input."
                             f"{'annotations' if split == 'train' else 'eval_annotations'}")
        return sources.pretrain(list(files), input_cfg.get("image_root", ""),
                                max_skip_rate=input_cfg.max_skip_rate)
    if kind == "tfds":
        from mplug_jax.data.tfds_builders import load_prepared
        splits = load_prepared(input_cfg.tfds_dir, "pretrain")
        name = "train" if split == "train" else input_cfg.get("eval_split", "validation")
        if name not in splits:
            raise ValueError(f"{input_cfg.tfds_dir} has splits {sorted(splits)}, not {name!r}")
        return splits[name]
    raise ValueError(f"unknown input.dataset {kind!r}; valid: synthetic, json, tfds")


def make_train_iter(config, image_size: int):
    """(grain iterator of process-local batches, records per epoch)."""
    from mplug_jax.data.pipeline import pretrain_dataset
    inp = config.input
    nproc = jax.process_count()
    if inp.batch_size % nproc:
        raise ValueError(f"input.batch_size {inp.batch_size} not divisible by {nproc} processes")
    source = make_source(inp, "train", inp.train_size, image_size, config.seed)
    aug = {k: v for k, v in inp.augment.items() if k != "enabled"} if inp.augment.enabled else None
    ds = pretrain_dataset(source, image_size=image_size, batch_size=inp.batch_size // nproc,
                          max_words=inp.max_words, max_tokens=inp.max_tokens,
                          seed=inp.shuffle_seed, train=True, augment=aug, workers=inp.workers,
                          shard_index=jax.process_index(), shard_count=nproc,
                          max_skip_rate=inp.max_skip_rate)
    return iter(ds), len(source)


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
    task = TASKS[config.task.name](config, steps_per_epoch=steps_per_epoch) \
        if config.task.name in TASKS else _unknown("task", config.task.name, TASKS)
    rng = jax.random.PRNGKey(config.seed)
    params_shape = _unbox(jax.eval_shape(task.init_params, rng))
    tx, schedules = optim.make_optimizer(config.optim, params_shape, steps)
    abstract, shardings = ts.abstract_state(task.init_params, task.init_extra, tx, rng, mesh,
                                            rule_set)
    init = jax.jit(functools.partial(ts.init_state, task.init_params, task.init_extra, tx),
                   out_shardings=shardings)
    return Setup(mesh, task, tx, schedules, abstract, shardings, steps, steps_per_epoch, init,
                 rule_set)


def _log(msg: str) -> None:
    """Console line from process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _unbox(tree):
    return nn.meta.unbox(tree)


def _unknown(kind: str, name: str, registry: dict):
    raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(registry)}")


def init_state(s: Setup, seed: int) -> ts.TrainState:
    """Fresh state, created directly with its shardings."""
    return s.init(jax.random.PRNGKey(seed))


def compile_step(s: Setup, config, batch_abstract: dict, compiler_options: dict | None = None):
    """AOT-compiled train step with donated state and explicit shardings.

    Traced under the mesh and the preset's logical-axis rules, so the activation constraints
    of the model (`layers.constrain`) apply. `compiler_options`: XLA options (tests use -O0).
    """
    step_fn = make_train_step(s.task, s.tx, s.schedules, config.optim.accum_steps)
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


class _Stop:
    """Stop-on-SIGTERM, at the same step on every process.

    One process: a Python SIGTERM handler sets a flag, read after every step. Several processes
    (after `jax.distributed.initialize`): JAX's preemption sync manager catches SIGTERM on any
    host and agrees on the first step every process can still reach (`reached_preemption_sync_
    point`, asked after every step by all processes); a Python handler here would replace its
    C-level one, so none is installed. Either way the loop saves a checkpoint and returns.
    """

    def __init__(self):
        self.requested = False
        self._old = None
        self._sync = None

    def __enter__(self):
        from jax._src import distributed as jdist
        state = jdist.global_state
        if state.client is not None and getattr(state, "preemption_sync_manager", None):
            from jax.experimental import multihost_utils
            self._sync = multihost_utils.reached_preemption_sync_point
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def check(self, step: int) -> bool:
        """Whether to save and stop after `step` (call once per step on every process)."""
        if self._sync is not None:
            self.requested = self.requested or bool(self._sync(step))
        return self.requested

    def __exit__(self, *_):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


_PREPARED: dict = {}  # compiled steps of earlier `run`s in this process, by config


def prepare(config, n_train: int):
    """(Setup, compiled step, its FLOPs/memory); reused by later runs of the same config."""
    key = (config.to_json_best_effort(sort_keys=True), n_train, tuple(
        d.id for d in jax.devices()))
    if key not in _PREPARED:
        s = setup(config, max(n_train // config.input.batch_size, 1))
        b = config.input.batch_size
        batch_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype),
                                 s.task.dummy_batch(1))
        batch_abs["idx"] = jax.ShapeDtypeStruct((b,), jnp.int32)
        step_c = compile_step(s, config, batch_abs)
        _PREPARED[key] = (s, step_c, mlib.compiled_stats(step_c))
    return _PREPARED[key]


def init_from_pretrained(state: ts.TrainState, s: Setup, init_cfg) -> ts.TrainState:
    """Overwrite a fresh state's params (and momentum copy) from unimodal checkpoints, as the
    paper initialises pretraining: `init.clip` (OpenAI CLIP or HF CLIPVisionModel) -> visual
    encoder; `init.bert` (BERT, 12 layers for base/large) -> text encoder, fusion
    self-attention/FFN, decoder, MLM head. Cross-attention and the heads stay fresh."""
    if not init_cfg or not (init_cfg.get("clip") or init_cfg.get("bert")):
        return state
    import flax

    from mplug_jax import params as P
    from mplug_jax.interop import convert, unimodal
    kw = convert.model_kwargs(s.task.model)
    flat = {}
    if init_cfg.get("clip"):
        flat.update(unimodal.clip_params(unimodal.load_unimodal(init_cfg.clip), kw))
    if init_cfg.get("bert"):
        flat.update(unimodal.bert_params(unimodal.load_unimodal(init_cfg.bert), kw))
    if s.task.model.scan_layers:
        flat = P.loop_to_scan(flat)

    def put(tree):
        leaves = flax.traverse_util.flatten_dict(tree, sep="/")
        for k, v in flat.items():
            if k not in leaves or leaves[k].shape != v.shape:
                raise ValueError(f"init: {k} {v.shape} does not fit the model "
                                 f"({leaves[k].shape if k in leaves else 'no such param'})")
            leaves[k] = jax.device_put(jnp.asarray(v, leaves[k].dtype), leaves[k].sharding)
        return flax.traverse_util.unflatten_dict(leaves, sep="/")

    extra = dict(state.extra)
    if "params_m" in extra:
        extra["params_m"] = put(extra["params_m"])
    _log(f"initialised {len(flat)} params from {dict(init_cfg)}")
    return state.replace(params=put(state.params), extra=extra)


def run(config, workdir: str) -> dict:
    """Train (resuming from `workdir` if it holds a checkpoint), then evaluate.

    Returns:
      {'step': last step, 'evals': {name: metrics}, 'stopped': 'done'|'sigterm',
       'state': the final TrainState}.
    """
    from mplug_jax.data.pipeline import make_global_batch
    config = config.copy_and_resolve_references()
    workdir = os.path.abspath(workdir)
    ckpt_lib.write_config(workdir, config)
    it, n_train = make_train_iter(config, config.model.image_size)
    t0 = time.perf_counter()
    s, step_c, stats = prepare(config, n_train)
    writer = mlib.MetricWriter(workdir)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), keep=config.keep_ckpts)
    found = ckpt_lib.find_resume(workdir, config.resume or None)
    if found is None:
        state = init_from_pretrained(init_state(s, config.seed), s, config.get("init"))
    else:
        root, step = found
        src = ckpt if root == ckpt.directory else ckpt_lib.Checkpointer(root, async_save=False)
        state = src.restore(step, s.abstract, s.shardings, it)
        _log(f"resumed from {root} at step {step}")
    first = int(jax.device_get(state.step))
    b = config.input.batch_size
    peak, how = mlib.peak_flops_per_device(config.peak_flops)
    n_dev = s.mesh.size
    _log(f"ready in {time.perf_counter() - t0:.1f}s: {stats['flops'] / 1e9:.2f} GFLOP/device, "
         f"peak memory {stats['peak_bytes'] / 2**20:.0f} MiB/device; peak {peak / 1e9:.1f} "
         f"GFLOP/s/device ({how}) x {n_dev}; {s.total_steps} steps of {b}")
    chrono = mlib.Chrono(first, s.total_steps, b)
    evaluators = {}  # built on first use
    stopped, step, prev = "done", first, None
    with _Stop() as stop:
        for step in range(first + 1, s.total_steps + 1):
            batch = make_global_batch(next(it), s.mesh)
            state, out = step_c(state, batch)
            if prev is not None and int(prev["train/nonfinite_streak"]) >= \
                    config.max_nonfinite_steps:
                ckpt.save(step, state, it, force=True)
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
                writer.write(step, row)
            # The final step's evals run after the loop.
            if step < s.total_steps and run_evals(config, s, state.params, step, writer,
                                                  evaluators, periodic=True):
                chrono.restart(step)  # eval time is not step time
            stopping = stop.check(step)
            if step % config.ckpt_every_steps == 0 or step == s.total_steps or stopping:
                ckpt.save(step, state, it, force=True)
            if stopping:
                stopped = "sigterm"
                _log(f"SIGTERM: checkpoint saved at step {step}; rerun to resume")
                break
    ckpt.close()
    results = {"step": step, "stopped": stopped, "evals": {}, "state": state}
    if stopped == "done":
        results["evals"] = run_evals(config, s, state.params, step, writer, evaluators)
    writer.close()
    png = mlib.plot_losses(workdir)
    if png:
        print(f"loss curves: {png}", flush=True)
    return results


def run_evals(config, s: Setup, params, step: int, writer: mlib.MetricWriter,
              evaluators: dict, periodic: bool = False) -> dict:
    """Run `config.evals` entries (periodic: those due at `step`); writes `<name>/<metric>`.

    `evaluators` caches the built evaluators between calls. Returns {name: metrics} of the
    evaluators that ran (empty when none was due).
    """
    registry = _evaluators()
    out = {}
    for name, ecfg in config.evals.items():
        if periodic and not (ecfg.every_steps and step % ecfg.every_steps == 0):
            continue
        if ecfg.type not in registry:
            _unknown("evaluator", ecfg.type, registry)
        if name not in evaluators:
            evaluators[name] = registry[ecfg.type](s.task, ecfg, config, mesh=s.mesh)
        ev = evaluators[name]
        t = time.perf_counter()
        res = ev.run(params)
        scalars = {f"{name}/{k}": v for k, v in res.items() if isinstance(v, (int, float))}
        writer.write(step, scalars, console=False)
        if jax.process_index() == 0:
            print(f"== eval '{name}' at step {step} ({time.perf_counter() - t:.0f}s)")
            print(ev.report(res), flush=True)
        out[name] = res
    return out
