"""One-GPU check in one command, under a hard time budget (default 470 s, all parts).

Parts, each a subprocess with its own budget (killed when it runs over; what it printed so far
is kept), in this order:
  probe             the device JAX sees (device_kind names the results file)
  pretrain_default  base pretraining step at the default recipe (bf16, full remat, scanned
                    layers), batch 128: samples/s, MFU (hand-counted FLOPs / the device's
                    peak from `mplug_jax.metrics.PEAK_FLOPS`), peak memory
  ladder_*          the same step at other remat policies / batches (a small ladder)
  rng_*             the default recipe with config.rng_impl rbg / unsafe_rbg (vs threefry)
  generate          cached generation (greedy / beam 5, VQA / caption) at batch 32, base dims
  input_feed        the host's input pipeline (benchmarks/input_pipeline.py): pretraining and
                    VQA images per CPU second (one grain worker) and the cores per GPU they need
After every part the summary is rewritten, so a crash or a kill still leaves what was done:
benchmarks/results/gpu_check_<device>.json (device = jax.devices()[0].device_kind).

    bash benchmarks/gpu_check.sh                  # on the GPU machine, <= 8 minutes
    python benchmarks/gpu_check.py --smoke --out-dir /tmp/g   # CPU dry run at tiny dims
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import: the parent process never touches the GPU)

BENCH = os.path.dirname(os.path.abspath(__file__))
PRETRAIN = [sys.executable, os.path.join(BENCH, "pretrain_step.py")]


def parts(smoke: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, budget in seconds) of every part; `smoke`: tiny dims, tiny budgets."""
    if smoke:
        # Budgets fit a 2-core CPU shared with other jobs (idle, the whole run takes ~1 min).
        step = [*PRETRAIN, "--variant", "tiny", "--batch", "8", "--steps", "2", "--warmup", "1",
                "--devices", "1", "--config.input.max_tokens=8"]
        return [
            ("probe", [sys.executable, "-c", _PROBE], 60),
            ("pretrain_default", step, 300),
            ("ladder_remat_full", [*step, "--remat", "full"], 1),  # forced timeout: partial
            ("generate", [sys.executable, os.path.join(BENCH, "generate.py"), "--smoke"], 200),
            ("input_feed", [sys.executable, os.path.join(BENCH, "input_pipeline.py"),
                            "--images", "4", "--measure", "8", "--grain-measure", "8",
                            "--batch-size", "4"], 120),
        ]
    step = [*PRETRAIN, "--variant", "base", "--steps", "8", "--warmup", "2"]
    return [
        ("probe", [sys.executable, "-c", _PROBE], 40),
        ("pretrain_default", [*step, "--batch", "128"], 110),
        ("ladder_remat_dots_b128", [*step, "--batch", "128", "--remat", "dots"], 55),
        ("ladder_remat_full_b256", [*step, "--batch", "256"], 60),
        ("ladder_remat_none_b64", [*step, "--batch", "64", "--remat", "none"], 50),
        ("rng_rbg", [*step, "--batch", "128", "--config.rng_impl=rbg"], 50),
        ("rng_unsafe_rbg", [*step, "--batch", "128", "--config.rng_impl=unsafe_rbg"], 50),
        ("generate", [sys.executable, os.path.join(BENCH, "generate.py"), "--batch", "32",
                      "--repeats", "2"], 70),
        ("input_feed", [sys.executable, os.path.join(BENCH, "input_pipeline.py"),
                        "--images", "64", "--measure", "128", "--grain-measure", "128"], 45),
    ]


_PROBE = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': d.platform, "
          "'device_kind': d.device_kind, 'num_devices': len(jax.devices()), "
          "'jax': jax.__version__}))")


def run_part(cmd: list[str], budget: float, out_dir: str) -> dict:
    """Run `cmd` (its results go to `out_dir`) for at most `budget` s; status ok / failed /
    timeout, seconds, the output's tail and every JSON file the part wrote."""
    os.makedirs(out_dir, exist_ok=True)
    flag = "--out" if cmd[1].endswith("input_pipeline.py") else "--out-dir"
    if cmd[1] != "-c":
        cmd = [*cmd, flag, out_dir]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The parts choose their own device count (pretrain_step --devices): drop an inherited one
    # (the test suite's 8 fake CPU devices), which would override theirs.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(budget, 0.1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the part and any workers it started
            proc.wait()
            status = "timeout"
        log.seek(0)
        output = log.read()
    row = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "budget_s": budget,
           "command": " ".join(os.path.relpath(c, common.REPO) if c.startswith(common.REPO)
                               else c for c in cmd),
           "output_tail": output[-4000:]}
    files = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        with open(path) as f:
            files[os.path.basename(path)] = json.load(f)
    if files:
        row["results"] = files
    return row


def summarise(name: str, row: dict) -> dict:
    """The headline numbers of a part (samples/s, MFU, per-answer seconds, images/s)."""
    out: dict = {}
    for data in row.get("results", {}).values():
        for r in data.get("rows", []) if isinstance(data.get("rows"), list) else []:
            out.update(samples_per_s=round(r["samples_per_s"], 2), mfu=round(r["mfu"], 4),
                       step_time_s=round(r["step_time_s"], 4), batch=r["batch"],
                       peak_mem_gib=round(r["peak_mem_mib"] / 1024, 2),
                       compile_s=round(r["compile_s"], 1), config=r["config"])
        if isinstance(data.get("rows"), dict):  # generate.py
            out.update({f"{k}_cache_per_answer_s": round(v["cache_per_answer_s"], 5)
                        for k, v in data["rows"].items()})
        pipes = data.get("pipelines")
        if isinstance(pipes, dict):  # input_pipeline.py: images per CPU second, 1 worker
            for key in (f"{what}{backend}" for what in ("images_per_s_per_core",
                                                        "cores_per_gpu_needed")
                        for backend in ("", "_official", "_cv2")):
                found = {k: round(v[key], 2 if key.startswith("cores") else 1)
                         for k, v in pipes.items() if isinstance(v, dict) and key in v}
                if found:
                    out[key] = found
    if name == "probe" and row["status"] == "ok":
        lines = [ln for ln in row["output_tail"].splitlines() if ln.startswith("{")]
        if lines:
            out.update(json.loads(lines[-1]))
    if not out and row["status"] != "ok":  # keep the lines a part printed before it stopped
        out["printed"] = [ln for ln in row["output_tail"].splitlines()
                          if re.search(r"samples/s|speedup|images_per_s|s/step", ln)][-10:]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny dims, tiny budgets (CPU test)")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for everything (default 470, --smoke 900); parts that no "
                        "longer fit are skipped")
    p.add_argument("--parts", help="comma-separated subset of the part names")
    p.add_argument("--out-dir", default=common.RESULTS)
    args = p.parse_args(argv)
    if args.total_budget is None:
        args.total_budget = 900.0 if args.smoke else 470.0
    t0 = time.perf_counter()
    todo = parts(args.smoke)
    if args.parts:
        names = args.parts.split(",")
        unknown = set(names) - {n for n, _, _ in todo}
        if unknown:
            p.error(f"unknown parts {sorted(unknown)}; valid: {[n for n, _, _ in todo]}")
        todo = [t for t in todo if t[0] in names]
    work = tempfile.mkdtemp(prefix="gpu_check_")
    result = {"benchmark": "gpu_check", "smoke": args.smoke, "total_budget_s": args.total_budget,
              "load_avg_start": common.load_average(), "parts": {}, "summary": {}}
    device = "unknown"
    path = None
    for name, cmd, budget in todo:
        left = args.total_budget - (time.perf_counter() - t0)
        if left < min(budget, 20.0):
            result["parts"][name] = {"status": "skipped (total budget spent)", "budget_s": budget}
        else:
            row = run_part(cmd, min(budget, left), os.path.join(work, name))
            result["parts"][name] = row
            result["summary"][name] = summarise(name, row)
            if name == "probe" and "device_kind" in result["summary"][name]:
                device = result["summary"][name]["device_kind"]
        print(f"{name:24s} {result['parts'][name]['status']:22s} "
              f"{result['parts'][name].get('seconds', 0):6.1f} s  "
              f"{json.dumps(result['summary'].get(name, {}))[:160]}", flush=True)
        base = result["summary"].get("pretrain_default", {}).get("step_time_s")
        for other, summ in result["summary"].items():
            if other.startswith("rng_") and base and summ.get("step_time_s"):
                summ["step_time_over_threefry"] = round(summ["step_time_s"] / base, 3)
        result["device_kind"] = device
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        tag = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") or "unknown"
        path = os.path.join(args.out_dir, f"gpu_check_{'smoke_' if args.smoke else ''}{tag}.json")
        common.write_json(path, dict(result, machine={"device_kind": device},
                                     load_avg_end=common.load_average()))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
