"""A finished `train` run's numbers in one file: `<workdir>/results/summary.json`.

What the console printed at the end (each final eval's metrics and report, e.g. the main
job's zero-shot R@1s, ITM and MLM accuracy and its captions) together with where and how it
was measured: the command, machine, 1/5/15-minute load averages at start and end, the git
commit of the code (and whether the tree had uncommitted changes), wall and CPU seconds, and
the last logged training row (loss, samples/s). `benchmarks/main_job.py` copies the main
job's summary into `benchmarks/results/`.

Layout of the file:
  {"command": [...], "config": "configs/pretrain.py:tiny", "overrides": ["--config.a=b"],
   "task": "pretrain", "step": 600, "total_steps": 600,
   "evals": {name: {metric: float, "captions": [[generated, reference], ...]}},
   "printed": {name: "the eval's report as printed"},
   "train_last_row": {"step": 600, "train/loss": ..., "samples_per_s": ...},
   "machine": {...}, "load_avg_start": [1, 5, 15 min], "load_avg_end": [...],
   "commit": "40 hex" | null, "commit_dirty": bool | null, "wall_s": s, "cpu_s": s,
   "written_at": "ISO time"}
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import json
import os
import platform
import socket
import subprocess
from typing import Any, Sequence

from etils import epath

FILE = "summary.json"  # under <workdir>/results/
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (other users of the cores), or None where the OS has
    none."""
    try:
        return [round(float(x), 2) for x in os.getloadavg()]
    except OSError:
        return None


def host() -> dict[str, Any]:
    """Host facts that need no JAX: name, cores, CPU model, Python."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version()}


def machine() -> dict[str, Any]:
    """Host name, cores, CPU model, Python and JAX versions, and the JAX devices."""
    import jax

    dev = jax.devices()[0]
    return {**host(), "jax": jax.__version__,
            "platform": dev.platform, "device_kind": dev.device_kind,
            "num_devices": jax.device_count(), "num_processes": jax.process_count()}


def commit(repo: str = REPO) -> tuple[str | None, bool | None]:
    """(HEAD commit of the checkout holding this package, whether tracked files differ from
    it); (None, None) when it is not a git checkout (an installed wheel) or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head, dirty


def _plain(x: Any) -> Any:
    """`x` as JSON values: numpy / JAX scalars -> Python numbers, tuples -> lists; anything
    else that JSON cannot hold -> its repr."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and getattr(x, "size", 2) == 1:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


def _report(config, name: str, result: dict) -> str | None:
    """The eval's report as the trainer printed it, when its evaluator's `report` needs no
    evaluator instance (a static method); else None."""
    kind = config.evals[name].get("type") if name in config.get("evals", {}) else None
    if not kind:
        return None
    module = importlib.import_module(f"mplug_jax.evaluators.{kind}")
    if not isinstance(inspect.getattr_static(module.Evaluator, "report", None), staticmethod):
        return None
    return module.Evaluator.report(result)


def _last_train_row(workdir: epath.Path, step: int) -> dict | None:
    """The last `metrics.jsonl` row with training metrics at or before `step`."""
    from mplug_jax import metrics

    rows = [r for r in metrics.read_jsonl(workdir / "metrics.jsonl")
            if "train/loss" in r and r.get("step", 0) <= step]
    return rows[-1] if rows else None


def build(config, result: dict, workdir, argv: Sequence[str], *, wall_s: float, cpu_s: float,
          load_avg_start: list[float] | None) -> dict:
    """The summary of a finished run.

    Args:
      config: the run's config (after overrides).
      result: `trainer.run`'s return value ('step', 'evals'; 'state' is left out).
      workdir: the run directory.
      argv: the command line (argv[0] the program), as typed.
      wall_s / cpu_s: seconds since the command started (wall) and this process's CPU time.
      load_avg_start: load averages when the command started.
    """
    workdir = epath.Path(workdir)
    args = list(argv[1:])
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    head, dirty = commit()
    evals = {name: _plain(res) for name, res in result.get("evals", {}).items()}
    printed = {}
    for name, res in result.get("evals", {}).items():
        text = _report(config, name, res)
        if text is not None:
            printed[name] = text
    return {
        "command": list(argv), "config": spec,
        "overrides": [a for a in args if a.startswith("--config.")],
        "task": config.task.name, "variant": config.get("variant"),
        "step": int(result["step"]), "total_steps": int(config.total_steps or 0),
        "stopped": result.get("stopped"),
        "evals": evals, "printed": printed,
        "train_last_row": _last_train_row(workdir, int(result["step"])),
        "machine": machine(), "load_avg_start": load_avg_start, "load_avg_end": load_average(),
        "commit": head, "commit_dirty": dirty,
        "wall_s": round(float(wall_s), 1), "cpu_s": round(float(cpu_s), 1),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write(workdir, summary: dict) -> str:
    """Write `summary` to `<workdir>/results/summary.json` (replacing an older one); returns
    the path."""
    directory = epath.Path(workdir) / "results"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return str(path)


def read(workdir) -> dict:
    """The summary of `workdir` (a run directory or the summary file itself); a clear
    FileNotFoundError when the run has none (not finished, or trained before summaries)."""
    path = epath.Path(workdir)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / "results" / FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the run has not finished (a summary is "
                                f"written when `mplug-jax train` completes its last step)")
    return json.loads(path.read_text())
