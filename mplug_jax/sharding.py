"""Device mesh, logical-axis rule presets and the shardings of the train state and batches.

Mesh axes are `data`, `fsdp`, `tensor`; the batch is split over ('data', 'fsdp'). Parameters
carry logical axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`, `layers`, see
`models/layers.py`); the ITC feature queues `float32[Q, E]` carry (`queue`, None); a rule
preset maps them to mesh axes (MaxText style). State shardings are derived once from
`jax.eval_shape` of the init via `nn.logical_to_mesh_sharding`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Activations (`layers.constrain`): batch over the batch axes; heads / MLP hidden over `tensor`
# where tensor parallelism is on (a mesh axis of size 1 makes any rule a no-op).
_ACT = (("batch", BATCH_AXES), ("length", None), ("act_embed", None))
_ACT_REPLICATED = _ACT + (("act_mlp", None), ("act_heads", None))
RULES: dict[str, tuple] = {
    # Pure data parallelism: every parameter replicated.
    "dp": _ACT_REPLICATED + (("embed", None), ("mlp", None), ("heads", None), ("kv", None),
                             ("vocab", None), ("norm", None), ("layers", None),
                             ("queue", None)),
    # ZeRO-3 style: parameters, optimizer state, momentum params (same logical axes) split
    # along `embed`, and the ITC queues along `queue`, over `fsdp`.
    "fsdp": _ACT_REPLICATED + (("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None),
                               ("vocab", None), ("norm", None), ("layers", None),
                               ("queue", "fsdp")),
    # FSDP + Megatron tensor parallelism over heads / MLP / vocabulary.
    "fsdp_tp": _ACT + (("act_mlp", "tensor"), ("act_heads", "tensor"), ("embed", "fsdp"),
                       ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
                       ("vocab", "tensor"), ("norm", None), ("layers", None),
                       ("queue", "fsdp")),
}


def rules(name: str) -> tuple:
    """The logical-axis rules of a preset ('dp', 'fsdp', 'fsdp_tp')."""
    if name not in RULES:
        raise ValueError(f"unknown sharding preset {name!r}; valid: {sorted(RULES)}")
    return RULES[name]


def mesh_sizes(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """{axis: size} of a mesh `shape` on `n_devices` (the -1 axis resolved); ValueError when
    the shape is invalid or needs more devices than there are."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    if any(s < 1 and s != -1 for s in sizes):
        raise ValueError(f"mesh sizes must be >= 1 (or -1: the rest), got {dict(shape)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ValueError(f"{n_devices} devices do not divide into mesh {dict(shape)}")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) > n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {n_devices}")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over `devices` (default all) from {data, fsdp, tensor} sizes; one size may be -1
    (the rest of the devices). A fully explicit shape smaller than the device count uses the
    first devices (with a warning).

    Args:
      shape: e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}.
      devices: optional device list (tests build a 1-device mesh this way).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(mesh_sizes(shape, len(devices)).values())
    if math.prod(sizes) < len(devices):  # an explicit smaller shape uses the first devices
        logging.warning("mesh %s uses %d of %d devices", dict(zip(MESH_AXES, sizes)),
                        math.prod(sizes), len(devices))
        devices = devices[:math.prod(sizes)]
    # Auto axes: GSPMD propagates shardings (jax >= 0.7 defaults make_mesh to Explicit axes).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch-major arrays: leading axis over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(boxed_tree: Any, mesh: Mesh, rule_set: tuple) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

    Unboxed leaves are replicated. The result has the structure of the *unboxed* tree.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rule_set)


def check_divisible(abstract_tree: Any, shardings: Any, mesh: Mesh) -> None:
    """Raise a readable error when a sharded dimension does not divide by its mesh axes."""
    def check(path, x, s):
        for dim, axes in zip(x.shape, s.spec):
            names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            n = math.prod(mesh.shape[a] for a in names)
            if dim % n:
                raise ValueError(f"{jax.tree_util.keystr(path)} of shape {x.shape} cannot be "
                                 f"sharded as {s.spec} on mesh {dict(mesh.shape)}")
    jax.tree.map_with_path(check, abstract_tree, shardings)


def sharding_table(abstract_tree: Any, shardings: Any) -> str:
    """One line per leaf: path, shape, partition spec (for logs and golden files)."""
    rows = []
    jax.tree.map_with_path(lambda p, x, s: rows.append(
        f"{jax.tree_util.keystr(p)} {tuple(x.shape)} {tuple(s.spec)}"), abstract_tree, shardings)
    return "\n".join(rows)
