"""Sums the per-test CPU seconds that `MPLUG_TEST_CPU=DIR pytest ...` wrote (tests/conftest.py).

    python tests/cpu_report.py DIR [--top N]       # per tier, the N most expensive files and tests
    python tests/cpu_report.py DIR --out F.json --wall-s S --load "A -> B" [--command CMD]
        # also a results file: the run's wall time (measured by the caller, e.g. `time`), its
        # CPU per tier, the machine, the load average before -> after and the commit
"""
import argparse
import collections
import json
import os
import pathlib
import platform
import subprocess
import sys


def summarise(folder: str) -> dict:
    """{'tests': {nodeid: {cpu_s, wall_s, tiers}}, 'session_cpu_s': float, 'tiers': {tier:
    CPU s}, 'files': Counter} of every cpu-<worker>.json in `folder`."""
    tests, session = {}, 0.0
    paths = sorted(pathlib.Path(folder).glob("cpu-*.json"))
    if not paths:
        raise SystemExit(f"error: no cpu-*.json in {folder} (run pytest with MPLUG_TEST_CPU={folder})")
    for path in paths:
        data = json.loads(path.read_text())
        tests.update(data["tests"])
        session += data["session_cpu_s"]
    tiers, files = collections.Counter(), collections.Counter()
    for nodeid, t in tests.items():
        tiers["+".join(t["tiers"]) or "quick"] += t["cpu_s"]
        files[nodeid.split("::")[0]] += t["cpu_s"]
    return {"tests": tests, "session_cpu_s": session, "tiers": tiers, "files": files}


def results(s: dict, wall_s: float, load: str, command: str, top: int) -> dict:
    """The results-file form of `summarise`'s output."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=pathlib.Path(__file__).parents[1]).stdout.strip()
    slowest = sorted(s["tests"].items(), key=lambda kv: -kv[1]["cpu_s"])[:top]
    return {"what": "the test suite's wall time and CPU per tier (tests/conftest.py recorder)",
            "command": command, "commit": commit,
            "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                        "python": platform.python_version()},
            "load_avg": load, "wall_s": round(wall_s, 1), "tests": len(s["tests"]),
            "cpu_min_in_tests": round(sum(s["tiers"].values()) / 60, 1),
            "cpu_min_in_processes": round(s["session_cpu_s"] / 60, 1),
            "cpu_min_per_tier": {k: round(v / 60, 1) for k, v in s["tiers"].most_common()},
            "slowest_tests_cpu_s": {k: v["cpu_s"] for k, v in slowest}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="also write a results file (JSON) here")
    p.add_argument("--wall-s", type=float, help="with --out: the run's wall seconds")
    p.add_argument("--load", help='with --out: load average before -> after, e.g. "0.1 -> 2.3"')
    p.add_argument("--command", default="bash tests/run.sh", help="with --out: what ran")
    a = p.parse_args(argv)
    s = summarise(a.folder)
    total = sum(s["tiers"].values())
    print(f"{len(s['tests'])} tests, {total / 60:.1f} CPU-min in tests, "
          f"{s['session_cpu_s'] / 60:.1f} CPU-min in the test processes (with imports, "
          "collection)")
    for tier, cpu in s["tiers"].most_common():
        print(f"  tier {tier:12s} {cpu / 60:6.1f} CPU-min")
    print("files:")
    for name, cpu in s["files"].most_common(a.top):
        print(f"  {cpu:7.1f} s  {name}")
    print("tests:")
    for nodeid, t in sorted(s["tests"].items(), key=lambda kv: -kv[1]["cpu_s"])[:a.top]:
        print(f"  {t['cpu_s']:7.1f} s  {nodeid}")
    if a.out:
        if a.wall_s is None or not a.load:
            p.error("--out needs --wall-s and --load")
        pathlib.Path(a.out).write_text(
            json.dumps(results(s, a.wall_s, a.load, a.command, 15), indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
