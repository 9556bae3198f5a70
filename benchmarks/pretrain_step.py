"""Pretraining train-step benchmark: samples/s, MFU, FLOPs per sample and peak memory.

The step is the real one (`mplug_jax.trainer.compile_step`: ITC + ITM + MLM + prefix LM,
momentum model, queues, AdamW) of `configs/pretrain.py:<variant>` on a fixed random batch.
Options set the variant, the global batch, the sharding preset, remat and dtype; any other
config field is set with `--config.a.b=value` (ml_collections syntax, as the trainer CLI).

FLOPs per sample are printed twice: from the compiled step (`cost_analysis()` of one SPMD
partition x devices / global batch: every op XLA runs, including remat recomputation and
elementwise work) and by hand (`benchmarks/flops.py`: matmul FLOPs of the four losses'
forward + backward and the momentum forwards). MFU = hand-counted model FLOPs (no remat
recomputation) x samples/s / (devices x peak FLOP/s per device); the peak is `--peak_flops`
or detected (`mplug_jax.metrics.peak_flops_per_device`: bf16 dense table for accelerators, a
measured float32 matmul on CPU). Peak memory per device comes from `memory_analysis()`.

`--ladder` runs the cumulative rows of the paper's Table 6 on the chosen variant and batch:
fp32 baseline -> + bf16 -> + remat (gradient checkpointing) -> + FSDP (ZeRO-style sharding of
params and optimizer state), and prints the paper's throughputs beside ours.

On CPU the process is pinned to `--threads` cores and split into `--devices` XLA host devices
(2 by default, so FSDP has something to shard over). `--dry-run` resolves the config, mesh
and hand count without compiling anything.

    python benchmarks/pretrain_step.py --variant tiny --steps 3             # CPU, ~1-2 min
    python benchmarks/pretrain_step.py --variant tiny --ladder              # 4 rows, CPU
    python benchmarks/pretrain_step.py --variant base --batch 128 --sharding dp \\
        --dtype bfloat16 --remat full --no-scan --dry-run                   # no compile
    # one H100 (not yet measured: no GPU was lent to this project so far)
    python benchmarks/pretrain_step.py --variant base --batch 128 --sharding dp \\
        --dtype bfloat16 --remat full --no-scan --steps 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (repo root on sys.path; must not import jax)
import flops  # noqa: E402  (plain arithmetic, no jax)
import paper  # noqa: E402

VARIANTS = ("tiny", "base", "large")
SHARDINGS = ("dp", "fsdp", "fsdp_tp")
# Table 6 order: baseline, + BFloat16, + gradient checkpointing, + ZeRO.
LADDER = [
    ("fp32 baseline", dict(dtype="float32", remat="none", sharding="dp"), "baseline"),
    ("+ bf16", dict(dtype="bfloat16", remat="none", sharding="dp"), "+ BFloat16"),
    ("+ remat", dict(dtype="bfloat16", remat="full", sharding="dp"), "+ Gradient Checkpoint"),
    ("+ FSDP", dict(dtype="bfloat16", remat="full", sharding="fsdp"), "+ ZeRO"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other config fields: --config.a.b=value, e.g. --config.model.scan_layers=true "
               "--config.model.attention_impl=cudnn --config.optim.accum_steps=2.")
    ap.add_argument("--variant", choices=VARIANTS, default="tiny",
                    help="configs/pretrain.py:<variant>")
    ap.add_argument("--batch", type=int, default=0,
                    help="global batch (default: the variant's, tiny 32, base/large 1024)")
    ap.add_argument("--sharding", choices=SHARDINGS, default=None,
                    help="preset: dp (data axis), fsdp (fsdp axis), fsdp_tp (fsdp x tensor); "
                         "default: the config's (tiny dp, base/large fsdp)")
    ap.add_argument("--tensor", type=int, default=1, help="tensor-axis size for fsdp_tp")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype (default: the config's, tiny float32, base/large "
                         "bfloat16)")
    ap.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default=None,
                    help="remat policy (default: the config's, tiny none, base/large full)")
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                    help="scan the layer stacks (default: the config's, tiny off, base/large "
                         "on); XLA's cost analysis counts a scanned stack once, so the "
                         "compiled FLOPs are only comparable with --no-scan")
    ap.add_argument("--ladder", action="store_true",
                    help="run the Table 6 rows (fp32 -> bf16 -> remat -> FSDP) instead of one")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    ap.add_argument("--devices", type=int, default=2, help="XLA host devices (CPU only)")
    ap.add_argument("--peak_flops", type=float, default=0.0, help="per device; 0 = detect")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config, mesh and hand count; compile nothing")
    ap.add_argument("--out-dir", default=common.RESULTS)
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = rest
    if args.sharding not in (None, "fsdp_tp") and args.tensor != 1:
        ap.error("--tensor applies to --sharding fsdp_tp only")
    return args


def build_config(args, row: dict | None = None):
    """configs/pretrain.py:<variant> with the command-line settings (and a ladder row's)."""
    from mplug_jax import plan

    c = plan.load_config(os.path.join(common.REPO, f"configs/pretrain.py:{args.variant}"),
                         args.overrides)
    row = row or {}
    dtype = row.get("dtype", args.dtype)
    remat = row.get("remat", args.remat)
    if dtype:
        c.model.dtype = dtype
    if remat:
        c.model.remat_policy = remat
    if args.scan is not None:
        c.model.scan_layers = args.scan
    if args.batch:
        c.input.batch_size = args.batch
    b = c.input.batch_size // max(1, int(c.optim.accum_steps))
    q = c.task.itc.queue_size
    if q and q % b:  # the queue must hold a whole number of batches
        c.task.itc.queue_size = max(b, q // b * b)
    c.mesh.sharding = row.get("sharding", args.sharding or c.mesh.sharding)
    c.mesh.shape = {"dp": dict(data=-1, fsdp=1, tensor=1),
                    "fsdp": dict(data=1, fsdp=-1, tensor=1),
                    "fsdp_tp": dict(data=1, fsdp=-1, tensor=args.tensor)}[c.mesh.sharding]
    return c


def random_batch(c) -> dict:
    import numpy as np

    r = np.random.default_rng(0)
    b, length, res = c.input.batch_size, c.input.max_tokens, c.model.image_size
    ids = r.integers(1000, 2000, size=(b, length)).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    return {"image": r.normal(size=(b, res, res, 3)).astype(np.float32), "text_ids": ids,
            "text_mask": np.ones((b, length), np.int32), "idx": np.arange(b, dtype=np.int32)}


def describe(c) -> str:
    m = c.model
    return (f"{c.variant}: batch {c.input.batch_size}, L={c.input.max_tokens}, image "
            f"{m.image_size}px, dtype {m.dtype}, remat {m.remat_policy}, sharding "
            f"{c.mesh.sharding} {dict(c.mesh.shape)}, scan {m.scan_layers}, queue "
            f"{c.task.itc.queue_size}, accum {c.optim.accum_steps}")


def bench_row(name: str, c, args, peak: float) -> dict:
    import jax

    from mplug_jax import metrics
    from mplug_jax import sharding as shd
    from mplug_jax import trainer
    from mplug_jax.data.pipeline import make_global_batch

    mesh = shd.make_mesh(c.mesh.shape)
    n = mesh.devices.size
    s = trainer.setup(c, steps_per_epoch=100, mesh=mesh)
    batch = random_batch(c)
    t = time.perf_counter()
    step = trainer.compile_step(s, c, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))
    compile_s = time.perf_counter() - t
    stats = metrics.compiled_stats(step)
    state = trainer.init_state(s, 0)
    gb = make_global_batch(batch, mesh)
    for _ in range(args.warmup):
        state, out = step(state, gb)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, out = step(state, gb)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    b = c.input.batch_size
    hand = flops.from_config(c, remat=False)
    hand_exec = flops.from_config(c)  # + remat recomputation when the policy is not 'none'
    compiled_per_sample = stats["flops"] * n / b
    row = {"name": name, "config": describe(c), "model": {"dtype": c.model.dtype,
           "remat_policy": c.model.remat_policy, "scan_layers": c.model.scan_layers},
           "sharding": c.mesh.sharding, "mesh": dict(mesh.shape), "batch": b,
           "step_time_s": dt, "step_times_s": times, "samples_per_s": b / dt,
           "gflop_per_step_per_device": stats["flops"] / 1e9,
           "gflop_per_sample_compiled": compiled_per_sample / 1e9,
           "gflop_per_sample_hand": hand["total"] / 1e9,
           "gflop_per_sample_hand_with_remat": hand_exec["total"] / 1e9,
           "hand_breakdown_gflop": {k: v / 1e9 for k, v in hand.items()},
           "mfu": hand["total"] * b / dt / (n * peak),
           "xla_flops_utilisation": stats["flops"] / (dt * peak),
           "peak_mem_mib": stats["peak_bytes"] / 2**20, "compile_s": compile_s,
           "loss": float(out["train/loss"])}
    print(f"{name:14s} step {dt:.3f}s  {row['samples_per_s']:.1f} samples/s  MFU "
          f"{100 * row['mfu']:.1f}%  GFLOP/sample compiled {compiled_per_sample / 1e9:.3f} "
          f"hand {hand['total'] / 1e9:.3f} (with remat {hand_exec['total'] / 1e9:.3f})  peak "
          f"{row['peak_mem_mib']:.0f} MiB/device  (compile {compile_s:.0f}s)", flush=True)
    if n > 1 and compiled_per_sample > 1.2 * hand_exec["total"]:
        print(f"  note: compiled FLOPs are {compiled_per_sample / hand_exec['total']:.2f}x the "
              f"hand count: XLA counts work that every device repeats once per device (for "
              f"tiny on 2 devices, in the MLM and prefix-LM paths, most likely the gathered "
              f"vocabulary heads; see benchmarks/results/flops_cpu2.json)", flush=True)
    if c.model.scan_layers:
        print("  note: cost_analysis counts a scanned layer stack once, so the compiled "
              "FLOPs undercount with scan_layers=true", flush=True)
    return row


def print_ladder(rows: list[dict], n_devices: int, device_kind: str) -> None:
    """Our Table 6 rows beside the paper's (speed-up over each one's own baseline)."""
    base, pbase = rows[0]["samples_per_s"], paper.TABLE6_SAMPLES_PER_S["baseline"]
    per_gpu = paper.TABLE6_SAMPLES_PER_S["+ ZeRO"] / paper.TABLE6_GPUS
    print(f"\n{'row':<16} {'ours samples/s':>15} {'x base':>7} {'paper samples/s':>16} "
          f"{'x base':>7}")
    for row, (_, _, pkey) in zip(rows, LADDER):
        p = paper.TABLE6_SAMPLES_PER_S[pkey]
        print(f"{row['name']:<16} {row['samples_per_s']:>15.1f} "
              f"{row['samples_per_s'] / base:>7.2f} {p:>16.1f} {p / pbase:>7.2f}")
    print(f"ours: {device_kind} x {n_devices}, {rows[0]['config']}\n"
          f"paper (ARXIV Table 6, l.279-286, l.321): {paper.TABLE6_CONDITION}; if on "
          f"{paper.TABLE6_GPUS} GPUs, {per_gpu:.1f} samples/s per GPU with all four "
          f"techniques. The stated pretraining time implies "
          f"{paper.implied_pretrain_samples_per_s('base'):.0f} samples/s (base) over 16 A100 "
          f"(EMNLP l.903-905).")


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["name"] for r in rows]
    for ax, key, label in zip(axes, ("samples_per_s", "mfu", "peak_mem_mib"),
                              ("samples/s", "MFU (hand-counted model FLOPs)",
                               "peak MiB / device")):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    threads = common.set_cpu_threads(args.threads)
    # First, so that it is parsed whatever follows; only affects the CPU (host) platform.
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               + os.environ.get("XLA_FLAGS", ""))
    rows_spec = LADDER if args.ladder else [("run", {}, None)]
    if args.dry_run:
        for name, over, _ in rows_spec:
            c = build_config(args, over)
            h, hr = flops.from_config(c, remat=False), flops.from_config(c)
            parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in h.items() if k != "total")
            print(f"{name}: {describe(c)}\n  hand count {h['total'] / 1e9:.2f} GFLOP/sample "
                  f"({parts}); executed with remat {hr['total'] / 1e9:.2f}; "
                  f"{h['total'] * c.input.batch_size / 1e12:.2f} TFLOP/step")
        print(f"dry run: nothing compiled (total runtime {time.perf_counter() - t_start:.1f} s)")
        return None

    import jax

    from mplug_jax import metrics
    info = common.machine_info()
    peak, how = metrics.peak_flops_per_device(args.peak_flops)
    load_start = common.load_average()
    print(f"{info['device_kind']} x {len(jax.devices())}: peak {peak / 1e12:.3f} TFLOP/s/device "
          f"({how}); load {load_start}", flush=True)
    rows = []
    for name, over, _ in rows_spec:
        c = build_config(args, over)
        print(f"{name}: {describe(c)}", flush=True)
        rows.append(bench_row(name, c, args, peak))
    if args.ladder:
        print_ladder(rows, len(jax.devices()), info["device_kind"])
    tag = f"{info['platform']}{args.threads}" if info["platform"] == "cpu" else \
        info["device_kind"].replace(" ", "_")
    stem = os.path.join(args.out_dir, f"pretrain_step_{args.variant}_"
                                      f"{'ladder_' if args.ladder else ''}{tag}")
    out = {"benchmark": "pretrain_step", "config": f"configs/pretrain.py:{args.variant}",
           "argv": sys.argv[1:] if argv is None else list(argv), "machine": info,
           "threads": threads, "peak_flops_per_device": peak, "peak_source": how,
           "load_avg_start": load_start, "load_avg_end": common.load_average(),
           "flops_note": "compiled = cost_analysis of one SPMD partition x devices / batch "
                         "(all ops, remat recomputation and work repeated on every device "
                         "included; a scanned stack counted once); hand = benchmarks/flops.py "
                         "matmul FLOPs; MFU uses the hand count without remat",
           "paper_table6": {"samples_per_s": paper.TABLE6_SAMPLES_PER_S,
                            "condition": paper.TABLE6_CONDITION},
           "rows": rows, "runtime_s": time.perf_counter() - t_start}
    title = (f"pretrain step, {args.variant}, batch {rows[0]['batch']}, "
             f"{info['device_kind']} x {len(jax.devices())}, load {load_start[0]:.1f}")
    return common.write_results(stem, out, t_start, lambda png: plot(rows, png, title))


if __name__ == "__main__":
    main()
