"""Param-tree helpers: dummy inputs, (abstract) init, flat 'a/b/c' paths, scan <-> loop layouts."""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.models.mplug import MPLUG

# Homogeneous stacks that `scan_layers` stacks along a leading 'layers' axis.
SCAN_STACKS = ("vision/blocks", "text/encoder/layer", "decoder/decoder/layer")


def dummy_inputs(model: MPLUG, batch: int = 1, text_len: int = 4) -> tuple:
    """Smallest valid (image, text_ids, text_mask, dec_ids, dec_mask) for `model.init`."""
    image = jnp.zeros((batch, model.image_size, model.image_size, 3), jnp.float32)
    ids = jnp.ones((batch, text_len), jnp.int32)
    return image, ids, ids, ids, ids


def init_params(model: MPLUG, rng: jax.Array) -> Any:
    """Boxed (LogicallyPartitioned) params of `model`."""
    return model.init(rng, *dummy_inputs(model))["params"]


def abstract_params(model: MPLUG) -> Any:
    """ShapeDtypeStruct tree of the boxed params, without allocating anything."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


def flatten(tree: Any) -> dict[str, Any]:
    """Nested (possibly boxed) params -> {'a/b/c': leaf}, unboxed."""
    return flax.traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
    return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def loop_to_scan(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Stack `{stack}_{i}/...` leaves into `{stack}/...` with a leading layer axis."""
    out, groups = {}, {}
    for k, v in flat.items():
        for stack in SCAN_STACKS:
            m = re.match(rf"^{re.escape(stack)}_(\d+)/(.*)$", k)
            if m:
                groups.setdefault((stack, m.group(2)), {})[int(m.group(1))] = v
                break
        else:
            out[k] = v
    for (stack, rest), layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{stack}: layers {sorted(layers)} are not 0..n-1")
        out[f"{stack}/{rest}"] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
    return out


def scan_to_loop(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `loop_to_scan`."""
    out = {}
    for k, v in flat.items():
        stack = next((s for s in SCAN_STACKS if k.startswith(s + "/")), None)
        if stack is None:
            out[k] = v
            continue
        rest = k[len(stack) + 1:]
        for i in range(v.shape[0]):
            out[f"{stack}_{i}/{rest}"] = np.asarray(v[i])
    return out


def to_model_layout(flat: Mapping[str, Any], model: MPLUG) -> dict[str, Any]:
    """Loop-layout flat params -> the layout `model` uses (scan when `scan_layers`)."""
    return loop_to_scan(flat) if model.scan_layers else dict(flat)


def merge_into(boxed_init: Any, flat_loaded: Mapping[str, Any]) -> Any:
    """Replace leaves of a boxed init tree by loaded arrays (same paths), keeping the boxes."""
    loaded = dict(flat_loaded)

    def replace(path, leaf):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if key not in loaded:
            return leaf
        new = jnp.asarray(loaded.pop(key), leaf.dtype if hasattr(leaf, "dtype") else None)
        if isinstance(leaf, nn.LogicallyPartitioned):
            return leaf.replace_boxed(new)
        return new

    merged = jax.tree_util.tree_map_with_path(
        replace, boxed_init, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    if loaded:
        raise KeyError(f"loaded params not in the model: {sorted(loaded)[:20]}")
    return merged
