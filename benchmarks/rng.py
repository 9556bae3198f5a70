"""PRNG implementations (`config.rng_impl`) on the real pretraining step.

For threefry, rbg and unsafe_rbg it compiles the step of `configs/pretrain.py:<variant>` (the
default recipe unless overridden; `benchmarks/pretrain_step.py` builds config and batch),
reads the compiled temporaries and FLOPs (`memory_analysis()`, `cost_analysis()`), then times
the three steps round-robin on one fixed batch (load changes hit all three alike) and reports
each as a ratio to threefry.

    python benchmarks/rng.py                     # base, batch 4, 2 host devices -> rng_cpu2.json
    python benchmarks/rng.py --variant tiny --steps 2 --out-dir /tmp/r   # quick check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (no jax import)
import pretrain_step  # noqa: E402

IMPLS = ("threefry", "rbg", "unsafe_rbg")


def layout_check(impl: str, steps: int = 2) -> dict:
    """Does `impl` give the same losses on 1 device as data-parallel over every host device?
    `tiny,mode=smoke`, batch 8, `steps` steps from one seed (threefry must: the suite checks it
    at 8 devices; rbg's bits may depend on how the random arrays are partitioned)."""
    import jax
    import numpy as np

    from configs import pretrain
    from mplug_jax import sharding as shd
    from mplug_jax import trainer
    from mplug_jax.data.pipeline import make_global_batch

    c = pretrain.get_config("tiny,mode=smoke")
    c.rng_impl, c.input.batch_size, c.input.max_tokens = impl, 8, 8
    c.task.itc.queue_size = 16
    losses = {}
    n = len(jax.devices())
    for name, devices in (("1 device", jax.devices()[:1]), (f"{n} devices", jax.devices())):
        mesh = shd.make_mesh({"data": len(devices), "fsdp": 1, "tensor": 1}, devices=devices)
        batch = pretrain_step.random_batch(c)
        s = trainer.setup(c, steps_per_epoch=10, mesh=mesh)
        step = trainer.compile_step(s, c, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))
        state = trainer.init_state(s, 0)
        out = []
        for _ in range(steps):
            state, m = step(state, make_global_batch(batch, mesh))
            out.append(float(m["train/loss"]))
        losses[name] = out
    a, b = losses.values()
    return {"losses": losses, "max_rel_diff": float(np.max(np.abs(np.subtract(a, b)) /
                                                           np.abs(a)))}


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="base", choices=pretrain_step.VARIANTS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--devices", type=int, default=2, help="XLA host devices (CPU only)")
    p.add_argument("--no-layout-check", action="store_true",
                   help="skip the 1-device vs all-devices loss comparison (tiny)")
    p.add_argument("--out-dir", default=common.RESULTS)
    args, overrides = p.parse_known_args(argv)
    threads = common.set_cpu_threads(args.threads)
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               + os.environ.get("XLA_FLAGS", ""))
    import jax

    from mplug_jax import metrics, trainer
    from mplug_jax import sharding as shd
    from mplug_jax.data.pipeline import make_global_batch

    info = common.machine_info()
    load_start = common.load_average()
    bargs = pretrain_step.parse_args(["--variant", args.variant, "--batch", str(args.batch),
                                      *overrides])
    from mplug_jax import rng as rng_lib
    rows, calls, steps = {}, {}, {}
    c0 = pretrain_step.build_config(bargs)
    mesh = shd.make_mesh(c0.mesh.shape)
    batch = pretrain_step.random_batch(c0)
    gb = make_global_batch(batch, mesh)
    for impl in IMPLS:
        c = pretrain_step.build_config(bargs)
        c.rng_impl = impl
        s = trainer.setup(c, steps_per_epoch=100, mesh=mesh)
        t = time.perf_counter()
        steps[impl] = trainer.compile_step(s, c, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))
        compile_s = time.perf_counter() - t
        mem = steps[impl].memory_analysis()
        stats = metrics.compiled_stats(steps[impl])
        rows[impl] = {"config": pretrain_step.describe(c), "compile_s": round(compile_s, 1),
                      "temp_bytes": int(mem.temp_size_in_bytes),
                      "argument_bytes": int(mem.argument_size_in_bytes),
                      "peak_bytes": int(stats["peak_bytes"]),
                      "gflop_per_device": stats["flops"] / 1e9}
        print(f"{impl:11s} compiled in {compile_s:.0f} s: temporaries "
              f"{mem.temp_size_in_bytes / 2**20:.1f} MiB/device, "
              f"{stats['flops'] / 1e9:.1f} GFLOP/device", flush=True)
        if impl == IMPLS[0]:
            holder = {"state": trainer.init_state(s, 0)}
    # One train state (a base state is several GiB) passed from step to step; each impl's call
    # swaps in a base key of its own kind. The params drift, the work per step does not.
    keys = {impl: jax.device_get(jax.random.key_data(rng_lib.seed_key(0, impl)))
            for impl in IMPLS}  # host copies: the step donates its state, key included
    for impl in IMPLS:
        def run(gb, impl=impl):
            state = holder["state"].replace(rng=jax.device_put(keys[impl],
                                                               shd.replicated(mesh)))
            holder["state"], out = steps[impl](state, gb)
            # Wait for the whole state: with 2 host devices, a step whose collectives overlap
            # the next impl's step deadlocked XLA:CPU's rendezvous (seen on a loaded CPU).
            jax.block_until_ready(holder["state"])
            return out
        calls[impl] = (run, (gb,))
    timed = common.time_interleaved(calls, repeats=args.steps)
    ref = rows["threefry"]
    for impl in IMPLS:
        r = rows[impl]
        r.update(step_times_s=timed[impl]["times_s"], step_time_s=timed[impl]["median_s"],
                 loss_after_warmup_and_steps=float(jax.device_get(calls[impl][0](
                     calls[impl][1][0])["train/loss"])))
    for impl in IMPLS:
        r = rows[impl]
        r["temp_over_threefry"] = round(r["temp_bytes"] / ref["temp_bytes"], 4)
        r["step_time_over_threefry"] = round(r["step_time_s"] / ref["step_time_s"], 3)
        r["flops_over_threefry"] = round(r["gflop_per_device"] / ref["gflop_per_device"], 4)
        print(f"{impl:11s} step {r['step_time_s']:.3f} s (x{r['step_time_over_threefry']}), "
              f"temporaries x{r['temp_over_threefry']}, FLOPs x{r['flops_over_threefry']}")
    layout = {}
    if not args.no_layout_check:
        for impl in IMPLS:
            layout[impl] = layout_check(impl)
            print(f"{impl:11s} 1 device vs {len(jax.devices())}: losses {layout[impl]['losses']}"
                  f" (max rel. diff {layout[impl]['max_rel_diff']:.2e})", flush=True)
    tag = f"cpu{args.threads}" if info["platform"] == "cpu" else \
        info["device_kind"].replace(" ", "_")
    out = {"benchmark": "rng", "variant": args.variant, "batch": args.batch,
           "overrides": overrides, "machine": info, "threads": threads,
           "load_avg_start": load_start, "load_avg_end": common.load_average(),
           "timing": f"median of {args.steps} round-robin steps after 1 warm-up each",
           "rows": rows, "layout_check": layout, "runtime_s": round(time.perf_counter() - t_start, 1)}
    path = os.path.join(args.out_dir, f"rng_{tag}.json")
    common.write_json(path, out)
    print(f"wrote {path}; total runtime {time.perf_counter() - t_start:.0f} s")
    return out


if __name__ == "__main__":
    main()
