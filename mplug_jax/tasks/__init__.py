"""Tasks by name: `config.task.name` -> its module and that module's `Task` class.

A plain name (`vqa`) is the module `mplug_jax.tasks.<name>`; a dotted name (`mplug2.video_qa`)
is `mplug_jax.<family>.tasks.<name>`, a model family's own task package (as big_vision resolves
`proj.*` names). A task owns everything the one trainer does not know: its model class
(`Task.model_cls`, from `config.model`), its train input, its loss and the state it carries
besides the params (momentum params, queues), its pretrained initialisation and its predict
functions for the evaluators. The protocol and the shared defaults are in
`mplug_jax.tasks.base`. Adding a task is adding a module to one of these packages.
"""
from __future__ import annotations

import importlib
import pkgutil

from mplug_jax.task_names import canonical

# Families with a task package of their own: mplug_jax.<family>.tasks.
FAMILIES = ("mplug2",)


def _module_names(package: str) -> list[str]:
    module = importlib.import_module(package)
    return [m.name for m in pkgutil.iter_modules(module.__path__) if m.name != "base"]


def available() -> list[str]:
    """Every task name: this package's modules (excluding `base`) and `<family>.<name>`."""
    names = _module_names(__name__)
    for family in FAMILIES:
        names += [f"{family}.{n}" for n in _module_names(f"mplug_jax.{family}.tasks")]
    return sorted(names)


def module_name(name: str) -> str:
    """The module holding task `name`: `mplug_jax.tasks.vqa`, `mplug_jax.mplug2.tasks.video_qa`."""
    name = canonical(name)
    if "." in name:
        family, leaf = name.split(".", 1)
        return f"mplug_jax.{family}.tasks.{leaf}"
    return f"{__name__}.{name}"


def get_class(name: str) -> type:
    """The `Task` class of task `name`; a clear error for an unknown name."""
    if canonical(name) not in available():
        raise ValueError(f"unknown task {name!r} (config.task.name); valid: {available()}")
    module = importlib.import_module(module_name(name))
    if not hasattr(module, "Task"):
        raise ValueError(f"{module.__name__} defines no `Task` class")
    return module.Task


def build(config, steps_per_epoch: int = 1):
    """The task of `config.task.name`, built from the whole run config."""
    return get_class(config.task.name)(config, steps_per_epoch=steps_per_epoch)


def model(config):
    """The model (eval mode) of a run config's task: what that run's checkpoints hold the
    params of (`workdir.restore_params` reads the arrays alone)."""
    return build(config).model
