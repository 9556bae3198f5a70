"""A training workdir: `config.json` (the run config) and `ckpt/<step>/` (orbax checkpoints);
with `config.best` set, also `best/`: a workdir of its own holding the checkpoint with the best
validation metric so far (`BestKeeper`).

Paths are `etils.epath` paths, so a workdir may live on a bucket (`gs://...`) as the TPU launch
script documents; only local paths are made absolute.
"""
from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath

from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import rng as rng_lib
from mplug_jax import sharding as shd
from mplug_jax import tasks
from mplug_jax import train_state as ts

CONFIG = "config.json"
CKPT = "ckpt"
BEST = "best"
BEST_RECORD = "best.json"


resolve = ckpt_lib.resolve


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


def restore_params(workdir: str | epath.Path, step: int | None = None):
    """Params of a workdir's checkpoint (latest, or `step`), on this process's first device.

    Returns:
      (model, params, momentum params or None) of the workdir's task.
    """
    workdir = resolve(workdir)
    config = read_config(workdir)
    config.mesh.sharding = "dp"
    config.input.batch_size = 1  # the state's shapes do not depend on the batch
    config.optim.accum_steps = 1
    ckpt = ckpt_lib.Checkpointer(workdir / CKPT, keep=None, async_save=False, create=False)
    try:
        available = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in available:
            raise FileNotFoundError(f"no checkpoint at step {step} in {workdir / CKPT}; "
                                    f"available: {available}")
        task = tasks.build(config)
        mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                             devices=jax.local_devices()[:1])
        _, _, abstract, shardings = ts.state_spec(task, config.optim, 1, mesh,
                                                  shd.rules(config.mesh.sharding),
                                                  rng_lib.impl_name(config))
        state = ckpt.restore(step, abstract, shardings, None)
    finally:
        ckpt.close()
    return task.model, state.params, state.extra.get("params_m")


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
