"""Tasks by name: `config.task.name` -> module `mplug_jax.tasks.<name>` and its `Task` class.

A task owns everything the one trainer does not know: its model (from `config.model`), its
train input, its loss and the state it carries besides the params (momentum params, queues),
its pretrained initialisation and its predict functions for the evaluators. The protocol and
the shared defaults are in `mplug_jax.tasks.base`. Adding a task is adding a module here.
"""
from __future__ import annotations

import importlib
import pkgutil


def available() -> list[str]:
    """Names of the task modules in this package (excluding `base`)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def get_class(name: str) -> type:
    """The `Task` class of `mplug_jax.tasks.<name>`; a clear error for an unknown name."""
    if name not in available():
        raise ValueError(f"unknown task {name!r} (config.task.name); valid: {available()}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(module, "Task"):
        raise ValueError(f"mplug_jax.tasks.{name} defines no `Task` class")
    return module.Task


def build(config, steps_per_epoch: int = 1):
    """The task of `config.task.name`, built from the whole run config."""
    return get_class(config.task.name)(config, steps_per_epoch=steps_per_epoch)
