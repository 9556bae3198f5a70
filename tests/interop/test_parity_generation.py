"""`mplug-jax parity` checks generation (docs/fixtures.md#generation-outputs) when a fixture has it:
a corrupted expected id or text makes exactly the matching rows fail."""
import json
import shutil

import numpy as np
import pytest

from conftest import fixture_dirs
from mplug_jax.parity import format_table, run_parity

GEN_FIXTURES = [f for f in fixture_dirs() if (f / "generation.npz").is_file()]


@pytest.mark.skipif(not GEN_FIXTURES, reason="no ../shared fixture with generation outputs")
def test_generation_parity_fails_on_a_corrupted_expected_id_and_text(tmp_path):
    fx = tmp_path / "fx"
    shutil.copytree(GEN_FIXTURES[0], fx)
    gen = dict(np.load(fx / "generation.npz"))
    gen["eosbias_nbest_ids"] = gen["eosbias_nbest_ids"].copy()
    gen["eosbias_nbest_ids"][1, 2, 1] += 1  # one generated token of one n-best entry
    np.savez(fx / "generation.npz", **gen)
    g = json.loads((fx / "generation.json").read_text())
    g["runs"]["plain"]["examples"][0]["nbest"][3]["text"] += "x"
    (fx / "generation.json").write_text(json.dumps(g))

    rows = run_parity(str(fx))
    names = {r.name for r in rows}
    for run in json.loads((fx / "meta.json").read_text())["generation"]["runs"]:
        assert {f"gen:{run}:{n}" for n in ("top1_ids", "nbest_ids", "hyp_ids", "trace_token",
                                           "trace_parent", "end_step", "nbest_score",
                                           "trace_cum_logprob", "texts")} <= names
    bad = {r.name for r in rows if not r.ok}
    assert bad == {"gen:eosbias:nbest_ids", "gen:plain:texts"}, format_table(rows)
