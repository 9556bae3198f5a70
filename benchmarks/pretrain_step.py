"""Pretraining train-step benchmark: step time, samples/s, MFU and peak memory per setting.

The step is the real one (`mplug_jax.trainer.compile_step`: ITC + ITM + MLM + prefix LM,
momentum model, queues, AdamW) on the `tiny` config (`configs/pretrain.py:tiny`) with a fixed
random batch. Rows are cumulative: fp32 baseline -> + remat (`remat_policy=full`) -> + bf16
compute (`dtype=bfloat16`) -> + FSDP (params and optimizer state split over the devices).
FLOPs come from the compiled step's `cost_analysis()` (one SPMD partition = one device), peak
memory per device from `memory_analysis()`; MFU = FLOPs / (step time x peak FLOP/s per device),
with
the peak given by `--peak_flops` or detected (`mplug_jax.metrics.peak_flops_per_device`:
table for accelerators, a measured float32 matmul on CPU).

On CPU the process is pinned to `--threads` cores and split into `--devices` XLA host devices
(2 by default, so FSDP has something to shard over); rows 1-3 use a data-parallel mesh over
the same devices.

    python benchmarks/pretrain_step.py [--steps 5] [--batch 32] [--peak_flops F] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (repo root on sys.path; must not import jax)

ROWS = [
    ("fp32 baseline", dict(remat_policy="none", dtype="float32"), "dp"),
    ("+ remat", dict(remat_policy="full", dtype="float32"), "dp"),
    ("+ bf16", dict(remat_policy="full", dtype="bfloat16"), "dp"),
    ("+ FSDP", dict(remat_policy="full", dtype="bfloat16"), "fsdp"),
]


def bench_row(name, model_over, preset, args, peak):
    import jax
    import numpy as np

    from configs import pretrain
    from mplug_jax import sharding as shd
    from mplug_jax import trainer
    from mplug_jax.data.pipeline import make_global_batch

    c = pretrain.get_config("tiny")
    c.model.update(model_over)
    c.input.batch_size = args.batch
    c.task.itc.queue_size = args.batch * 8
    c.mesh.sharding = preset
    n = len(jax.devices())
    shape = {"data": n, "fsdp": 1, "tensor": 1} if preset == "dp" else \
        {"data": 1, "fsdp": n, "tensor": 1}
    mesh = shd.make_mesh(shape)
    s = trainer.setup(c, steps_per_epoch=100, mesh=mesh)
    r = np.random.default_rng(0)
    b, length, res = args.batch, c.input.max_tokens, c.model.image_size
    ids = r.integers(1000, 2000, size=(b, length)).astype(np.int32)
    ids[:, 0] = 101
    batch = {"image": r.normal(size=(b, res, res, 3)).astype(np.float32), "text_ids": ids,
             "text_mask": np.ones((b, length), np.int32), "idx": np.arange(b, dtype=np.int32)}
    t = time.perf_counter()
    step = trainer.compile_step(s, c, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))
    compile_s = time.perf_counter() - t
    from mplug_jax import metrics
    stats = metrics.compiled_stats(step)
    state = trainer.init_state(s, 0)
    gb = make_global_batch(batch, mesh)
    for _ in range(2):  # warm-up
        state, out = step(state, gb)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, out = step(state, gb)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    row = {"name": name, "model": model_over, "sharding": preset, "mesh": dict(mesh.shape),
           "batch": b, "step_time_s": dt, "step_times_s": times,
           "samples_per_s": b / dt, "gflop_per_step_per_device": stats["flops"] / 1e9,
           "mfu": stats["flops"] / (dt * peak), "peak_mem_mib": stats["peak_bytes"] / 2**20,
           "compile_s": compile_s, "loss": float(out["train/loss"])}
    print(f"{name:14s} step {dt:.3f}s  {row['samples_per_s']:.1f} samples/s  "
          f"{row['gflop_per_step_per_device']:.1f} GFLOP/device  MFU {100 * row['mfu']:.1f}%  "
          f"peak {row['peak_mem_mib']:.0f} MiB/device  (compile {compile_s:.0f}s)", flush=True)
    return row


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["name"] for r in rows]
    for ax, key, label in zip(axes, ("samples_per_s", "mfu", "peak_mem_mib"),
                              ("samples/s", "MFU", "peak MiB / device")):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2, help="XLA host devices on CPU")
    ap.add_argument("--peak_flops", type=float, default=0.0, help="per device; 0 = detect")
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args()
    threads = common.set_cpu_threads(args.threads)
    # First, so that it is parsed whatever follows.
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               + os.environ.get("XLA_FLAGS", ""))
    import jax

    from mplug_jax import metrics
    info = common.machine_info()
    peak, how = metrics.peak_flops_per_device(args.peak_flops)
    print(f"{info['device_kind']} x {len(jax.devices())}: peak {peak / 1e9:.1f} GFLOP/s/device "
          f"({how}); load {common.load_average()}", flush=True)
    rows = [bench_row(name, over, preset, args, peak) for name, over, preset in ROWS]
    tag = f"{info['platform']}{args.threads}" if info["platform"] == "cpu" else \
        info["device_kind"].replace(" ", "_")
    os.makedirs(args.out_dir, exist_ok=True)
    out = {"benchmark": "pretrain_step", "config": "configs/pretrain.py:tiny",
           "machine": info, "threads": threads, "peak_flops_per_device": peak,
           "peak_source": how, "load_average_after": common.load_average(), "rows": rows}
    path = os.path.join(args.out_dir, f"pretrain_step_{tag}.json")
    common.write_json(path, out) if hasattr(common, "write_json") else _write(path, out)
    plot(rows, path[:-5] + ".png", f"pretrain step, tiny, batch {args.batch}, "
         f"{info['device_kind']} x {len(jax.devices())}")
    print(f"wrote {path} and .png")


def _write(path, obj):
    import json
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


if __name__ == "__main__":
    main()
