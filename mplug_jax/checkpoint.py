"""orbax checkpoints of the train state plus the grain iterator state, with automatic resume.

Layout under `<workdir>/ckpt/<step>/`: `state/` (the TrainState pytree, sharded arrays) and
`data_iter/` (`process_<i>-of-<n>.json`, one grain iterator state per process). Saves are
asynchronous (the device-to-host copy happens before `save` returns, so the donated state can
be reused at once); `keep_ckpts` newest are kept. `<workdir>/config.json` records the run config
(including `model.scan_layers`, the parameter layout).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_ckpt


class Checkpointer:
    """CheckpointManager over (state, data iterator).

    Args:
      directory: checkpoint root (`<workdir>/ckpt`).
      keep: number of checkpoints kept (None = all).
      async_save: save in a background thread.
    """

    def __init__(self, directory: str, keep: int | None = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data_iter": grain_ckpt.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
        """Start saving `state` and the iterator position at `step`; returns whether it saved."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data_iter"] = grain_ckpt.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, shardings: Any, data_iter: Any) -> Any:
        """Restore the state (placed with `shardings`) and, in place, the iterator at `step`."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            args["data_iter"] = grain_ckpt.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_config(workdir: str, config) -> None:
    """Save the run config as `<workdir>/config.json` (process 0)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)


def latest_step(root: str) -> int | None:
    """Newest finalised checkpoint step under `root` (orbax renames `<step>.orbax-checkpoint-tmp`
    to `<step>` only once a save has completed), or None."""
    if not os.path.isdir(root):
        return None
    steps = [int(d) for d in os.listdir(root) if d.isdigit()
             and os.path.isdir(os.path.join(root, d, "state"))]
    return max(steps) if steps else None


def find_resume(workdir: str, resume: str | None) -> tuple[str, int] | None:
    """Resume order: a checkpoint in `<workdir>/ckpt` > `resume` (another run's workdir).

    Returns (checkpoint root, step) or None (start from scratch).
    """
    roots = [os.path.join(workdir, "ckpt")] + ([os.path.join(resume, "ckpt")] if resume else [])
    for root in roots:
        step = latest_step(root)
        if step is not None:
            return os.path.abspath(root), step
    if resume:
        raise FileNotFoundError(f"config.resume={resume!r} has no checkpoint under {resume}/ckpt")
    return None


def load_for_export(workdir: str, step: int | None = None):
    """Params of a training workdir for `mplug-jax export`.

    Args:
      workdir: a run directory (`config.json` + `ckpt/<step>/`).
      step: checkpoint step; default the latest.
    Returns:
      (model, params, momentum params or None), restored on one device.
    """
    import ml_collections

    from mplug_jax import sharding as shd
    from mplug_jax import trainer

    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{workdir} is neither a converted checkpoint (mplug_config.json)"
                                " nor a training workdir (config.json)")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    root = os.path.join(workdir, "ckpt")
    available = sorted(int(d) for d in os.listdir(root) if d.isdigit()) \
        if os.path.isdir(root) else []
    step = latest_step(root) if step is None else step
    if step is None or step not in available:
        raise FileNotFoundError(f"no checkpoint at step {step} in {root}; available: {available}")
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    config.mesh.sharding = "dp"
    config.input.batch_size = 1  # shapes of the state do not depend on the batch
    s = trainer.setup(config, steps_per_epoch=1, mesh=mesh)
    ckpt = Checkpointer(root, keep=None, async_save=False)
    try:
        state = ckpt.restore(step, s.abstract, s.shardings, None)
    finally:
        ckpt.close()
    return s.task.model, state.params, state.extra.get("params_m")
