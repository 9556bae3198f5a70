"""Image-caption input of pretraining by `config.input.dataset` (task and evaluator share it).

- 'synthetic': the built-in `SyntheticShapes` ('train' / 'heldout' splits of `size` records);
- 'json': official pretraining json lists (`input.annotations`, images under
  `input.image_root`); the 'heldout' split reads `input.eval_annotations`;
- 'tfds': a dataset written by `mplug-jax prepare --format pretrain` (`input.tfds_dir`); the
  'heldout' split is `input.eval_split` of it.

Example (`to_example`; captioning and retrieval use it too): one caption of a list picked with
stream 0 of the record's generator, ``pre_caption``; the image decoded and augmented with
stream 1 (`pipeline.process_image`); ``[CLS] caption`` tokenised, right-padded, truncated.
Batch: ``image`` float32[B, R, R, 3] (CLIP-normalised, channels last; or uint8[B, R, R, 3]
before normalisation with ``image_dtype='uint8'``, normalised on the device by the vision
encoder, bit-identically: a quarter of the bytes to copy and no float work here), ``text_ids``
and ``text_mask`` int32[B, max_tokens], ``idx`` int32[B] (source index of each record).
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import grain

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import pretrain as pretrain_format
from mplug_jax.data.inputs import json_annotations
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import BadRecord
from mplug_jax.data.synthetic.shapes import SyntheticShapes

DATASETS = ("synthetic", "json", "tfds")


def source(input_cfg, split: str, size: int, image_size: int, seed: int):
    """Random-access records ({'image', 'caption'}) of `input.dataset` for `split`
    ('train' or 'heldout'); `size` applies to the synthetic data only."""
    kind = input_cfg.dataset
    if kind == "synthetic":
        return SyntheticShapes(split, size, image_size=image_size, seed=seed)
    if kind == "json":
        files = json_annotations(input_cfg, split, "official json lists")
        return pretrain_format.read(files, input_cfg.get("image_root", ""),
                                    max_skip_rate=input_cfg.max_skip_rate)
    if kind == "tfds":
        from mplug_jax.data.formats.builder import load_prepared  # TFDS: only when read
        splits = load_prepared(input_cfg.tfds_dir, "pretrain")
        name = "train" if split == "train" else input_cfg.get("eval_split", "validation")
        if name not in splits:
            raise ValueError(f"{input_cfg.tfds_dir} has splits {sorted(splits)}, not {name!r}")
        return splits[name]
    raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")


def to_example(record: Any, rng: pipeline.RecordRng, *, image_size: int, max_words: int,
               max_tokens: int, augment: dict | None, image_dtype: str = "float32",
               reduced_decode: bool = False, max_pixels: int = transforms.MAX_PIXELS
               ) -> dict[str, Any]:
    """One image-caption record {'image', 'caption'} -> {image, text_ids, text_mask} (module
    docstring); raises BadRecord."""
    if not isinstance(record, dict) or "image" not in record or "caption" not in record:
        raise BadRecord("bad_record", f"record lacks 'image'/'caption': {record!r:.80}")
    caption = text.choose_caption(record["caption"], rng.stream(0), max_words)
    image = pipeline.process_image(record["image"], image_size, rng.stream(1), augment=augment,
                                   image_dtype=image_dtype, reduced_decode=reduced_decode,
                                   max_pixels=max_pixels)
    ids, mask = tokenizer.get_tokenizer().encode([caption], max_length=max_tokens,
                                                 pad_to=max_tokens)
    return {"image": image, "text_ids": ids[0], "text_mask": mask[0]}


def example_fn(image_size: int, *, max_words: int = 30, max_tokens: int = 32,
               augment: dict | None = None, image_dtype: str = "float32",
               reduced_decode: bool = False, max_pixels: int = transforms.MAX_PIXELS):
    """`to_example` with its options bound (picklable); `augment` keys over
    `pipeline.DEFAULT_AUGMENT` (unknown keys: ValueError), None = the official test transform."""
    pipeline.check_image_dtype(image_dtype)
    if augment is not None:
        augment = pipeline.augment_options({**augment, "enabled": True},
                                           pipeline.DEFAULT_AUGMENT)
    return functools.partial(to_example, image_size=image_size, max_words=max_words,
                             max_tokens=max_tokens, augment=augment, image_dtype=image_dtype,
                             reduced_decode=reduced_decode, max_pixels=max_pixels)


def dataset(source: Sequence[dict], *, image_size: int, batch_size: int, max_words: int = 30,
            max_tokens: int = 32, seed: int = 0, train: bool = True,
            augment: dict | None = None, workers: int = 0, shard_index: int = 0,
            shard_count: int = 1, num_epochs: int | None = None, max_skip_rate: float = 0.01,
            skip_check_after: int = 1000, read_threads: int = 4,
            max_pixels: int = transforms.MAX_PIXELS, image_dtype: str = "float32",
            reduced_decode: bool = False) -> grain.IterDataset:
    """Image-caption batches of `source` (records with 'image': uint8 array, PIL image, encoded
    bytes or path, and 'caption': str or list of str) by `pipeline.dataset` (`train`: a new
    order every epoch; `augment` and the other options: `example_fn`, the rest:
    `pipeline.dataset`). Batch: module docstring."""
    fn = example_fn(image_size, max_words=max_words, max_tokens=max_tokens, augment=augment,
                    image_dtype=image_dtype, reduced_decode=reduced_decode,
                    max_pixels=max_pixels)
    return pipeline.dataset(source, fn, batch_size=batch_size, seed=seed, shuffle=train,
                            shard_index=shard_index, shard_count=shard_count,
                            num_epochs=num_epochs, workers=workers,
                            max_skip_rate=max_skip_rate, skip_check_after=skip_check_after,
                            read_threads=read_threads)


def input_example_fn(input_cfg, image_size: int, max_words: int | None = None):
    """`example_fn` of an `input` block (max_words, max_tokens, augment, image_dtype,
    reduced_decode)."""
    return example_fn(image_size, max_tokens=int(input_cfg.max_tokens),
                      max_words=int(input_cfg.max_words if max_words is None else max_words),
                      augment=pipeline.augment_options(input_cfg.get("augment")),
                      image_dtype=input_cfg.get("image_dtype", "float32"),
                      reduced_decode=bool(input_cfg.get("reduced_decode", False)))


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch) of
    `config.input` at `config.model.image_size` (module docstring)."""
    inp, size = config.input, int(config.model.image_size)
    src = source(inp, "train", inp.train_size, size, config.seed)
    return pipeline.train_batches(inp, src, input_example_fn(inp, size), process_index,
                                  process_count)


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Every usable record of `src` in order (`eval_loader.batches`; unusable records skipped
    and logged) with the official test transform, in batches of `batch_size` (the last may be
    shorter); the caption of a list is picked with the generator of (0, 0, index)."""
    fn = example_fn(config.model.image_size, max_words=int(config.input.max_words),
                    max_tokens=int(config.input.max_tokens))
    return eval_loader.batches(src, fn, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, bad="skip", pad=None)
