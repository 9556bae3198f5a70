"""Evaluators by name: `config.evals.<name>.type` -> `mplug_jax.evaluators.<type>.Evaluator`.

An evaluator module defines `Evaluator(predict_fns, ecfg, config, mesh)` with `run(params) ->
{metric: value}` and `report(result) -> str`; result files (e.g. a benchmark server's
submission) go in `result[FILES]` = {file name: JSON-serialisable object}, which the caller
writes with `write_files` (the trainer under `<workdir>/results/<eval>_step<N>/`); it builds its own eval input from `config` and
takes the task's predict functions by name, so it imports nothing from the trainer or a task.
When the trainer runs a block: `every_steps`, `every_epochs`, `from_epoch`, `enabled` and
`config.test_on_best` (`mplug_jax.selection`). A block's `input` (a dict of `config.input`
fields) replaces those fields for that evaluator only, e.g. a test split's annotation files
beside the validation split's (`build`).
"""
from __future__ import annotations

import importlib
import json
import pkgutil

from etils import epath

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
    return module.Evaluator(predict_fns, ecfg, with_input(config, ecfg, name), mesh=mesh)


def with_input(config, ecfg, name: str = "<eval>"):
    """`config`, or a copy whose `input` fields are replaced by the block's `input` dict."""
    override = ecfg.get("input")
    if not override:
        return config
    unknown = sorted(k for k in override if k not in config.input)
    if unknown:
        raise ValueError(f"config.evals.{name}.input names {unknown}, which are not fields of "
                         f"config.input")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.input.update(dict(override))
    return config


def from_config(config, predict_fns: dict, mesh=None) -> dict:
    """{name: evaluator} for every enabled block of `config.evals`."""
    return {name: build(name, ecfg, config, predict_fns, mesh)
            for name, ecfg in config.evals.items() if ecfg.get("enabled", True)}


FILES = "files"  # key of a result holding {file name: JSON-serialisable content}


def write_files(result: dict, directory) -> list[str]:
    """Write `result[FILES]` (if any) as JSON files under `directory` (process 0 only; created
    as needed); removes the entry from `result`. Returns the paths written."""
    import jax
    files = result.pop(FILES, None) or {}
    if not files or jax.process_index() != 0:
        return []
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = directory / name
        path.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")
        paths.append(str(path))
    return paths


def scalars(result: dict) -> dict[str, float]:
    """The int/float entries of an evaluator result (what goes to JSONL / TensorBoard)."""
    return {k: v for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
