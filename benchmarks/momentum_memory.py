r"""Memory of the pretraining momentum copy `params_m`: a full copy of the params vs the reduced one.

    python benchmarks/momentum_memory.py --variant=base --devices=8

(writes benchmarks/results/momentum_memory_<variant>.json; add `--out PATH` for elsewhere.)

Shapes only (`jax.eval_shape` of `tasks.build(config).init_params` and `trainer.setup`'s
abstract TrainState with its shardings on `--devices` fake CPU devices): nothing is allocated
and nothing is compiled, so it runs in well under a minute on a laptop.

- Parameter counts per top-level key of the model, and per component group (vision, text,
  fusion, decoder, heads).
- "before" = a copy of every parameter (what `params_m` held until it kept only what the
  momentum forwards read): its per-device bytes equal those of the `params` group of the
  TrainState, since the copy is sharded like the params.
- "after" = what `params_m` holds now (`Task.momentum_filter`, `MOMENTUM_PARAMS`): the
  `extra/params_m/...` leaves of the TrainState, per device from their real shardings.
  Whole-model bytes are element counts x 4 (the params and their momentum copy are float32).

Per-device bytes are counted like `mplug_jax.plan` (shard shape x itemsize, from the partition
spec); the script also reports the ceil-divided shard bytes (what a padded uneven shard takes)
so that a floor-vs-ceil difference would show.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top-level parameter key -> component group of the brief's table.
GROUPS = {
    "vision": "vision", "visn_fc": "vision", "visn_ln": "vision",
    "text": "text",
    "fusion": "fusion",
    "decoder": "decoder",
}  # everything else (vision_proj, text_proj, itm_head, mlm_*, temp): "heads"


def group_of_key(key: str) -> str:
    return GROUPS.get(key, "heads")


def _set_devices(n: int) -> None:
    """Fake `n` CPU devices; must run before JAX starts its backend."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="base", help="configs/pretrain.py variant (base, large)")
    p.add_argument("--devices", type=int, default=8,
                   help="fake CPU devices for the per-device numbers (fsdp over all of them)")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/"
                                 "momentum_memory_<variant>.json)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    t0 = time.time()
    _set_devices(args.devices)

    sys.path.insert(0, ROOT)
    import jax
    import flax.linen as nn
    from mplug_jax import plan, tasks, trainer

    spec = os.path.join(ROOT, "configs", "pretrain.py") + ":" + args.variant
    config = plan.load_config(spec)

    # 1. Parameter counts per top-level key, from the task's own init (abstract).
    task = tasks.build(config)
    abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    abstract = nn.meta.unbox(abstract)
    count = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in abstract.items()}
    nbytes = {k: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(v)))
              for k, v in abstract.items()}
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(abstract)})
    keep = task.momentum_filter()
    kept_keys = sorted(k for k in abstract if keep(k))
    dropped_keys = sorted(k for k in abstract if not keep(k))
    groups: dict[str, int] = {}
    for k, n in count.items():
        groups[group_of_key(k)] = groups.get(group_of_key(k), 0) + n
    total = sum(count.values())
    kept = sum(count[k] for k in kept_keys)

    # 2. Per-device bytes from the real TrainState shardings (fsdp over all devices).
    s = trainer.setup(config, steps_per_epoch=max(
        config.input.train_size // config.input.batch_size, 1))
    rows = plan.leaf_rows(s.abstract, s.shardings, s.mesh)
    per_dev = plan.group_bytes(rows)

    # ceil-divided shard bytes (padding of uneven shards), recomputed from the shardings.
    ceil_dev = {"params": 0, "momentum": 0}

    def add(keypath, x, sh):
        g = plan.group_of(plan._path(keypath))
        if g not in ceil_dev:
            return
        shape = []
        for i, d in enumerate(x.shape):
            axes = sh.spec[i] if i < len(sh.spec) else None
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            shape.append(-(-d // math.prod(s.mesh.shape[a] for a in names)))
        ceil_dev[g] += math.prod(shape) * x.dtype.itemsize

    jax.tree.map_with_path(add, s.abstract, s.shardings)
    state_params = sum(x.size for x in jax.tree.leaves(s.abstract.params))
    state_mom = sum(x.size for x in jax.tree.leaves(s.abstract.extra.get("params_m", {})))
    assert state_params == total, (state_params, total)
    assert state_mom == kept, (state_mom, kept)

    n_dev = s.mesh.size
    before_whole, after_whole = 4 * total, 4 * kept
    before_dev, after_dev = per_dev["params"], per_dev["momentum"]
    load_after = os.getloadavg()
    result = {
        "command": f"python benchmarks/momentum_memory.py --variant={args.variant} "
                   f"--devices={args.devices}",
        "script": "benchmarks/momentum_memory.py",
        "config": f"configs/pretrain.py:{args.variant}",
        "mesh": dict(s.mesh.shape), "rules": config.mesh.sharding, "devices": n_dev,
        "param_dtypes": dtypes,
        "params_per_top_level_key": dict(sorted(count.items(), key=lambda kv: -kv[1])),
        "params_per_group": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "params_total": total,
        "momentum_keys_kept": kept_keys,
        "momentum_keys_dropped": dropped_keys,
        "momentum_params_before": total,
        "momentum_params_after": kept,
        "bytes_float32": {
            "whole_model": {"before_full_copy": before_whole, "after_reduced_copy": after_whole,
                            "saved": before_whole - after_whole},
            "per_device": {"before_full_copy": before_dev, "after_reduced_copy": after_dev,
                           "saved": before_dev - after_dev,
                           "note": "before = the TrainState `params` group per device (the "
                                   "full copy was sharded like the params); after = the "
                                   "`extra/params_m` leaves; counted like mplug_jax.plan "
                                   "(floor-divided shard shapes)"},
            "per_device_ceil_padded": {"before_full_copy": ceil_dev["params"],
                                       "after_reduced_copy": ceil_dev["momentum"]},
            "per_device_x_devices": {"before_full_copy": before_dev * n_dev,
                                     "after_reduced_copy": after_dev * n_dev,
                                     "note": "above the whole-model bytes by the leaves the "
                                             "fsdp rules leave replicated (biases, LayerNorm "
                                             "scales, ...), held on every device"},
        },
        "mib_float32": {"whole_model_before": before_whole / 2**20,
                        "whole_model_after": after_whole / 2**20,
                        "per_device_before": before_dev / 2**20,
                        "per_device_after": after_dev / 2**20},
        "fraction_saved": (before_whole - after_whole) / before_whole,
        "fraction_saved_per_device": (before_dev - after_dev) / before_dev,
        "machine": {"uname_m": platform.machine(), "nproc": os.cpu_count(),
                    "python": platform.python_version(), "jax": jax.__version__},
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "wall_s": round(time.time() - t0, 1),
    }

    mb = 2**20
    print(f"# {result['command']}")
    print(f"# machine: {platform.machine()} / {os.cpu_count()}, load average before/after: "
          f"{load_before} / {load_after}")
    print(f"{'top-level key':<16}{'group':<9}{'params':>14}{'MiB f32':>10}  momentum")
    for k, n in sorted(count.items(), key=lambda kv: -kv[1]):
        print(f"{k:<16}{group_of_key(k):<9}{n:>14,}{nbytes[k] / mb:>10.1f}  "
              f"{'kept' if k in kept_keys else 'dropped'}")
    print(f"{'total':<25}{total:>14,}{4 * total / mb:>10.1f}")
    print("groups: " + ", ".join(f"{g} {n / 1e6:.1f} M" for g, n in result["params_per_group"]
                                 .items()))
    print(f"momentum copy, whole model: {before_whole / mb:,.1f} MiB (full) -> "
          f"{after_whole / mb:,.1f} MiB (reduced), {100 * result['fraction_saved']:.1f}% saved")
    print(f"momentum copy, per device ({n_dev} devices, {config.mesh.sharding}): "
          f"{before_dev / mb:,.1f} MiB -> {after_dev / mb:,.1f} MiB, "
          f"{100 * result['fraction_saved_per_device']:.1f}% saved (ceil-padded: "
          f"{ceil_dev['params'] / mb:,.1f} -> {ceil_dev['momentum'] / mb:,.1f} MiB)")

    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"momentum_memory_{args.variant}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
