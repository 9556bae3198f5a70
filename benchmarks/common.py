"""Shared helpers for the model benchmarks: CPU thread setup, timing, machine info, JSON, plots.

`set_cpu_threads` must run before JAX is imported (XLA reads `XLA_FLAGS` once, when the CPU
client starts); the benchmark scripts call it at the top, before `import jax`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any, Callable, Sequence

QUICK_REPEATS = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def model_bench_args(description: str, argv: list[str] | None = None,
                     extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse the options the model benchmarks share (--out-dir, --repeats, --batch, --threads,
    --quick, --smoke; `extra` adds a script's own) and set the CPU threads.

    Returns:
      (args, threads info, {'repeats', 'batch'} after --quick / --smoke).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--repeats", type=int, default=5, help="timed calls after 1 warm-up")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (set before jax import)")
    p.add_argument("--quick", action="store_true",
                   help=f"real dimensions, {QUICK_REPEATS} repeats (a shorter re-measurement)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat (for tests)")
    p.add_argument("--tiny", dest="smoke", action="store_true", help=argparse.SUPPRESS)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    threads = set_cpu_threads(args.threads)
    repeats = 1 if args.smoke else min(args.repeats, QUICK_REPEATS) if args.quick else args.repeats
    run = {"repeats": repeats, "batch": 2 if args.smoke else args.batch}
    return args, threads, run


def set_cpu_threads(threads: int) -> dict[str, Any]:
    """Ask XLA:CPU for `threads` intra-op threads and pin the process to `threads` cores.

    Returns a record of what was set. If JAX is already imported (e.g. under pytest, whose
    conftest imports it), nothing can change any more and the record says so.
    """
    record: dict[str, Any] = {"requested_threads": threads}
    if "jax" in sys.modules:
        record["note"] = "jax was already imported: XLA_FLAGS and affinity left unchanged"
        record["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    else:
        flags = os.environ.get("XLA_FLAGS", "")
        # Eigen's thread pool does the matmuls/convolutions; its size follows the cores the
        # process may use, which the affinity mask below limits to `threads`.
        extra = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
        record["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    if hasattr(os, "sched_setaffinity") and "jax" not in sys.modules:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[:threads])
    if hasattr(os, "sched_getaffinity"):
        record["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    return record


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (`os.getloadavg()`: other users of the cores)."""
    return [round(float(x), 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """Device, versions and host facts for the JSON header (imports jax)."""
    import jax
    import jaxlib

    dev = jax.devices()[0]
    return {"host": socket.gethostname(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "platform": dev.platform,
            "device_kind": dev.device_kind, "num_devices": len(jax.devices()),
            "processor": platform.processor() or platform.machine()}


def time_call(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median wall-clock seconds of `fn(*args)` over `repeats` timed calls after `warmup`
    untimed ones (the first also compiles). Every call is waited for with block_until_ready.
    """
    import jax

    start = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "warmup_s": first}


def time_interleaved(calls: dict[str, tuple[Callable, tuple]], repeats: int = 5,
                     warmup: int = 1) -> dict[str, dict[str, Any]]:
    """`time_call` for several functions, round-robin: after every function's warm-up, timed
    round r calls each function once. On a CPU shared with other jobs, load changes then hit
    every configuration alike, which keeps the ratios between them meaningful."""
    import jax

    out: dict[str, dict[str, Any]] = {}
    for name, (fn, args) in calls.items():
        start = time.perf_counter()
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
        out[name] = {"warmup_s": time.perf_counter() - start, "times_s": []}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out[name]["times_s"].append(time.perf_counter() - t0)
    for r in out.values():
        r["median_s"] = statistics.median(r["times_s"])
        r["min_s"] = min(r["times_s"])
    return out


def make_params(init: Callable, rng, *args, constant: bool = False) -> Any:
    """Params of a Flax `init(rng, *args)`: random (jitted init) or, for smoke runs, a constant
    0.02 everywhere from `jax.eval_shape`, which compiles nothing (fast on a loaded CPU)."""
    import jax
    import jax.numpy as jnp

    if not constant:
        return jax.block_until_ready(jax.jit(init)(rng, *args))
    shapes = jax.eval_shape(init, rng, *args)
    return jax.tree.map(lambda s: jnp.full(s.shape, 0.02, s.dtype), shapes)


def maybe_jit(fn: Callable, jit: bool = True) -> Callable:
    """`jax.jit(fn)`, or `fn` itself (op-by-op) for smoke runs where compile time dominates."""
    import jax

    return jax.jit(fn) if jit else fn


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def paired(a: dict, b: dict) -> float | None:
    """Median over timing rounds of a's time / b's time in the same round: with round-robin
    timing both saw about the same load, so this is steadier than a ratio of medians."""
    if not a["times_s"] or len(a["times_s"]) != len(b["times_s"]):
        return None
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"]))


def row_ratios(a: dict, b: dict) -> dict:
    """Benchmark row a over row b (rows with times_s, median_s, min_s, peak_bytes and
    xla_gflops): time (of the medians), time_min, time_paired (`paired`), peak_memory,
    xla_flops."""
    return {"time": ratio(a["median_s"], b["median_s"]),
            "time_min": ratio(a["min_s"], b["min_s"]),
            "time_paired": paired(a, b),
            "peak_memory": ratio(a["peak_bytes"], b["peak_bytes"]),
            "xla_flops": ratio(a["xla_gflops"], b["xla_gflops"])}


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def host_info() -> dict[str, Any]:
    """Host facts that need no JAX: name, cores, CPU model, Python (`run_summary.host`)."""
    from mplug_jax import run_summary

    return run_summary.host()


def write_json(path: str, data: dict) -> None:
    """Write `data` as JSON, stamped so that every results file says where and under what load
    it was measured: `data['machine']` (host facts, plus the JAX device record when there is
    one: the script's 'machine' or 'device' entry, or `machine_info()` once JAX is imported)
    and `data['load_avg_at_write']` (1/5/15-minute load averages when writing)."""
    known = data.get("machine") or data.get("device") or (
        machine_info() if "jax" in sys.modules else {})
    data["machine"] = {**host_info(), **known}
    data["load_avg_at_write"] = load_average()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_results(stem: str, res: dict, t_start: float, plot: Callable[[str], None]) -> dict:
    """Write `res` to <stem>.json (`write_json`) and its figure to <stem>.png (`plot(path)`),
    print both paths and the total runtime since `t_start` (perf_counter); returns `res`."""
    write_json(stem + ".json", res)
    plot(stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    print(f"total runtime {time.perf_counter() - t_start:.1f} s")
    return res


def bar_plot(path: str, labels: Sequence[str], series: dict[str, Sequence[float | None]],
             title: str, xlabel: str = "median forward time (s)") -> None:
    """Horizontal grouped bar chart: one group per label, one bar per series (None = no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) * max(1, n) + 1.2))
    colors = ["tab:blue", "tab:gray", "tab:orange", "tab:green"]
    for j, (name, values) in enumerate(series.items()):
        ys = [i + (j - (n - 1) / 2) * height for i in range(len(labels))]
        vals = [0.0 if v is None else v for v in values]
        ax.barh(ys, vals, height=height, label=name, color=colors[j % len(colors)])
        for y, v in zip(ys, values):
            if v is not None:
                ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    if n > 1:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
