"""Image-caption input of pretraining by `config.input.dataset` (task and evaluator share it).

- 'synthetic': the built-in `SyntheticShapes` ('train' / 'heldout' splits of `size` records);
- 'json': official pretraining json lists (`input.annotations`, images under
  `input.image_root`); the 'heldout' split reads `input.eval_annotations`;
- 'tfds': a dataset written by `mplug-jax prepare --format pretrain` (`input.tfds_dir`); the
  'heldout' split is `input.eval_split` of it.
"""
from __future__ import annotations

from typing import Any

from mplug_jax.data import pipeline
from mplug_jax.data.formats import pretrain as pretrain_format
from mplug_jax.data.pipeline import pretrain_dataset
from mplug_jax.data.synthetic.shapes import SyntheticShapes
from mplug_jax.data.formats.builder import load_prepared

DATASETS = ("synthetic", "json", "tfds")


def source(input_cfg, split: str, size: int, image_size: int, seed: int):
    """Random-access records ({'image', 'caption'}) of `input.dataset` for `split`
    ('train' or 'heldout'); `size` applies to the synthetic data only."""
    kind = input_cfg.dataset
    if kind == "synthetic":
        return SyntheticShapes(split, size, image_size=image_size, seed=seed)
    if kind == "json":
        key = "annotations" if split == "train" else "eval_annotations"
        files = input_cfg.get(key)
        if not files:
            raise ValueError(f"input.dataset='json' needs input.{key} (official json lists)")
        return pretrain_format.read(list(files), input_cfg.get("image_root", ""),
                                    max_skip_rate=input_cfg.max_skip_rate)
    if kind == "tfds":
        splits = load_prepared(input_cfg.tfds_dir, "pretrain")
        name = "train" if split == "train" else input_cfg.get("eval_split", "validation")
        if name not in splits:
            raise ValueError(f"{input_cfg.tfds_dir} has splits {sorted(splits)}, not {name!r}")
        return splits[name]
    raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")


def train_batches(input_cfg, image_size: int, seed: int, process_index: int,
                  process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch).

    Batches: see `mplug_jax.data.pipeline` (`image`, `text_ids`, `text_mask`, `idx`); the
    image is uint8 or float32 by `input.image_dtype`, `input.reduced_decode` as there.
    """
    batch_size = pipeline.process_batch_size(input_cfg, process_count)
    src = source(input_cfg, "train", input_cfg.train_size, image_size, seed)
    aug = input_cfg.augment
    augment = {k: v for k, v in aug.items() if k != "enabled"} if aug.enabled else None
    ds = pretrain_dataset(src, image_size=image_size,
                          batch_size=batch_size,
                          max_words=input_cfg.max_words, max_tokens=input_cfg.max_tokens,
                          seed=input_cfg.shuffle_seed, train=True, augment=augment,
                          workers=input_cfg.workers, shard_index=process_index,
                          shard_count=process_count, max_skip_rate=input_cfg.max_skip_rate,
                          image_dtype=input_cfg.get("image_dtype", "float32"),
                          reduced_decode=bool(input_cfg.get("reduced_decode", False)))
    return iter(ds), len(src)
