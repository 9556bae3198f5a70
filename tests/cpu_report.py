"""Sums the per-test CPU seconds that `MPLUG_TEST_CPU=DIR pytest ...` wrote (tests/conftest.py).

    python tests/cpu_report.py DIR [N]    # per tier, the N most expensive files and tests
"""
import collections
import json
import pathlib
import sys


def main(folder: str, top: int = 25) -> None:
    tests, session = {}, 0.0
    for path in sorted(pathlib.Path(folder).glob("cpu-*.json")):
        data = json.loads(path.read_text())
        tests.update(data["tests"])
        session += data["session_cpu_s"]
    tiers, files = collections.Counter(), collections.Counter()
    for nodeid, t in tests.items():
        tiers["+".join(t["tiers"]) or "quick"] += t["cpu_s"]
        files[nodeid.split("::")[0]] += t["cpu_s"]
    total = sum(tiers.values())
    print(f"{len(tests)} tests, {total / 60:.1f} CPU-min in tests, "
          f"{session / 60:.1f} CPU-min in the test processes (with imports, collection)")
    for tier, cpu in tiers.most_common():
        print(f"  tier {tier:12s} {cpu / 60:6.1f} CPU-min")
    print("files:")
    for name, cpu in files.most_common(top):
        print(f"  {cpu:7.1f} s  {name}")
    print("tests:")
    for nodeid, t in sorted(tests.items(), key=lambda kv: -kv[1]["cpu_s"])[:top]:
        print(f"  {t['cpu_s']:7.1f} s  {nodeid}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
