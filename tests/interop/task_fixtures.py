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


def task_fixture(module):
    """For the parity module of a task kind (`mplug_jax.parity.<kind>`): the skip mark of its
    fixture `<kind>-tiny` and a module-scoped pytest fixture giving `compute(folder,
    module.<kind>_outputs)` once. Assign both to module names (the fixture's name is the one a
    test asks for): `needs_fixture, computed = task_fixture(module)`."""
    kind = module.__name__.rsplit(".", 1)[-1]
    fx, needs = locate(f"{kind}-tiny", kind)
    outputs = getattr(module, f"{kind}_outputs")

    @pytest.fixture(scope="module")
    def computed():
        """Our outputs for the fixture, computed once."""
        return compute(fx, outputs)

    return needs, computed


def run_parity_on(fx: pathlib.Path, module, name: str, got: dict, monkeypatch) -> list:
    """`parity.run_parity` on the fixture (the dispatch on meta.json task) with
    `module.<name>` (the kind's outputs function) answering the computed `got`; asserts every
    row passes and returns the rows."""
    monkeypatch.setattr(module, name, lambda fixture, conv=None: got)
    rows = parity.run_parity(str(fx))
    bad = [r for r in rows if not r.ok]
    assert not bad, parity.format_table(bad)
    return rows


def check_entry_point(module, computed: tuple, monkeypatch, *, required: set,
                      given=()) -> None:
    """`run_parity_on` the fixture of `task_fixture(module)` with its computed arrays: every row
    passes, and every expected array but those in `given` and each name in `required` is a
    row."""
    kind = module.__name__.rsplit(".", 1)[-1]
    _, got, expected = computed
    names = {r.name for r in run_parity_on(SHARED / f"{kind}-tiny", module, f"{kind}_outputs",
                                           got, monkeypatch)}
    assert set(expected) - set(given) <= names  # every output array is compared
    assert required <= names
