"""Official checkpoint and config files: state dicts in `.safetensors` / torch pickles, and the
official `config_bert.json` + task yaml pair.

`.safetensors` files are read and written with numpy alone. Torch pickles (`.pth/.pt/.bin`) are
read with `torch.load(weights_only=True)`, or without torch by `mplug_jax.safe_pickle` (zip
archives; TorchScript archives always): neither runs code from the file.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import yaml

from mplug_jax import safe_pickle
from mplug_jax.interop.errors import CheckpointError

Arrays = dict[str, np.ndarray]


def load_state_dict(path: str) -> Arrays:
    """Read an official checkpoint: `.safetensors` or a torch pickle (`.pth/.pt/.bin`, read
    without running code, see the module doc; weights under "model"/"module"/"state_dict"
    unwrapped). Raises CheckpointError naming the file for anything else."""
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
    except ImportError:
        torch = None
    if torch is None or safe_pickle.is_torchscript(path):
        # No torch: the safe reader takes zip archives (torch.save >= 1.6) on its own.
        # TorchScript: torch.load refuses it under weights_only; never torch.jit.load it.
        try:
            obj = safe_pickle.load(path)
        except safe_pickle.PickleReadError as err:
            raise CheckpointError(str(err)) from err
        if isinstance(obj, safe_pickle.ScriptObject):
            obj = safe_pickle.script_state_dict(obj)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            _raise_if_refused(path, err)
            first = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(f"could not read {path}: truncated or not a torch checkpoint "
                                  f"({type(err).__name__}: {first})") from err
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    arrays = {k: _to_numpy(v) for k, v in obj.items()}
    return {k: v for k, v in arrays.items() if v is not None}


def _raise_if_refused(path: str, err: Exception) -> None:
    """After torch.load(weights_only=True) failed: a one-line CheckpointError naming the object
    it refused when the safe reader refuses one too (torch's own message is many lines)."""
    try:
        safe_pickle.load(path)
    except safe_pickle.UnsafeObjectError as refused:
        raise CheckpointError(str(refused)) from err
    except safe_pickle.PickleReadError:
        pass


def _to_numpy(value) -> np.ndarray | None:
    """A tensor or array as numpy (16-bit floats widened to float32); None for other values."""
    if hasattr(value, "numpy") and hasattr(value, "dtype") and not isinstance(value, np.ndarray):
        import torch
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype.itemsize == 2 and \
            value.dtype.kind not in "iub" else value
    return None


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Write `.safetensors`, or `.pth` ({"model": state_dict}, needs torch); missing parent
    folders are created."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory: pass a file path ending in .safetensors "
                              "or .pth")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
