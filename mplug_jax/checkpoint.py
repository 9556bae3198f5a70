"""orbax checkpoints of the train state plus the grain iterator state, with automatic resume.

Layout under `<workdir>/ckpt/<step>/`: `state/` (the TrainState pytree, sharded arrays) and
`data_iter/` (`process_<i>-of-<n>.json`, one grain iterator state per process). Saves are
asynchronous (the device-to-host copy happens before `save` returns, so the donated state can
be reused at once); `keep_ckpts` newest are kept. Which steps exist, and which is the newest,
is orbax's answer (only finalised saves count). Multi-process preemption: `reached_preemption`
is orbax's, which asks JAX's preemption sync manager for the step every process can reach.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_ckpt


def resolve(path: str | epath.Path) -> epath.Path:
    """`path` as an epath; local paths made absolute, URLs (gs://, s3://, ...) kept as they are
    (`os.path.abspath` would turn a bucket URL into a local folder on every worker)."""
    text = str(path)
    return epath.Path(text) if "://" in text else epath.Path(text).resolve()


class Checkpointer:
    """CheckpointManager over (state, data iterator).

    Args:
      directory: checkpoint root (`<workdir>/ckpt`).
      keep: number of checkpoints kept (None = all).
      async_save: save in a background thread.
    """

    def __init__(self, directory: str | epath.Path, keep: int | None = 3,
                 async_save: bool = True, create: bool = True):
        self.directory = resolve(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data_iter"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data_iter": grain_ckpt.CheckpointHandler()})

    def latest_step(self) -> int | None:
        """Newest finalised step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalised step, ascending."""
        return sorted(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Multi-process runs: whether every process should save and stop after `step`."""
        return self.manager.reached_preemption(step)

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
