"""What the task-fixture parity tests (retrieval, grounding) share: where a fixture is, its
arrays computed once, and the generic entry point run on those arrays."""
import json
import pathlib

import numpy as np
import pytest

from mplug_jax import parity

SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "fixtures-tasks"


def locate(name: str, what: str):
    """(folder of task fixture `name` in ../shared/fixtures-tasks, the mark that skips a test
    when it is absent)."""
    fx = SHARED / name
    return fx, pytest.mark.skipif(not (fx / "expected.npz").is_file(),
                                  reason=f"{fx} absent: official {what} parity fixture not "
                                         "available")


def compute(fx: pathlib.Path, outputs) -> tuple[dict, dict, dict]:
    """(meta.json, `outputs(fixture)`: our arrays, expected.npz) of a fixture."""
    with open(fx / "meta.json") as f:
        meta = json.load(f)
    return meta, outputs(str(fx)), dict(np.load(fx / "expected.npz"))


def run_parity_on(fx: pathlib.Path, module, name: str, got: dict, monkeypatch) -> list:
    """`parity.run_parity` on the fixture (the dispatch on meta.json task) with
    `module.<name>` (the kind's outputs function) answering the computed `got`; asserts every
    row passes and returns the rows."""
    monkeypatch.setattr(module, name, lambda fixture, conv=None: got)
    rows = parity.run_parity(str(fx))
    bad = [r for r in rows if not r.ok]
    assert not bad, parity.format_table(bad)
    return rows
