"""Parity with the official implementations (`mplug-jax parity --fixture DIR`).

Each fixture folder (docs/fixtures.md) holds an official checkpoint, inputs and the official
outputs; its kind picks the module that re-runs our code on it: `vqa_caption` (VQA and caption
forwards, generation), `retrieval`, `grounding` (the task fixtures, `meta.json task`) and
`mplug_jax.mplug2.parity` (mPLUG-2 video fixtures). `rows` has what they share. This package sits
above the tasks (it runs their losses); conversion of checkpoints is `mplug_jax.interop`.
"""
from __future__ import annotations

import json
import os

from mplug_jax.parity.rows import Row, format_table

__all__ = ["Row", "format_table", "run_parity"]

TASK_FIXTURES = ("retrieval", "grounding")


def run_parity(fixture: str, image_atol: float = 1e-4) -> list[Row]:
    """Run every check of a fixture folder; returns one Row per compared output."""
    with open(os.path.join(fixture, "meta.json")) as f:
        meta = json.load(f)
    from mplug_jax.mplug2.parity import is_mplug2_fixture, run_mplug2_parity
    if is_mplug2_fixture(meta):  # docs/fixtures.md#mplug-2-video-fixtures
        return run_mplug2_parity(fixture, meta)
    task = meta.get("task", "vqa")
    if task in ("vqa", "caption"):
        from mplug_jax.parity.vqa_caption import run_vqa_caption_parity
        return run_vqa_caption_parity(fixture, meta, image_atol)
    if task == "retrieval":  # docs/fixtures.md#retrieval-fixtures
        from mplug_jax.parity.retrieval import run_retrieval_parity
        return run_retrieval_parity(fixture, meta, image_atol)
    if task == "grounding":  # docs/fixtures.md#grounding-fixtures
        from mplug_jax.parity.grounding import run_grounding_parity
        return run_grounding_parity(fixture, meta, image_atol)
    raise ValueError(f"{fixture}: no parity check for task {task!r} (known: vqa, caption, "
                     f"{', '.join(TASK_FIXTURES)})")
