"""A training workdir: `config.json` (the run config) and `ckpt/<step>/` (orbax checkpoints);
with `config.best` set, also `best/`: a workdir of its own holding the checkpoint with the best
validation metric so far (`BestKeeper`).

Paths are `etils.epath` paths, so a workdir may live on a bucket (`gs://...`) as the TPU launch
script documents; only local paths are made absolute.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, NamedTuple

import jax
import ml_collections
from etils import epath

from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import distributed
from mplug_jax import rng as rng_lib
from mplug_jax import task_names
from mplug_jax.errors import ConfigError
from mplug_jax.workdir_lock import WorkdirBusy, WorkdirLock

CONFIG = "config.json"
CKPT = "ckpt"
BEST = "best"
BEST_RECORD = "best.json"


resolve = ckpt_lib.resolve

# Model fields that leave the parameters' names and shapes alone: a run may resume with them
# changed (e.g. bf16 compute or rematerialisation for the rest of a run).
RESUME_SAFE_MODEL_FIELDS = frozenset({"dtype", "remat_policy", "attention_impl", "dropout_rate",
                                      "init_std", "vision_posemb_init_std"})


class ConfigMismatch(ConfigError):
    """A run was started in a workdir holding a checkpointed run of another task or model."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def has_checkpoint(workdir: epath.Path) -> bool:
    """Whether `<workdir>/ckpt/` holds any step directory (finalised or not)."""
    ckpt = workdir / CKPT
    return ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())


def check_resumable(workdir: epath.Path, config) -> None:
    """Raise `ConfigMismatch` when `workdir` holds checkpoints of another task or model.

    Compared: `task.name` and every `model` field except `RESUME_SAFE_MODEL_FIELDS`; anything
    else (total_steps, learning rate, data, evals, ...) may change when a run is extended. A
    workdir without checkpoints has nothing to lose and is not checked."""
    path = workdir / CONFIG
    if not path.exists() or not has_checkpoint(workdir):
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigMismatch(f"{path} is not valid JSON ({err}); this workdir holds "
                             "checkpoints, so its run config cannot be checked: restore the "
                             "file or pick another --workdir") from None
    new = json.loads(json.dumps(config.to_dict(), default=str))  # as `write_config` saves it
    was, now = (task_names.canonical(str(c.get("task", {}).get("name"))) for c in (old, new))
    if was != now:
        diffs = [f"task {was!r} != {now!r}"]
    else:
        a, b = _flat(old.get("model", {})), _flat(new.get("model", {}))
        diffs = [f"model.{k} {a.get(k, '<unset>')!r} != {b.get(k, '<unset>')!r}"
                 for k in sorted(set(a) | set(b))
                 if k not in RESUME_SAFE_MODEL_FIELDS and a.get(k) != b.get(k)]
    if diffs:
        raise ConfigMismatch(
            f"{workdir} holds checkpoints of a {was!r} run with another task or model ("
            f"{'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}): refusing to mix "
            f"them; to start from that run use a new --workdir with "
            f"--config.init.checkpoint={workdir}")
    rng_lib.check_resume(ml_collections.ConfigDict(old), config, str(workdir))


def check_same_rng(workdir: epath.Path, config) -> None:
    """`rng.check_resume` against the `config.json` of `workdir`, if it holds checkpoints to
    resume from (a run resumes only with the PRNG implementation it was trained with)."""
    if (workdir / CONFIG).exists() and has_checkpoint(workdir):
        rng_lib.check_resume(read_config(workdir), config, str(workdir))


@contextlib.contextmanager
def claim(workdir: epath.Path, config):
    """Hold `workdir` for one training run: the lock (`workdir_lock`), then the config check
    (`check_resumable`), both before anything is written. Process 0 decides; every process
    raises its verdict (`WorkdirBusy` / `ConfigMismatch`). The lock is released on exit
    (on kill -9 the kernel drops it)."""
    lock, verdict, error = None, "", None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock.acquire(workdir)
            if lock is None:
                print(f"WARNING: {workdir} is remote: no workdir lock, make sure one trainer "
                      "at a time uses it", file=sys.stderr, flush=True)
            elif lock.note:
                print(f"{workdir}: {lock.note}", flush=True)
            check_resumable(workdir, config)
        except Exception as err:  # noqa: BLE001 - every process must hear of it, then raise
            if lock is not None:
                lock.release()
            error, verdict = err, f"{type(err).__name__}:{err}"
    verdict = distributed.from_process0("claim", verdict)
    if error is not None:
        raise error
    if verdict:
        kind, msg = verdict.split(":", 1)
        known = {"WorkdirBusy": WorkdirBusy, "ConfigMismatch": ConfigMismatch}
        raise known[kind](msg) if kind in known else RuntimeError(
            f"process 0 could not claim {workdir}: {verdict}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def write_config(workdir: epath.Path, config) -> None:
    """Save the run config as `<workdir>/config.json` (process 0)."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG).write_text(json.dumps(config.to_dict(), indent=2, default=str))


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
    """The run config saved in a workdir; a clear error when it is not one."""
    path = resolve(workdir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {CONFIG})")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


class Restored(NamedTuple):
    """A workdir checkpoint's arrays: `config` (the run config, whose task says which model
    the params belong to: `tasks.model(config)`), `params` and `momentum` (the momentum copy
    `extra['params_m']`, None when the run keeps none)."""
    config: ml_collections.ConfigDict
    params: Any
    momentum: Any


def restore_params(workdir: str | epath.Path, step: int | None = None) -> Restored:
    """Params of a workdir's checkpoint (latest, or `step`), on this process's first device.

    Only the arrays are read, with the shapes the checkpoint records: no task, model or train
    state is built. Latest = the newest step that can be read (`Checkpointer.restore_latest`'s
    rule, the one the trainer resumes by: unreadable steps are skipped with a warning).

    Returns:
      `Restored(config, params, momentum params or None)`.
    """
    workdir = resolve(workdir)
    config = read_config(workdir)
    keys = ("params", "extra/params_m")
    ckpt = ckpt_lib.Checkpointer(workdir / CKPT, keep=None, async_save=False, create=False)
    try:
        available = ckpt.all_steps()
        if not available or (step is not None and step not in available):
            raise FileNotFoundError(f"no checkpoint at step {step} in {workdir / CKPT}; "
                                    f"available: {available}")
        if step is None:  # the newest readable step (corrupt ones skipped, with a warning)
            arrays, _ = ckpt.read_arrays_latest(keys)
        else:
            arrays = ckpt.read_arrays_step(step, keys)
    finally:
        ckpt.close()
    if "params" not in arrays:
        raise ckpt_lib.CheckpointError(f"{workdir / CKPT} holds no params")
    return Restored(config, arrays["params"], arrays.get("extra/params_m"))


class BestKeeper:
    """Keeps the train state with the best value of one eval metric under `<workdir>/best/`.

    `config.best = {eval, metric, mode}` names a block of `config.evals`, one of its scalar
    metrics and whether higher ('max') or lower ('min') is better. `best/` is itself a workdir
    (`config.json`, `ckpt/<step>/`, plus `best.json` = {eval, metric, mode, step, value}), so
    anything that takes a workdir (`mplug-jax evaluate/predict --checkpoint`, `init.checkpoint`)
    takes `<workdir>/best`. The whole TrainState is saved, without the data iterator. A resumed
    run keeps competing against the recorded value.
    """

    def __init__(self, workdir: epath.Path, config):
        best = config.best
        self.eval, self.metric = str(best.eval), str(best.metric)
        self.mode = str(best.get("mode", "max"))
        if self.mode not in ("max", "min"):
            raise ValueError(f"config.best.mode must be 'max' or 'min', got {self.mode!r}")
        if self.eval not in config.get("evals", {}):
            raise ValueError(f"config.best.eval={self.eval!r} is not a block of config.evals "
                             f"({sorted(config.get('evals', {}))})")
        if not self.metric:
            raise ValueError(f"config.best.metric is empty: name a metric of eval "
                             f"{self.eval!r} (e.g. the one its report leads with)")
        self.directory = resolve(workdir) / BEST
        write_config(self.directory, config)
        record = self.directory / BEST_RECORD
        self.value = json.loads(record.read_text())["value"] if record.exists() else None
        self.ckpt = ckpt_lib.Checkpointer(self.directory / CKPT, keep=1)

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far (any finite value beats none)."""
        if value != value:  # NaN never wins
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, results: dict, state) -> str | None:
        """Save `state` as the new best when `results[eval][metric]` improves; returns a log
        line then (or a warning when the eval lacks the metric), else None (also when the eval
        did not run at this step)."""
        res = results.get(self.eval)
        if res is None:
            return None
        if self.metric not in res:  # e.g. a test split without answers: warn, keep training
            numeric = sorted(k for k, v in res.items() if isinstance(v, (int, float)))
            return (f"WARNING: config.best.metric={self.metric!r} is not a metric of eval "
                    f"{self.eval!r} at step {step} (it reports {numeric}): best not updated")
        value = float(res[self.metric])
        if not self.improves(value):
            return None
        previous, self.value = self.value, value
        self.ckpt.save(step, state, None, force=True)
        self.ckpt.wait()  # best.json must never name a step whose save is unfinished
        if jax.process_index() == 0:
            (self.directory / BEST_RECORD).write_text(json.dumps(
                {"eval": self.eval, "metric": self.metric, "mode": self.mode, "step": step,
                 "value": value}, indent=2) + "\n")
        was = "none" if previous is None else f"{previous:.4g}"
        return (f"best {self.eval}/{self.metric} = {value:.4g} at step {step} (was {was}): "
                f"saved to {self.directory}")

    def close(self) -> None:
        self.ckpt.close()
