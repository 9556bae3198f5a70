"""The README's main job as a results file: its `summary.json` copied to benchmarks/results/.

    python benchmarks/main_job.py --run --workdir runs/main_job   # train, then copy (~7 min CPU)
    python benchmarks/main_job.py --workdir runs/pretrain_tiny    # copy a finished run's summary

`mplug-jax train` writes `<workdir>/results/summary.json` when a run finishes (the final
zero-shot R@1s, ITM and MLM accuracy, the captions, the last training row, machine, load
averages, commit, wall time; `mplug_jax/run_summary.py`). This script checks that the summary
is the main job's (`configs/pretrain.py:tiny`, no overrides, every step run, commit recorded)
and writes it to `benchmarks/results/main_job_<machine>.json` (e.g. `main_job_cpu2.json`), with
`--run` first training in a fresh workdir. Exit status 2 with one `error:` line when the
summary is missing or not the main job's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
MAIN_JOB = "configs/pretrain.py:tiny"
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def machine_tag(machine: dict) -> str:
    """'cpu2' for a 2-core CPU run, else the accelerator's kind ('nvidia_h100_80gb_hbm3')."""
    if machine.get("platform") == "cpu":
        return f"cpu{machine.get('cpus')}"
    return re.sub(r"[^a-z0-9]+", "_", str(machine.get("device_kind", "device")).lower()).strip("_")


def check(summary: dict, allow_overrides: bool = False) -> list[str]:
    """Why `summary` is not a complete main-job run (empty list: it is)."""
    why = []
    if not str(summary.get("config") or "").endswith(MAIN_JOB):
        why.append(f"config is {summary.get('config')!r}, not {MAIN_JOB!r}")
    if summary.get("overrides") and not allow_overrides:
        why.append(f"it ran with overrides {summary['overrides']} (--allow-overrides to keep)")
    if summary.get("stopped") != "done" or (summary.get("total_steps") and
                                            summary.get("step") != summary["total_steps"]):
        why.append(f"it stopped at step {summary.get('step')} of {summary.get('total_steps')}")
    if not summary.get("commit"):
        why.append("no commit recorded (run from a git checkout)")
    if "heldout" not in summary.get("evals", {}):
        why.append("it has no 'heldout' zero-shot evaluation")
    return why


def copy(workdir: str, out: str | None = None, allow_overrides: bool = False,
         run_wall_s: float | None = None) -> str:
    """Check `workdir`'s summary and write it under benchmarks/results (or `out`); returns the
    path. Raises ValueError (not the main job's) or FileNotFoundError (no summary)."""
    from mplug_jax import run_summary

    summary = run_summary.read(workdir)
    why = check(summary, allow_overrides)
    if why:
        raise ValueError(f"{workdir}: not the main job's summary: " + "; ".join(why))
    out = out or os.path.join(RESULTS, f"main_job_{machine_tag(summary['machine'])}.json")
    record = {"benchmark": "main_job", "source": os.path.abspath(
        os.path.join(workdir, "results", run_summary.FILE)), **summary}
    if run_wall_s is not None:
        record["wall_s_with_process_start"] = round(run_wall_s, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return out


def row(path: str) -> str:
    """A one-line description of a copied file, for the README's results table."""
    with open(path) as f:
        s = json.load(f)
    e = s["evals"]["heldout"]
    commit = (s["commit"] or "")[:7] + (" (uncommitted changes)" if s.get("commit_dirty") else "")
    return (f"zero-shot i2t / t2i R@1 {100 * e['i2t_r1']:.1f} / {100 * e['t2i_r1']:.1f}%, ITM "
            f"{100 * e['itm_acc']:.1f}%, MLM {100 * e['mlm_acc']:.1f}% | "
            f"{os.path.relpath(path, REPO)} | {s['machine'].get('cpus')} x "
            f"{s['machine'].get('cpu_model')} ({s['machine'].get('device_kind')}) | load "
            f"{s['load_avg_start'][0]:.1f} -> {s['load_avg_end'][0]:.1f} | {commit} | "
            f"{s['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/main_job", help="the run directory")
    p.add_argument("--run", action="store_true",
                   help=f"first train `{MAIN_JOB}` in --workdir (which must be new)")
    p.add_argument("--out", default=None, help="default benchmarks/results/main_job_<machine>.json")
    p.add_argument("--allow-overrides", action="store_true",
                   help="accept a summary of a run with --config.* overrides (tests)")
    args = p.parse_args(argv)
    wall = None
    try:
        if args.run:
            if os.path.exists(os.path.join(args.workdir, "ckpt")):
                raise ValueError(f"--run needs a new workdir; {args.workdir} already holds "
                                 f"checkpoints (a rerun would resume, not measure)")
            t = time.perf_counter()
            rc = subprocess.run([sys.executable, "-m", "mplug_jax.cli", "train",
                                 f"--config={MAIN_JOB}", f"--workdir={args.workdir}"],
                                cwd=REPO).returncode
            wall = time.perf_counter() - t
            if rc:
                raise ValueError(f"the main job exited with status {rc}")
        path = copy(args.workdir, args.out, args.allow_overrides, wall)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}\n{row(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
