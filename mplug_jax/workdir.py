"""A training workdir: `config.json` (the run config) and `ckpt/<step>/` (orbax checkpoints).

Paths are `etils.epath` paths, so a workdir may live on a bucket (`gs://...`) as the TPU launch
script documents; only local paths are made absolute.
"""
from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath

from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import sharding as shd
from mplug_jax import tasks
from mplug_jax import train_state as ts

CONFIG = "config.json"
CKPT = "ckpt"


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
                                                  shd.rules(config.mesh.sharding))
        state = ckpt.restore(step, abstract, shardings, None)
    finally:
        ckpt.close()
    return task.model, state.params, state.extra.get("params_m")
