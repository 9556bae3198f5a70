"""Evaluators by name: `config.evals.<name>.type` -> `mplug_jax.evaluators.<type>.Evaluator`.

An evaluator module defines `Evaluator(predict_fns, ecfg, config, mesh)` with `run(params) ->
{metric: value}` and `report(result) -> str`; it builds its own eval input from `config` and
takes the task's predict functions by name, so it imports nothing from the trainer or a task.
`ecfg.every_steps` (0 = only after training) says when the trainer runs it.
"""
from __future__ import annotations

import importlib
import pkgutil

from mplug_jax import evaluators as _package


def available() -> list[str]:
    """Evaluator types (the modules of this package besides `common`)."""
    return sorted(m.name for m in pkgutil.iter_modules(_package.__path__) if m.name != "common")


def build(name: str, ecfg, config, predict_fns: dict, mesh=None):
    """The evaluator of `config.evals.<name>` (block `ecfg`)."""
    kind = ecfg.get("type")
    if kind not in available():
        raise ValueError(f"config.evals.{name}.type={kind!r} is not an evaluator; valid: "
                         f"{available()}")
    module = importlib.import_module(f"{_package.__name__}.{kind}")
    missing = [f for f in getattr(module, "PREDICT_FNS", ()) if f not in predict_fns]
    if missing:
        raise ValueError(f"evaluator {kind!r} (config.evals.{name}) needs predict fns "
                         f"{missing}, which task {config.task.name!r} does not provide "
                         f"(it has {sorted(predict_fns)})")
    return module.Evaluator(predict_fns, ecfg, config, mesh=mesh)


def from_config(config, predict_fns: dict, mesh=None) -> dict:
    """{name: evaluator} for every block of `config.evals`."""
    return {name: build(name, ecfg, config, predict_fns, mesh)
            for name, ecfg in config.evals.items()}


def due(ecfg, step: int) -> bool:
    """Whether a periodic evaluation is due after train step `step`."""
    every = int(ecfg.get("every_steps", 0) or 0)
    return every > 0 and step % every == 0
