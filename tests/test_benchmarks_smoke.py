"""Smoke test of the model benchmarks: each `main --smoke` runs on tiny dims (op-by-op, constant
weights) and writes a JSON with the expected keys, positive timings, ratios derived from those
timings and the machine's load average. The timing helpers are checked on fake workloads; how
fast anything runs is not checked."""
import importlib.util
import json
import pathlib
import statistics
import sys

import jax.numpy as jnp
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


def _check_header(out: dict, name: str) -> None:
    assert HEADER <= set(out) and out["benchmark"] == name
    for key in ("load_avg_start", "load_avg_end"):  # 1/5/15-minute load averages
        assert len(out[key]) == 3 and all(isinstance(x, float) and x >= 0 for x in out[key])
    assert out["settings"]["smoke"] is True and out["settings"]["repeats"] == 1
    # Under pytest jax is imported before the benchmark: it must say it left XLA_FLAGS alone.
    assert "already imported" in out["threads"]["note"]


def _smoke_results(name: str, tmp_path) -> dict:
    """Run benchmarks/<name>.py `--smoke` into `tmp_path`; check its JSON header and that the
    figure was written; return the JSON."""
    res = _load(name).main(["--smoke", "--out-dir", str(tmp_path)])
    stem = tmp_path / "{}_smoke_cpu{}".format(name, res["device"]["cpus"])
    out = json.loads(stem.with_suffix(".json").read_text())
    _check_header(out, name)
    assert stem.with_suffix(".png").is_file()
    return out


def _check_timing(run: dict, repeats: int) -> None:
    assert len(run["times_s"]) == repeats and all(t > 0 for t in run["times_s"])
    assert run["median_s"] == statistics.median(run["times_s"]) > 0 and run["warmup_s"] > 0


def test_fusion_smoke(tmp_path):
    out = _smoke_results("fusion", tmp_path)
    assert {"runs", "median_s", "ratios", "paper", "official"} <= set(out)
    assert {"device_kind", "platform", "jax"} <= set(out["device"])
    expected = {"skip_S1", "skip_S2", "skip_S3", "skip_S6", "connected", "coattn", "asym",
                "layer_a", "layer_c"}
    assert expected <= set(out["runs"])
    assert out["runs"]["skip_S1"]["pattern"] == "accccc"
    assert out["runs"]["connected"]["pattern"] == "mmmmmm"
    for name, run in out["runs"].items():
        _check_timing(run, repeats=1)
        assert out["median_s"][name] == run["median_s"]
    med = out["median_s"]
    ours = {row["name"]: row["ours"] for row in out["ratios"]}
    assert ours["fusion time S=1 / S=6"] == pytest.approx(med["skip_S1"] / med["skip_S6"])
    assert ours["one connected layer / one co-attention layer"] == pytest.approx(
        med["layer_c"] / med["layer_a"])
    for row in out["ratios"]:
        assert {"name", "ours", "paper", "official_note"} <= set(row)
        assert row["ours"] > 0


def test_forward_smoke(tmp_path):
    out = _smoke_results("forward", tmp_path)
    assert {"rows", "official", "experiments"} <= set(out)
    assert out["experiments"] == {}  # off by default in smoke runs
    expected = {"visual", "text", "fusion_S1", "fusion_S3", "fusion_S6", "decoder",
                "layer_coattn", "layer_connected", "vqa_forward_S3"}
    assert set(out["rows"]) == expected
    for row in out["rows"].values():
        assert {"ours_median_s", "official_median_s", "official_over_ours"} <= set(row)
        _check_timing({"times_s": row["ours_times_s"], "median_s": row["ours_median_s"],
                       "warmup_s": row["ours_warmup_s"]}, repeats=1)
        assert row["official_median_s"] > 0
        assert row["official_over_ours"] == pytest.approx(
            row["official_median_s"] / row["ours_median_s"])


def test_timing_helpers_count_calls_and_take_the_median():
    common = _load("common")
    calls = []

    def work(tag):
        calls.append(tag)
        return jnp.ones(3)

    one = common.time_call(work, "x", repeats=4, warmup=2)
    assert calls == ["x"] * 6
    _check_timing(one, repeats=4)
    calls.clear()
    both = common.time_interleaved({"a": (work, ("a",)), "b": (work, ("b",))}, repeats=3)
    # Warm-ups first, then round-robin, so load changes hit every configuration alike.
    assert calls == ["a", "b"] + ["a", "b"] * 3
    for run in both.values():
        _check_timing(run, repeats=3)
        assert run["min_s"] == min(run["times_s"])
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None and common.ratio(1.0, 0) is None
    assert common.fmt(None) == "n/a" and common.fmt(1 / 3, ".2f") == "0.33"


def test_generate_smoke(tmp_path):
    out = _smoke_results("generate", tmp_path)
    assert set(out["rows"]) == {"vqa_greedy", "vqa_beam5", "caption_greedy", "caption_beam5"}
    for row in out["rows"].values():
        for k in ("cache", "recompute"):
            _check_timing({"times_s": row[f"{k}_times_s"], "median_s": row[f"{k}_median_s"],
                           "warmup_s": row[f"{k}_warmup_s"]}, repeats=1)
        assert row["speedup"] == pytest.approx(row["recompute_median_s"] / row["cache_median_s"])
    assert out["rows"]["caption_beam5"]["length"] > out["rows"]["vqa_beam5"]["length"]


def test_mplug2_smoke(tmp_path):
    out = _smoke_results("mplug2", tmp_path)
    frames, latents = out["settings"]["frames"], out["settings"]["latents"]
    assert len(frames) == 2 and len(latents) == 2
    assert out["settings"]["latent_frames"] == frames[-1:]  # smoke: the sweep at the most frames
    expected = ({f"encoder_T{t}_{k}" for t in frames for k in ("lt", "nolt")}
                | {f"universal_T{frames[-1]}_L{n}" for n in latents})
    assert set(out["rows"]) == expected
    rows = out["rows"]
    for row in rows.values():
        _check_timing(row, repeats=1)
        assert row["peak_bytes"] > 0 and row["xla_gflops"] > 0 and row["compile_s"] > 0
    for t in frames:
        on, off = rows[f"encoder_T{t}_lt"], rows[f"encoder_T{t}_nolt"]
        # Dropping the LT modules removes parameters and work, never adds any.
        assert on["params"] > off["params"] and on["xla_gflops"] > off["xla_gflops"]
        lt = out["ratios"]["lt_overhead_pct"][f"encoder_T{t}"]
        assert lt["time"] == pytest.approx(100 * (on["median_s"] / off["median_s"] - 1))
        # One round: the paired ratio is the ratio of the two single times.
        assert lt["time_paired"] == pytest.approx(lt["time"])
        assert lt["params"] > 0
    lo, hi = frames
    fr = out["ratios"]["frames"][f"encoder_lt_T{hi}_over_T{lo}"]
    assert fr["time"] == pytest.approx(rows[f"encoder_T{hi}_lt"]["median_s"]
                                       / rows[f"encoder_T{lo}_lt"]["median_s"])
    assert fr["xla_flops"] > 1 and fr["linear"] == hi / lo
    small, big = latents
    t = frames[-1]  # more latent queries: more parameters and flops
    assert rows[f"universal_T{t}_L{big}"]["params"] > rows[f"universal_T{t}_L{small}"]["params"]
    assert out["ratios"]["latents"][f"universal_T{t}_L{big}_over_L{small}"]["xla_flops"] > 1
    share = out["ratios"]["universal_share"][f"T{t}_L{out['settings']['preset_latents']}"]
    assert 0 < share["of_encoder_lt_flops"] < 1  # the encoder case includes the universal layers


def test_input_pipeline_smoke(tmp_path):
    """Both train pipelines at their official sizes: reference loop, fast loop and the grain
    pipeline (in-process here), the per-core figure and the cores per GPU it implies, the
    load average at start and end, and the reduced-decoding quality check."""
    res = _load("input_pipeline").main(["--smoke", "--workers", "0", "--out", str(tmp_path)])
    stem = tmp_path / "input_pipeline_smoke_cpu{}".format(res["machine"]["cpus"])
    out = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").is_file()
    for key in ("load_avg_start", "load_avg_end"):
        assert len(out[key]) == 3 and all(isinstance(x, float) and x >= 0 for x in out[key])
    assert out["machine"]["cpus"] >= 1 and out["machine"]["cpu_model"]
    assert out["photo_size"] == [640, 480] and out["quality"] == 90
    assert set(out["pipelines"]) == {"pretrain", "vqa"}
    assert out["pipelines"]["vqa"]["settings"]["image_size"] == 384
    assert out["pipelines"]["pretrain"]["settings"]["augment"]["crop_scale"] == [0.2, 1.0]
    for p in out["pipelines"].values():
        assert set(p["runs"]) == {"reference loop", "fast loop", "grain workers=0",
                                  "grain workers=0 read_threads=4", "grain workers=0 float32",
                                  "fast loop cv2", "grain workers=0 cv2", "fast loop official",
                                  "grain workers=0 official"}
        assert p["runs"]["grain workers=0 cv2"]["backend"] == "cv2"
        assert p["runs"]["grain workers=0"]["backend"] == "pil"
        assert p["per_core_cv2_from"] == "fast loop cv2"
        assert p["per_core_official_from"] == "fast loop official"
        assert p["images_per_s_per_core_cv2"] == p["runs"]["fast loop cv2"]["images_per_cpu_s"]
        assert p["cores_per_gpu_needed_cv2"] == pytest.approx(
            1000 / p["images_per_s_per_core_cv2"])
        assert p["runs"]["grain workers=0 float32"]["image_dtype"] == "float32"
        assert p["runs"]["grain workers=0"]["read_threads"] == 1
        assert p["runs"]["grain workers=0 read_threads=4"]["read_threads"] == 4
        assert p["runs"]["grain workers=0"]["cpu_ms_per_image_main_process"] > 0
        for run in p["runs"].values():
            assert run["images_per_s"] > 0 and run["images_per_cpu_s"] > 0
        assert p["runs"]["grain workers=0"]["image_dtype"] == "uint8"
        # No 1-worker run here: the per-core figure comes from the one-process fast loop.
        assert p["per_core_from"] == "fast loop"
        assert p["images_per_s_per_core"] == p["runs"]["fast loop"]["images_per_cpu_s"]
        assert p["images_per_s_per_core_wall_clock"] == p["runs"]["fast loop"]["images_per_s"]
        assert p["cores_per_gpu_needed"] == pytest.approx(1000 / p["images_per_s_per_core"])
        stages = p["stages"]["cpu_ms_per_image"]
        assert {"decode", "crop_resize", "randaugment_reference", "randaugment_fast",
                "normalize_float32", "tokenise"} <= set(stages)
        assert stages["decode"] > 0 and stages["crop_resize"] > 0
        assert stages["crop_resize_cv2"] > 0 and stages["randaugment_cv2"] >= 0
    for kind, b in out["backend_quality"].items():
        assert b["images"] == 4 and b["image_size"] in (256, 384), kind
        assert 0 < b["mean_abs_diff_resize_cv2_vs_pil_bicubic"] < 3.0
        assert b["mean_abs_diff_pil_bilinear_vs_bicubic"] > 0 and b["psnr_db_cv2_vs_pil"] > 25
    q = out["reduced_decode_quality"]
    assert q["reduced_images"] == q["images"] == 4 and q["photo_size"] == [1600, 1200]
    assert 0 < q["mean_abs_diff_reduced_vs_full"] < 2 * q["mean_abs_diff_bilinear_vs_bicubic"]
