"""Pretrained initialisation from `config.init`, shared by every task's `init_from_pretrained`.

Sources (any combination; where two give the same parameter the later one in this list wins):
- `init.clip`: OpenAI CLIP (.pt TorchScript, .pth, .safetensors) or an HF CLIPVisionModel
  checkpoint -> visual encoder (how the paper starts pretraining);
- `init.bert`: a BERT checkpoint -> text encoder, fusion self-attention/FFN, decoder, MLM head;
- `init.checkpoint`: a whole mPLUG: an official `.pth`/`.safetensors` (with `init.config_bert`
  and optionally `init.config_yaml`), a directory written by `mplug-jax convert`, or a training
  workdir of ours (its latest checkpoint, `init.step`, or by `init.select` its best or an
  epoch's checkpoint, `mplug_jax.selection.init_source`); this is how fine-tuning starts.

Everything is first brought to flat `a/b/c` arrays in the loop layout of our model. The
visual positional embedding is resampled when the source's resolution differs from the
model's (fine-tuning at a higher resolution, paper section 7.1). A task then renames
(`rename`: {regex: replacement}) or drops (`skip`: regexes) what it needs, and every array
left must match a parameter of the task's model in name and shape.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mplug_jax import params as P
from mplug_jax import selection
from mplug_jax import workdir as workdir_lib
from mplug_jax.interop import convert, unimodal
from mplug_jax.models.vit import resample_posemb

POSEMB = "vision/pos_embed"


@dataclasses.dataclass
class Loaded:
    """Flat loop-layout arrays from the `init` sources (`momentum` only from full checkpoints
    that have a momentum copy) and a one-line description per source."""
    params: dict[str, np.ndarray]
    momentum: dict[str, np.ndarray] | None
    sources: list[str]


def requested(init_cfg) -> bool:
    """Whether `init_cfg` names any source."""
    return bool(init_cfg) and any(init_cfg.get(k) for k in ("clip", "bert", "checkpoint"))


def load(init_cfg, model) -> Loaded:
    """Read every source named in `init_cfg` for `model` (an `MPLUG`); see module docstring."""
    kw = convert.model_kwargs(model)
    flat: dict[str, np.ndarray] = {}
    momentum, sources = None, []
    if init_cfg.get("clip"):
        flat.update(unimodal.clip_params(unimodal.load_unimodal(init_cfg.clip), kw))
        sources.append(f"CLIP {init_cfg.clip}")
    if init_cfg.get("bert"):
        flat.update(unimodal.bert_params(unimodal.load_unimodal(init_cfg.bert), kw))
        sources.append(f"BERT {init_cfg.bert}")
    if init_cfg.get("checkpoint"):
        params, momentum, what = _full_checkpoint(init_cfg)
        flat.update(params)
        sources.append(what)
    grid = model.image_size // model.patch_size
    for tree in (flat, momentum or {}):
        if POSEMB in tree and tree[POSEMB].shape[0] != grid * grid + 1:
            tree[POSEMB] = resample_posemb(tree[POSEMB], grid)
    return Loaded(flat, momentum, sources)


def _full_checkpoint(init_cfg) -> tuple[dict, dict | None, str]:
    """(params, momentum or None, description) of `init.checkpoint`, loop layout."""
    path = epath.Path(init_cfg.checkpoint)
    is_workdir = (path / "config.json").exists() and not (path / "mplug_config.json").exists()
    if not is_workdir and str(init_cfg.get("select", "") or "latest") != "latest":
        raise ValueError(f"init.select={init_cfg.select!r} picks a checkpoint of a training "
                         f"workdir; {path} is not one (set init.select='latest')")
    if (path / "mplug_config.json").exists():
        conv = convert.load_converted(str(path))
        what = f"converted checkpoint {path}"
    elif (path / "config.json").exists():
        source, step = selection.init_source(init_cfg)
        config, params, params_m = workdir_lib.restore_params(source, step)
        scan = bool(config.model.get("scan_layers", False))  # the models' default: loops
        loop = (lambda t: P.scan_to_loop(_np(t))) if scan else _np
        return loop(params), (loop(params_m) if params_m is not None else None), \
            f"workdir {source}" + (f" at step {step}" if step else "")
    elif path.is_file():
        if not init_cfg.get("config_bert"):
            raise ValueError(f"init.checkpoint={path} is an official checkpoint: also set "
                             "init.config_bert (and init.config_yaml for its image_res)")
        conv = convert.load_official(str(path), init_cfg.config_bert,
                                     init_cfg.get("config_yaml") or None)
        what = f"official checkpoint {path}"
    else:
        raise FileNotFoundError(
            f"init.checkpoint={path}: neither an official checkpoint file, a `mplug-jax "
            "convert` directory (mplug_config.json) nor a training workdir (config.json)")
    to_loop = P.scan_to_loop if conv.model.scan_layers else dict
    params = to_loop(_np(conv.params))
    momentum = to_loop(_np(conv.momentum)) if conv.momentum is not None else None
    return params, momentum, what


def _np(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in P.flatten(tree).items()}


def select(flat: Mapping[str, np.ndarray], rename: Mapping[str, str] | None = None,
           skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Drop keys matching any `skip` regex, then apply `rename` ({regex: replacement}, in
    order) to the rest (e.g. NLVR2 copying one cross-attention into two branches is a task's
    own step after this)."""
    out = {}
    for k, v in flat.items():
        if any(re.search(s, k) for s in skip):
            continue
        for pat, rep in (rename or {}).items():
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def put(tree: Any, flat: Mapping[str, np.ndarray], layout_model, what: str = "params") -> Any:
    """Replace leaves of `tree` (a sharded param tree) by `flat` (loop layout), keeping each
    leaf's dtype and sharding. Raises naming every array that has no parameter or the wrong
    shape."""
    flat = P.to_model_layout(flat, layout_model)
    leaves = flax.traverse_util.flatten_dict(tree, sep="/")
    bad = [f"{k} {tuple(v.shape)} -> " + (f"{tuple(leaves[k].shape)}" if k in leaves
                                          else "no such parameter")
           for k, v in flat.items() if k not in leaves or leaves[k].shape != v.shape]
    if bad:
        raise ValueError(f"init: {len(bad)} {what} arrays do not fit the model: "
                         + "; ".join(bad[:10]))
    for k, v in flat.items():
        leaves[k] = jax.device_put(jnp.asarray(v, leaves[k].dtype), leaves[k].sharding)
    return flax.traverse_util.unflatten_dict(leaves, sep="/")
