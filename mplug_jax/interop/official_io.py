"""Official checkpoint and config files: state dicts in `.safetensors` / torch pickles, and the
official `config_bert.json` + task yaml pair.

torch is only needed for torch pickles (`.pth/.pt/.bin`); `.safetensors` files are read and
written with numpy alone.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import yaml

from mplug_jax.interop.errors import CheckpointError

Arrays = dict[str, np.ndarray]


def load_state_dict(path: str) -> Arrays:
    """Read an official checkpoint: `.safetensors` (no torch needed) or a torch pickle
    (`.pth/.pt/.bin`, loaded with weights_only=True; weights under "model"/"module" unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return dict(load_file(path))
        except Exception as err:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"could not read {path}: truncated or not a safetensors "
                                  f"file ({err})") from err
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(f"{path} is a torch pickle; install the torch extra "
                              "(pip install 'mplug-jax[torch]') or convert it to .safetensors"
                              ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"could not read {path}: truncated or not a torch checkpoint "
                              f"({type(err).__name__}: {err})") from err
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy()
            for k, v in obj.items() if hasattr(v, "numpy")}


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Write `.safetensors`, or `.pth` ({"model": state_dict}, needs torch)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({k: np.asarray(v, order="C") for k, v in state.items()}, path)
        return
    try:
        import torch
    except ImportError as err:
        raise CheckpointError("writing .pth needs torch (pip install 'mplug-jax[torch]'); "
                              "use a .safetensors path instead") from err
    torch.save({"model": {k: torch.from_numpy(np.array(v, order="C"))
                          for k, v in state.items()}}, path)


def read_official_configs(config_bert: str, config_yaml: str | None) -> tuple[dict, dict]:
    """Read official config_bert.json and task yaml (yaml optional: image_res then required
    via overrides)."""
    with open(config_bert) as f:
        bert = json.load(f)
    cfg_yaml = {}
    if config_yaml:
        with open(config_yaml) as f:
            cfg_yaml = yaml.safe_load(f) or {}
    return bert, cfg_yaml
