"""Whole mPLUG-2 checkpoints -> flat params of an mPLUG-2 model (every mPLUG-2 task's init).

`init.checkpoint` may name:
- a directory written by `mplug-jax convert` from an official mPLUG-2 file
  (`mplug2.convert.load_converted`);
- an official mPLUG-2 `.pth` with `init.config_bert` and `init.config_yaml`
  (`mplug2.convert.load_official`);
- a training workdir of any task in `WORKDIR_TASKS` (its latest checkpoint, or `init.step`).

The arrays are fitted to the model that takes them: the retrieval / pretraining heads
(`mplug2.heads.HEAD_PARAMS`) are dropped for a model without them, the local temporal modules
for `temporal=False`, and the visual positional embedding is resampled bilinearly when the
frame grid differs (official fine-tuning does the same). `pretrained.put` then writes them
into a sharded param tree.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from mplug_jax import params as P
from mplug_jax import pretrained, task_names
from mplug_jax.models.vit import resample_posemb
from mplug_jax.mplug2.heads import HEAD_PARAMS

POSEMB = pretrained.POSEMB
TEMPORAL_PARAMS = r"^vision/blocks_\d+/lmhra[12]/"
# Workdirs whose params any mPLUG-2 task loads (same backbone names).
WORKDIR_TASKS = ("mplug2.video_qa", "mplug2.video_caption", "mplug2.retrieval",
                 "mplug2.pretrain")


def is_temporal(name: str) -> bool:
    """Whether flat param `name` belongs to a local temporal module (`lmhra1` / `lmhra2`)."""
    return re.search(TEMPORAL_PARAMS, name) is not None


def read(init, task_name: str):
    """(param tree, description) of `init.checkpoint` as stored (module docstring); a clear
    error for a path that is none of the three kinds or a workdir of another task."""
    from mplug_jax import selection
    from mplug_jax import workdir as workdir_lib
    from mplug_jax.mplug2 import convert as mplug2_convert
    path = epath.Path(init.checkpoint)
    select = str(init.get("select", "") or "latest")
    if select != "latest" and not (path / "config.json").exists():
        raise ValueError(f"init.select={select!r} picks a checkpoint of a training workdir; "
                         f"{path} is not one (set init.select='latest')")
    if mplug2_convert.is_converted_dir(str(path)):
        return mplug2_convert.load_converted(str(path)).params, f"converted {path}"
    if (path / "config.json").exists():
        cfg = workdir_lib.read_config(path)
        if task_names.canonical(cfg.task.name) not in WORKDIR_TASKS:
            raise ValueError(f"init.checkpoint={path} is a {cfg.task.name!r} workdir; "
                             f"{task_name!r} loads workdirs of {WORKDIR_TASKS} or mPLUG-2 "
                             "checkpoints")
        tree = workdir_lib.restore_params(*selection.init_source(init))[1]
        return tree, f"{cfg.task.name} workdir {path}"
    if path.is_file():
        if not init.get("config_bert") or not init.get("config_yaml"):
            raise ValueError(f"init.checkpoint={path} is an official file: also set "
                             "init.config_bert and init.config_yaml (the release's "
                             "config_bert_large_text.json and VideoQA yaml)")
        tree = mplug2_convert.load_official(str(path), init.config_bert,
                                            init.config_yaml).params
        return tree, f"official mPLUG-2 checkpoint {path}"
    raise FileNotFoundError(f"init.checkpoint={path}: neither a `mplug-jax convert` "
                            "mPLUG-2 directory, a workdir of an mPLUG-2 task nor a file")


def load(model, init, task_name: str) -> tuple[dict[str, np.ndarray], str]:
    """(flat params {'a/b/c': array} fitted to `model`, an `MPLUG2` or `MPLUG2WithHeads`;
    description) of `init.checkpoint` (module docstring). `task_name` only words errors."""
    tree, what = read(init, task_name)
    flat = {k: np.asarray(jax.device_get(v))
            for k, v in P.flatten(nn.meta.unbox(tree)).items()}
    if not hasattr(model, "itc_project"):  # not `heads.MPLUG2WithHeads`
        flat = {k: v for k, v in flat.items() if k.split("/", 1)[0] not in HEAD_PARAMS}
    if not model.temporal:
        flat = {k: v for k, v in flat.items() if not is_temporal(k)}
    grid = model.image_size // model.patch_size
    if POSEMB in flat and flat[POSEMB].shape[0] != grid * grid + 1:
        flat[POSEMB] = resample_posemb(flat[POSEMB], grid)
    return flat, what
