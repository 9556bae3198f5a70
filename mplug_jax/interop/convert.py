"""High-level conversion: official files -> (model, params) and our checkpoints <-> official."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from mplug_jax import params as P
from mplug_jax.interop import official_io
from mplug_jax.interop.errors import CheckpointError
from mplug_jax.interop.official_config import config_from_official
from mplug_jax.interop.official_keys import (HEADS_ABSENT_IN_TASK_CHECKPOINTS,
                                             export_state_dict, import_state_dict)
from mplug_jax.models.mplug import MPLUG


@dataclasses.dataclass
class Converted:
    """An official checkpoint loaded into our model."""
    model: MPLUG
    model_cfg: dict
    start_layer: int
    params: Any            # boxed param tree in the model's layout
    momentum: Any | None   # boxed tree or None when the checkpoint has no `*_m` copies
    extras: dict[str, np.ndarray]
    missing: list[str]
    notes: list[str]

    def queues(self) -> dict[str, np.ndarray]:
        """ITC feature queues of official retrieval/pretraining checkpoints in our layout:
        'image_queue'/'text_queue' float32[Q, E] (official stores [E, Q]), 'idx_queue' [Q],
        'queue_ptr' scalar. Empty when the checkpoint has none."""
        out = {}
        for name in ("image_queue", "text_queue"):
            if name in self.extras:
                out[name] = np.asarray(self.extras[name], np.float32).T
        if "idx_queue" in self.extras:
            out["idx_queue"] = np.asarray(self.extras["idx_queue"]).reshape(-1)
        if "queue_ptr" in self.extras:
            out["queue_ptr"] = np.asarray(self.extras["queue_ptr"]).reshape(())
        return out


def load_official(checkpoint: str, config_bert: str, config_yaml: str | None = None,
                  overrides: dict | None = None, seed: int = 0,
                  allow_missing: str | None = HEADS_ABSENT_IN_TASK_CHECKPOINTS
                  ) -> Converted:
    """Load an official `.pth`/`.safetensors` with its config files into our model.

    Params absent from the checkpoint and allowed by `allow_missing` keep their fresh init
    (seeded) and are listed in `missing`.
    """
    state = official_io.load_state_dict(checkpoint)
    bert, cfg_yaml = official_io.read_official_configs(config_bert, config_yaml)
    if "image_res" not in cfg_yaml and not (overrides and "image_size" in overrides):
        raise CheckpointError("image resolution unknown: pass the task yaml (image_res) or "
                              "override image_size")
    cfg_yaml.setdefault("image_res", (overrides or {}).get("image_size"))
    model_cfg, start = config_from_official(bert, cfg_yaml, state)
    model_cfg.update(overrides or {})
    model = MPLUG.from_config(model_cfg)
    loop_model = model.clone(scan_layers=False)
    shapes = {k: v.shape for k, v in P.flatten(P.abstract_params(loop_model)).items()}
    imp = import_state_dict(state, model_cfg, start, shapes, allow_missing)
    init = P.init_params(model, jax.random.PRNGKey(seed))
    params = P.merge_into(init, P.to_model_layout(imp.params, model))
    momentum = None
    if imp.momentum:
        mom_flat = dict(P.flatten(params))
        mom_flat.update(P.to_model_layout(imp.momentum, model))
        momentum = P.merge_into(init, mom_flat)
    return Converted(model, model_cfg, start, params, momentum, imp.extras, imp.missing,
                     imp.notes)


def export_official(params: Any, model: MPLUG, momentum: Any | None = None,
                    extras: dict | None = None, start_layer: int = 0,
                    exclude: list[str] | tuple = ()) -> dict[str, np.ndarray]:
    """Our (boxed or plain) params -> official state dict (numpy).

    `exclude`: our param paths not to write (e.g. heads that were not in the imported
    checkpoint, so that import -> export gives back exactly the original keys).
    """
    def loop_flat(tree):
        flat = {k: np.asarray(jax.device_get(v)) for k, v in P.flatten(tree).items()}
        flat = P.scan_to_loop(flat) if model.scan_layers else flat
        return {k: v for k, v in flat.items() if k not in exclude}
    cfg = {f.name: getattr(model, f.name) for f in dataclasses.fields(MPLUG)
           if f.name not in ("parent", "name")}
    mom = loop_flat(momentum) if momentum is not None else None
    return export_state_dict(loop_flat(params), cfg, start_layer, mom, extras)


def model_kwargs(model: MPLUG) -> dict:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(MPLUG)
            if f.name not in ("parent", "name")}


def save_converted(conv: Converted, out_dir: str) -> None:
    """Write an orbax checkpoint directory: params (+ momentum), model config, extras."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tree = {"params": P.flatten(conv.params)}
    if conv.momentum is not None:
        tree["momentum"] = P.flatten(conv.momentum)
    tree = jax.tree.map(np.asarray, tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "state"), tree, force=True)
    with open(os.path.join(out_dir, "mplug_config.json"), "w") as f:
        json.dump({"model": model_kwargs(conv.model), "start_layer": conv.start_layer,
                   "missing_from_official": conv.missing, "notes": conv.notes}, f, indent=2)
    if conv.extras:
        official_io.save_state_dict(conv.extras,
                                    os.path.join(out_dir, "official_extras.safetensors"))


def load_converted(ckpt_dir: str) -> Converted:
    """Read a directory written by `save_converted`."""
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.abspath(ckpt_dir)
    meta_path = os.path.join(ckpt_dir, "mplug_config.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{ckpt_dir} is not an mplug-jax converted checkpoint "
                                "(no mplug_config.json)")
    with open(meta_path) as f:
        meta = json.load(f)
    model = MPLUG.from_config(meta["model"])
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(ckpt_dir, "state"))
    abstract = P.abstract_params(model)
    paths = set(P.flatten(abstract))
    fresh = []

    def base_for(loaded: dict):
        # Every leaf in the file: fill the abstract tree (an eager random init of a base model
        # compiles ~300 small programs: most of a cold `predict`). Else the seeded init.
        if paths <= set(loaded):
            return abstract
        if not fresh:
            fresh.append(P.init_params(model, jax.random.PRNGKey(0)))
        return fresh[0]

    params = P.merge_into(base_for(tree["params"]), tree["params"])
    momentum = (P.merge_into(base_for(tree["momentum"]), tree["momentum"])
                if "momentum" in tree else None)
    extras_path = os.path.join(ckpt_dir, "official_extras.safetensors")
    extras = official_io.load_state_dict(extras_path) if os.path.isfile(extras_path) else {}
    return Converted(model, meta["model"], meta["start_layer"], params, momentum, extras,
                     meta.get("missing_from_official", []), meta.get("notes", []))
