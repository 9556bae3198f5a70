"""Metric writers (console, JSONL, TensorBoard), step timing / ETA, MFU and the loss-curve PNG.

Only process 0 writes. JSONL rows are `{"step": int, "<name>": float, ...}` in
`workdir/metrics.jsonl`; TensorBoard events go to `workdir/tb/` (tensorboardX). The console
gets one compact line per log step (`progress_line`); the full set is in the files. Workdirs
are `etils.epath` paths (local or bucket URLs).

A process killed while writing leaves a partial last line: readers skip it with a warning and
the writer starts on a fresh line. A resumed run first drops the rows past its restored step
(`MetricWriter.keep_until`; moved to `metrics.dropped.jsonl`), so no step appears twice.
TensorBoard event files are append-only and are not rewritten: after a resume, TensorBoard
shows the redone steps a second time.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

# Dense peak FLOP/s per device for MFU (bf16 tensor cores; float32 CPUs are measured).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def measure_peak_flops(device=None, n: int = 1024, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s of one device (used as the CPU 'peak')."""
    device = device or jax.local_devices()[0]  # jax.devices()[0] is process 0's
    x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def peak_flops_per_device(given: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained): given > table > measured."""
    if given > 0:
        return float(given), "given"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"table ({kind})"
    # XLA host devices share the CPU's cores: each gets its share of the measured throughput.
    n = jax.local_device_count()  # this host's devices (all processes': jax.devices())
    return measure_peak_flops() / n, f"measured f32 matmul / {n} host devices ({kind})"


def compiled_stats(compiled) -> dict:
    """FLOPs and memory of a compiled jit function (`jitted.lower(...).compile()`).

    Returns {'flops': float per device (XLA's cost of one SPMD partition), 'peak_bytes': int
    per device}. MFU = flops / (step time x peak FLOP/s of one device).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    mem = compiled.memory_analysis()
    peak = 0
    if mem is not None:
        peak = int(getattr(mem, "peak_memory_in_bytes", 0) or (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes))
    return {"flops": flops, "peak_bytes": peak}


class Chrono:
    """Step-time, throughput and ETA bookkeeping (big_vision `u.chrono`, simplified)."""

    def __init__(self, first_step: int, total_steps: int, batch_size: int):
        self.total, self.batch_size = total_steps, batch_size
        self.last_step, self.last_time = first_step, None

    def restart(self, step: int) -> None:
        """Start timing afresh from `step` (after an evaluation or a checkpoint wait)."""
        jax.effects_barrier()
        self.last_step, self.last_time = step, time.perf_counter()

    def tick(self, step: int) -> dict:
        """Call on log steps after syncing; returns timing metrics since the previous tick."""
        now = time.perf_counter()
        out = {}
        if self.last_time is not None and step > self.last_step:
            dt = (now - self.last_time) / (step - self.last_step)
            out = {"step_time_s": dt, "samples_per_s": self.batch_size / dt,
                   "eta_min": dt * (self.total - step) / 60}
        self.last_step, self.last_time = step, now
        return out


class MetricWriter:
    """JSONL + TensorBoard writer (console optional); a no-op on processes other than 0.

    Local workdirs append to the JSONL file; remote ones (no append on object stores) rewrite
    it whole at each write (a few hundred rows at most).
    """

    def __init__(self, workdir, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        workdir = epath.Path(workdir)
        self.workdir, self.path = workdir, workdir / "metrics.jsonl"
        self._local = "://" not in str(workdir)
        self._tb, self._rows = None, []
        if self.enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            self._tb = _summary_writer(workdir / "tb")
            if self.path.exists():
                text = self.path.read_text()
                if text and not text.endswith("\n"):  # killed mid-row: the next row starts anew
                    text += "\n"
                    if self._local:
                        with self.path.open("a") as f:
                            f.write("\n")
                if not self._local:
                    self._rows = [text]

    def keep_until(self, step: int | None) -> str | None:
        """Drop the JSONL rows written after `step` (None: every row), e.g. by a run that
        was killed past its last checkpoint and is being resumed, plus unparsable lines;
        they are appended to `metrics.dropped.jsonl`. Returns a log line when any went."""
        if not self.enabled or not self.path.exists():
            return None
        keep, drop = [], []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                ok = step is not None and int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            (keep if ok else drop).append(line + "\n")
        if not drop:
            return None
        dropped = self.workdir / "metrics.dropped.jsonl"
        old = dropped.read_text() if dropped.exists() else ""
        dropped.write_text(old + "".join(drop))
        tmp = self.workdir / "metrics.jsonl.tmp"
        tmp.write_text("".join(keep))
        tmp.replace(self.path)
        self._rows = [] if self._local else keep
        return (f"metrics.jsonl: moved {len(drop)} rows past step {step or 0} (not in the "
                f"restored checkpoint) to {dropped}")

    def write(self, step: int, scalars: Mapping[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(row) + "\n"
        if self._local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._rows.append(line)
            self.path.write_text("".join(self._rows))
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        if console:
            print(format_row(row), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()


def _summary_writer(logdir: epath.Path):
    """tensorboardX writer; a bucket needs its client library (google-cloud-storage for gs://,
    boto3 for s3://), without which the events go to a local folder named in a warning."""
    from tensorboardX import SummaryWriter  # slow import: process 0 only
    client = {"gs": "google.cloud.storage", "s3": "boto3"}.get(str(logdir).split("://")[0])
    if client and not _importable(client):
        local = tempfile.mkdtemp(prefix="mplug_tb_")
        print(f"WARNING: writing TensorBoard events for {logdir} to {local}: {client} is not "
              "installed (metrics.jsonl still goes to the workdir)", flush=True)
        return SummaryWriter(local)
    return SummaryWriter(str(logdir))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def format_row(row: Mapping[str, float]) -> str:
    """'step 10 | loss 3.21 | ...' with short names (the 'train/' prefix dropped)."""
    parts = [f"step {int(row['step'])}"]
    for k, v in row.items():
        if k == "step":
            continue
        name = k.split("/", 1)[1] if k.startswith("train/") else k
        parts.append(f"{name} {v:.3g}" if abs(v) < 1e4 else f"{name} {v:.4g}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, row: Mapping[str, float]) -> str:
    """One console line: 'step 100/600 (17%) | loss 3.214 | 52.1 samples/s | 0.61 s/step |
    ETA 5m05s' (timing parts once measured)."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if "train/loss" in row:
        parts.append(f"loss {row['train/loss']:.4g}")
    if "samples_per_s" in row:
        parts += [f"{row['samples_per_s']:.1f} samples/s", f"{row['step_time_s']:.3g} s/step",
                  f"ETA {_duration(60 * row['eta_min'])}"]
    return " | ".join(parts)


class CounterWatch:
    """Warns when a cumulative counter metric (names starting with `prefix`) grows."""

    def __init__(self, prefix: str, hint: str = "raise the task's target capacity"):
        self.prefix, self.hint, self.seen = prefix, hint, {}

    def check(self, row: Mapping[str, float]) -> Iterator[str]:
        """Messages for the counters of `row` that grew since the last check."""
        for k, v in row.items():
            if k.startswith(self.prefix) and v > self.seen.get(k, 0):
                yield (f"{k} = {int(v)} (+{int(v - self.seen.get(k, 0))}): targets beyond the "
                       f"gather capacity were left out of the loss; {self.hint}")
                self.seen[k] = v


def read_jsonl(path) -> list[dict]:
    """The rows of a JSONL file ([] when absent); unparsable lines (a row cut short by a
    killed process) are skipped with a warning."""
    path = epath.Path(path)
    if not path.exists():
        return []
    rows, bad = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad.append(i)
    if bad:
        print(f"WARNING: {path}: skipped unparsable line(s) {bad[:5]} (a row cut short when "
              "its writer was killed?)", file=sys.stderr, flush=True)
    return rows


def plot_losses(workdir, out_name: str = "losses.png") -> epath.Path | None:
    """PNG of every `train/loss*` series in `workdir/metrics.jsonl`; returns its path."""
    if jax.process_index() != 0:
        return None
    workdir = epath.Path(workdir)
    rows = read_jsonl(workdir / "metrics.jsonl")
    keys = sorted({k for r in rows for k in r if k.startswith("train/loss")})
    if not keys:
        return None
    import matplotlib  # slow import: only at the end of a run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = sorted({r["step"]: r[k] for r in rows if k in r}.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = workdir / out_name
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def to_floats(tree: Mapping) -> dict[str, float]:
    """device_get a flat metrics dict into Python floats."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(tree)).items()}
