"""Metric writers (console, JSONL, TensorBoard), step timing / ETA, MFU and the loss-curve PNG.

Only process 0 writes. JSONL rows are `{"step": int, "<name>": float, ...}` in
`workdir/metrics.jsonl`; TensorBoard events go to `workdir/tb/` (tensorboardX).
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

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
    """Console + JSONL + TensorBoard writer; a no-op on processes other than 0."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._f = open(self.path, "a")

    def write(self, step: int, scalars: Mapping[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        if console:
            print(format_row(row), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            self._tb.close()


def format_row(row: Mapping[str, float]) -> str:
    """'step 10 | loss 3.21 | ...' with short names (the 'train/' prefix dropped)."""
    parts = [f"step {int(row['step'])}"]
    for k, v in row.items():
        if k == "step":
            continue
        name = k.split("/", 1)[1] if k.startswith("train/") else k
        parts.append(f"{name} {v:.3g}" if abs(v) < 1e4 else f"{name} {v:.4g}")
    return " | ".join(parts)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, out_name: str = "losses.png") -> str | None:
    """PNG of every `train/loss*` series in `workdir/metrics.jsonl`; returns its path."""
    if jax.process_index() != 0:
        return None
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    keys = sorted({k for r in rows for k in r if k.startswith("train/loss")})
    if not keys:
        return None
    import matplotlib
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
    path = os.path.join(workdir, out_name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_floats(tree: Mapping) -> dict[str, float]:
    """device_get a flat metrics dict into Python floats."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(tree)).items()}
