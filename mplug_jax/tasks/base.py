"""What the trainer asks of a task, and the defaults most tasks share.

The trainer (`mplug_jax.trainer`) calls, in this order: `Task.train_input(config)` (a
classmethod: process-local batches and the number of records, which fixes the epoch length),
`Task(config, steps_per_epoch)`, `init_params` / `init_extra` (abstractly first, for the
shardings), `init_from_pretrained` on a fresh state, then per step `prepare_batch` (outside jit),
`begin_step`, `loss` (under
`jax.value_and_grad`, possibly once per micro-batch) and, after the optimizer update,
`after_update`. Evaluators get `predict_fns()`. Everything a task returns is a pytree of arrays.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from mplug_jax import pretrained


class KeyStream:
    """As many PRNG keys as asked for: the i-th `next()` is `fold_in(key, i)`.

    Replaces a fixed pool of split keys, which runs out (or is silently reused) when a loss
    grows another dropout site.
    """

    def __init__(self, key: jax.Array):
        self._key, self._count = key, 0

    def __iter__(self):
        return self

    def __next__(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count - 1)


class Task:
    """Base class of the tasks in `mplug_jax.tasks` (see module docstring for the call order).

    Subclasses set `model` in `__init__` and implement `train_input`, `dummy_batch`,
    `init_params`, `loss` and `predict_fns`; the rest has working defaults.
    """

    name = "base"
    model: Any = None
    # How to stop `train/dropped_*` counters from growing (the trainer's warning says it).
    capacity_hint = "raise the task's target capacity"

    def __init__(self, config, steps_per_epoch: int = 1):
        self.config = config
        self.steps_per_epoch = max(int(steps_per_epoch), 1)

    # ---- input ----------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config) -> tuple[Any, int]:
        """(iterator of process-local numpy batches, records per epoch).

        The iterator must be checkpointable (`get_state` / `set_state`, as grain's)."""
        raise NotImplementedError

    def dummy_batch(self, batch_size: int) -> dict:
        """Zero batch with the shapes and dtypes of a train batch (init and compilation)."""
        raise NotImplementedError

    # ---- state ----------------------------------------------------------------------------

    def init_params(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) params."""
        raise NotImplementedError

    def init_extra(self, params: Any, rng: jax.Array) -> dict:
        """State the optimizer does not update (momentum params, queues); boxed like params."""
        return {}

    def init_from_pretrained(self, state):
        """A fresh TrainState with its params (and a momentum copy, if the task keeps one)
        overwritten from `config.init` (`mplug_jax.pretrained`); unchanged when none is set.

        Subclasses adapt names with `pretrained_rename` / `pretrained_skip`."""
        init_cfg = self.config.get("init")
        if not pretrained.requested(init_cfg):
            return state
        loaded = pretrained.load(init_cfg, self.model)
        flat = pretrained.select(loaded.params, self.pretrained_rename(),
                                 self.pretrained_skip())
        params = pretrained.put(state.params, flat, self.model)
        extra = dict(state.extra)
        if "params_m" in extra:
            mom = pretrained.select(loaded.momentum or loaded.params, self.pretrained_rename(),
                                    self.pretrained_skip())
            keep = self.momentum_filter()
            extra["params_m"] = pretrained.put(extra["params_m"], {
                k: v for k, v in mom.items() if keep(k)}, self.model, "momentum")
        if jax.process_index() == 0:
            print(f"initialised {len(flat)} arrays from " + ", ".join(loaded.sources),
                  flush=True)
        return state.replace(params=params, extra=extra)

    def pretrained_rename(self) -> dict[str, str]:
        """{regex: replacement} applied to pretrained names (default none)."""
        return {}

    def pretrained_skip(self) -> tuple[str, ...]:
        """Regexes of pretrained names not to load (default none)."""
        return ()

    def momentum_filter(self) -> Callable[[str], bool]:
        """Which flat param names the momentum copy holds (default all)."""
        return lambda name: True

    # ---- step -----------------------------------------------------------------------------

    def prepare_batch(self, params: Any, batch: dict) -> dict:
        """Called by the trainer on each global batch right before the jitted step, outside
        jit, with the current params (e.g. SCST: search + host-side rewards added as arrays
        sharded like the batch). Must be deterministic given params and batch (bit-identical
        resume) and keep the shapes of `train_input`'s batches. Default: the batch unchanged."""
        return batch

    def begin_step(self, params: Any, extra: dict) -> dict:
        """Once per optimizer step, before the loss (e.g. the momentum update)."""
        return extra

    def loss(self, params: Any, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """-> (float32[] loss, (metrics {name: float32[]}, new extra))."""
        raise NotImplementedError

    def after_update(self, params: Any) -> Any:
        """Once per optimizer step, after the update (e.g. clamping a temperature)."""
        return params

    # ---- evaluation -----------------------------------------------------------------------

    def predict_fns(self) -> dict[str, Callable]:
        """{name: fn(params, *arrays)} for the evaluators of `config.evals`."""
        return {}
