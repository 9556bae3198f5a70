"""`benchmarks/gpu_check.py --smoke`: the one-GPU check's CPU dry run at tiny dims. Every part
runs as a subprocess under its budget; one part is given 1 s so that the timeout path (kill,
keep what was printed, carry on) is exercised; the summary names the device."""
import json

import pytest
from test_benchmarks_smoke import _load  # benchmarks/<name>.py as a module


@pytest.mark.integration
def test_gpu_check_cpu_dry_run(tmp_path):
    res = _load("gpu_check").main(["--smoke", "--out-dir", str(tmp_path)])
    path = tmp_path / "gpu_check_smoke_cpu.json"
    out = json.loads(path.read_text())
    assert out["device_kind"] == res["device_kind"] == "cpu"
    assert out["machine"]["device_kind"] == "cpu" and len(out["load_avg_at_write"]) == 3
    parts, summary = out["parts"], out["summary"]
    assert list(parts) == ["probe", "pretrain_default", "ladder_remat_full", "generate",
                           "input_feed"]
    for name in ("probe", "pretrain_default", "generate", "input_feed"):
        assert parts[name]["status"] == "ok", (name, parts[name]["output_tail"][-1500:])
        assert parts[name]["seconds"] <= parts[name]["budget_s"] + 5
    assert summary["probe"]["platform"] == "cpu" and summary["probe"]["num_devices"] == 1
    step = summary["pretrain_default"]
    assert step["samples_per_s"] > 0 and 0 < step["mfu"] < 1 and step["batch"] == 8
    assert "tiny" in step["config"]
    assert parts["ladder_remat_full"]["status"] == "timeout"  # 1 s budget: killed, recorded
    assert parts["ladder_remat_full"]["seconds"] < 10
    gen = summary["generate"]
    assert gen and all(v > 0 for v in gen.values())
    feed = summary["input_feed"]["images_per_s_per_core"]
    assert set(feed) == {"pretrain", "vqa"} and all(v > 0 for v in feed.values())
    assert set(summary["input_feed"]["cores_per_gpu_needed"]) == {"pretrain", "vqa"}
    assert out["elapsed_s"] < out["total_budget_s"]
