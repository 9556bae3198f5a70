"""Metrics and result-file scoring, one module per task (`vqa`, `caption`, ...).

Each task module defines `score_file(results_path, annotations_path) -> {metric: value}` for
result files in the format the benchmark's server or official script takes (ours, or one the
official code wrote), so `mplug-jax score` compares systems on the same metric code. Bad input
files (not JSON, empty, duplicate queries, null / NaN values) raise
`checks.ScoreInputError` naming the file and the first bad entry.
"""
from __future__ import annotations

import importlib
import os
import pkgutil


# The tasks with a `score_file` (what `available()` finds), named here so that the CLI can list
# them without importing every module.
TASKS = ("caption", "grounding", "nlvr2", "retrieval", "snli_ve", "video_qa", "vqa")


def available() -> list[str]:
    """Tasks whose module in this package defines `score_file`."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if hasattr(importlib.import_module(f"{__name__}.{m.name}"), "score_file"))


def score_file(task: str, results: str, annotations: str, **options) -> dict:
    """Score result file `results` of `task` against `annotations` (official formats);
    `options`: keyword arguments of that task's `score_file` (e.g. grounding's `corners`)."""
    if task not in available():
        raise ValueError(f"no scorer for task {task!r}; valid: {available()}")
    module = importlib.import_module(f"{__name__}.{task}")
    for what, path in (("results", results), ("annotations", annotations)):
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"--{what} file {path!r} does not exist")
    return module.score_file(results, annotations, **options)
