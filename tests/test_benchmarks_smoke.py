"""Smoke test of the model benchmarks: each `main --smoke` runs on tiny dims (op-by-op, constant
weights) and writes a JSON with the expected keys. Timings themselves are not checked."""
import importlib.util
import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import benchmarks/<name>.py (the folder is not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HEADER = {"benchmark", "device", "threads", "settings", "load_avg_start", "load_avg_end"}


def test_fusion_smoke(tmp_path):
    res = _load("fusion").main(["--smoke", "--out-dir", str(tmp_path)])
    out = json.loads((tmp_path / "fusion_smoke_cpu{}.json".format(res["device"]["cpus"]))
                     .read_text())
    assert HEADER <= set(out) and {"runs", "median_s", "ratios", "paper", "official"} <= set(out)
    assert {"device_kind", "platform", "jax"} <= set(out["device"])
    expected = {"skip_S1", "skip_S2", "skip_S3", "skip_S6", "connected", "coattn", "asym",
                "layer_a", "layer_c"}
    assert expected <= set(out["runs"])
    assert out["runs"]["skip_S1"]["pattern"] == "accccc"
    assert out["runs"]["connected"]["pattern"] == "mmmmmm"
    assert all(r["median_s"] > 0 for r in out["runs"].values())
    for row in out["ratios"]:
        assert {"name", "ours", "paper", "official_note"} <= set(row)
        assert row["ours"] > 0
    assert out["ratios"][0]["official_note"] == pytest.approx(0.601 / 0.216)
    assert (tmp_path / "fusion_smoke_cpu{}.png".format(res["device"]["cpus"])).is_file()


def test_forward_smoke(tmp_path):
    res = _load("forward").main(["--smoke", "--out-dir", str(tmp_path)])
    out = json.loads((tmp_path / "forward_smoke_cpu{}.json".format(res["device"]["cpus"]))
                     .read_text())
    assert HEADER <= set(out) and {"rows", "official", "experiments"} <= set(out)
    expected = {"visual", "text", "fusion_S1", "fusion_S3", "fusion_S6", "decoder",
                "layer_coattn", "layer_connected", "vqa_forward_S3"}
    assert set(out["rows"]) == expected
    for row in out["rows"].values():
        assert {"ours_median_s", "official_median_s", "official_over_ours"} <= set(row)
        assert row["ours_median_s"] > 0 and row["official_median_s"] > 0
    assert out["rows"]["visual"]["official_median_s"] == 1.359
    assert (tmp_path / "forward_smoke_cpu{}.png".format(res["device"]["cpus"])).is_file()
