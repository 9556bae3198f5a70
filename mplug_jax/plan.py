"""Ahead-of-time planning: the state's sharding table and the per-device memory / FLOPs of a step.

Both work from abstract shapes only (`jax.eval_shape`, `ShapeDtypeStruct`s with shardings): no
parameter is ever allocated, so `large` can be planned for 8 x 40 GB on a laptop with fake CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, which the `mplug-jax plan` /
`shardings` subcommands set before JAX starts).

- `state_table`: one row per TrainState leaf: path, global shape, dtype, partition spec and the
  per-device shard shape, then per-group totals (what `mplug-jax shardings` prints; the golden
  files under `tests/golden/` are its output).
- `plan`: compiles the train step for the config's mesh (MaxText `train_compile.py`) and reports
  per-device bytes of params, optimizer state, momentum params, queues, batch, and the
  compiled temporaries (activations), the FLOPs per step and whether it fits a device.

Memory numbers come from the CPU compiler: XLA:GPU schedules and fuses differently (and keeps
bf16 dots in bf16 where XLA:CPU may upcast), so treat temporaries as an estimate (+-20%).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from mplug_jax import config_args, config_checks, trainer

GROUPS = ("params", "opt_state", "momentum", "queues", "other")


def load_config(spec: str, overrides: Sequence[str] = ()):
    """A config from `path[:arg]` plus `--config.a.b=value` overrides (ml_collections syntax;
    `config_args.load_config`, whose errors are one-line `ConfigError`s).

    Args:
      spec: e.g. 'configs/pretrain.py:large'.
      overrides: e.g. ['--config.model.dtype=bfloat16'] (the leading '--' is optional).
    """
    return config_args.load_config(spec, overrides)


def _path(keypath) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def group_of(path: str) -> str:
    """Memory group of a TrainState leaf path."""
    if path.startswith("params/"):
        return "params"
    if path.startswith("opt_state/"):
        return "opt_state"
    if path.startswith("extra/params_m/"):
        return "momentum"
    if path.startswith("extra/") and "queue" in path:
        return "queues"
    return "other"


def shard_shape(shape: tuple, spec, mesh) -> tuple:
    """Per-device shape of an array of `shape` sharded as `spec` on `mesh`."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        out.append(dim // math.prod(mesh.shape[a] for a in names))
    return tuple(out)


def _fmt_spec(spec) -> str:
    return "(" + ", ".join("None" if a is None else a if isinstance(a, str) else
                           "(" + ",".join(a) + ")" for a in spec) + ")"


def leaf_rows(abstract, shardings, mesh) -> list[dict]:
    """[{path, shape, dtype, spec, local, bytes (per device), group}] for every state leaf."""
    rows = []

    def add(keypath, x, s):
        path = _path(keypath)
        local = shard_shape(tuple(x.shape), tuple(s.spec), mesh)
        rows.append(dict(path=path, shape=tuple(x.shape), dtype=jnp.dtype(x.dtype).name,
                         spec=_fmt_spec(tuple(s.spec)), local=local, group=group_of(path),
                         bytes=math.prod(local) * jnp.dtype(x.dtype).itemsize))

    jax.tree.map_with_path(add, abstract, shardings)
    return rows


def group_bytes(rows: list[dict]) -> dict[str, int]:
    """Per-device bytes of each group in `GROUPS`."""
    out = dict.fromkeys(GROUPS, 0)
    for r in rows:
        out[r["group"]] += r["bytes"]
    return out


def mib(n: float) -> str:
    """Bytes as MiB (GiB above 10 GiB, KiB below 0.1 MiB)."""
    if n >= 10 * 2**30:
        return f"{n / 2**30:,.2f} GiB"
    if 0 < n < 0.1 * 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB"


def state_table(config, mesh=None) -> str:
    """The readable sharding table of the config's TrainState (what `mplug-jax shardings` prints).

    Args:
      config: a run config (`mesh.shape`, `mesh.sharding`, model, task, optim).
      mesh: optional mesh (default: `config.mesh.shape` over all devices).
    """
    config_checks.check(config, training=mesh is None, files=False)
    s = trainer.setup(config, steps_per_epoch=1000, mesh=mesh)
    rows = leaf_rows(s.abstract, s.shardings, s.mesh)
    cols = [("leaf", "path"), ("shape", "shape"), ("dtype", "dtype"), ("spec", "spec"),
            ("per-device", "local")]
    cells = [[str(r[k]) for _, k in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    mesh_desc = ", ".join(f"{k}={v}" for k, v in s.mesh.shape.items())
    lines = [f"# mesh: {mesh_desc} ({s.mesh.size} devices); rules: {config.mesh.sharding}",
             "  ".join(h.ljust(w) for (h, _), w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    totals = group_bytes(rows)
    lines.append("# per-device: " + ", ".join(f"{g} {mib(b)}" for g, b in totals.items()))
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Plan:
    """Per-device memory (bytes) and FLOPs of one compiled train step."""
    variant: str
    mesh: dict
    rules: str
    dtype: str
    remat: str
    batch_size: int
    n_params: int
    state: dict  # group -> per-device bytes
    batch_bytes: int  # per device
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops_per_device: float
    device_memory_gb: float

    @property
    def total_bytes(self) -> int:
        """Live bytes at the peak: inputs + outputs not aliased to donated inputs + temps."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes \
            + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_memory_gb * 1e9


def _batch_abstract(s, config) -> dict:
    b = config.input.batch_size
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype),
                         s.task.dummy_batch(1))
    batch["idx"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    return batch


def plan(config, mesh=None, device_memory_gb: float = 40.0) -> Plan:
    """Compile the train step for `config` ahead of time and measure it (no allocation).

    Args:
      config: a run config; its `mesh.shape` is laid over the available devices.
      mesh: optional mesh (default: `config.mesh.shape` over all devices).
      device_memory_gb: memory of one target device, for `Plan.fits` (10^9 bytes).
    """
    # Input files are not read; the batch split is checked against `mesh` by `setup`.
    config_checks.check(config, training=mesh is None, files=False)
    s = trainer.setup(config, steps_per_epoch=max(
        config.input.train_size // config.input.batch_size, 1), mesh=mesh)
    batch = _batch_abstract(s, config)
    compiled = trainer.compile_step(s, config, batch)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    rows = leaf_rows(s.abstract, s.shardings, s.mesh)
    n_batch = s.mesh.shape["data"] * s.mesh.shape["fsdp"]
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // n_batch
    return Plan(
        variant=str(config.get("variant", "?")), mesh=dict(s.mesh.shape),
        rules=config.mesh.sharding, dtype=f"{config.model.dtype}/{config.model.param_dtype}",
        remat=config.model.remat_policy, batch_size=config.input.batch_size,
        n_params=sum(x.size for x in jax.tree.leaves(s.abstract.params)),
        state=group_bytes(rows), batch_bytes=int(batch_bytes),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(
            mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), code_bytes=int(
            mem.generated_code_size_in_bytes),
        flops_per_device=float((cost or {}).get("flops", 0.0)),
        device_memory_gb=device_memory_gb)


def _flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x / 1e6:,.2f} MFLOP"


def format_plan(p: Plan) -> str:
    """The human-readable report of `plan` (what `mplug-jax plan` prints)."""
    n_dev = math.prod(p.mesh.values())
    mesh = ", ".join(f"{k}={v}" for k, v in p.mesh.items())
    gb = 1e9
    lines = [
        f"plan: variant {p.variant}, mesh {mesh} ({n_dev} devices), rules {p.rules}, "
        f"dtype {p.dtype}, remat {p.remat}",
        f"global batch {p.batch_size} ({p.batch_size // (p.mesh['data'] * p.mesh['fsdp'])} per "
        f"batch shard); {p.n_params / 1e6:,.1f} M params",
        "per-device memory:",
        f"  params               {mib(p.state['params']):>14}",
        f"  optimizer state      {mib(p.state['opt_state']):>14}",
        f"  momentum params      {mib(p.state['momentum']):>14}",
        f"  ITC queues           {mib(p.state['queues']):>14}",
        f"  other state          {mib(p.state['other']):>14}",
        f"  batch                {mib(p.batch_bytes):>14}",
        f"  compiled arguments   {mib(p.argument_bytes):>14}   (state + batch)",
        f"  compiled outputs     {mib(p.output_bytes):>14}   ({mib(p.alias_bytes)} aliased to "
        "the donated state)",
        f"  activations / temps  {mib(p.temp_bytes):>14}",
        f"  generated code       {mib(p.code_bytes):>14}",
        f"  total (peak)         {mib(p.total_bytes):>14}   = {p.total_bytes / gb:.2f} GB",
        f"FLOPs per step: {_flops(p.flops_per_device)} per device (compiled per-device "
        f"program), {_flops(p.flops_per_device * n_dev)} over {n_dev} devices",
    ]
    verdict = "fits" if p.fits else "does NOT fit"
    share = p.total_bytes / (p.device_memory_gb * gb)
    lines.append(f"{verdict} in {p.device_memory_gb:g} GB per device "
                 f"({p.total_bytes / gb:.2f} GB needed, {100 * share:.0f}%)")
    return "\n".join(lines) + "\n"
