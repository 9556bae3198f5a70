"""NLVR2 input by `config.input.dataset` (the NLVR2 task and the `classify` evaluator share it).

- 'json': official NLVR2 json files (`formats.nlvr2.read`, docs/official-formats.md#nlvr2): lists
  `input.train_files`, `input.val_files`, `input.test_files` (the official train_file /
  val_file / test_file), image paths relative to `input.image_root`;
- 'synthetic': the built-in `synthetic_nlvr2` pairs, written once as the same official files
  (`synthetic_nlvr2.cached_files`, under `input.synthetic_dir` or the temp dir) and read by the
  same reader: train = `input.train_size` pairs, val / test = `input.eval_size` held-out pairs
  each (disjoint streams).
The eval block chooses `split` ('val' or 'test') and `num_examples` (the first N, 0 = all).

Label: 1 iff the record's label is the string "True" (`LABELS[1]`), as the official reader.

Training only: with probability 0.5 (a generator seeded by (seed, epoch, index)) the two images
are swapped and the words "left" / "right" of the sentence exchanged (the official
`nlvr_dataset` augmentation); evaluation is deterministic, left image first. (The official
dataset class swaps at evaluation too, which makes its scores stochastic; not done here.)
Images: official train transform when `input.augment.enabled`, else the test transform.

Malformed annotation records (e.g. one image path instead of two) are skipped and counted by
the reader (DataError above `input.max_skip_rate`). A train record whose image file cannot be
read is skipped and counted by the pipeline (train/skip counters, DataError above the rate);
in evaluation it is an error (every record must be scored).

Train batch (per process, B rows): images float32[B, 2, R, R, 3] (left, right);
text_ids / text_mask int32[B, L]; label int32[B]; idx int32[B] (record index).
Eval batch: the same plus valid int32[B] (0 = padding row of the last batch).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

import numpy as np

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import nlvr2 as nlvr2_format
from mplug_jax.data.formats.base import RecordSource
from mplug_jax.data.synthetic import nlvr2 as synthetic_nlvr2
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import BadRecord

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "json")
LABELS = ("False", "True")  # class id = index
_SWAP = {"left": "right", "right": "left"}


def swap_left_right(sentence: str) -> str:
    """Exchange the words "left" and "right" (whole words; `pre_caption`'d lower-case text)."""
    return " ".join(_SWAP.get(w, w) for w in sentence.split(" "))


SPLITS = ("train", "val", "test")
_FILES = {"train": "train_files", "val": "val_files", "test": "test_files"}


def source(config, split: str) -> RecordSource:
    """Parsed NLVR2 records of `config.input.dataset` for `split` ('train', 'val', 'test')."""
    inp = config.input
    if split not in SPLITS:
        raise ValueError(f"unknown NLVR2 split {split!r}; valid: {SPLITS}")
    kind = inp.dataset
    if kind == "synthetic":
        size = int(inp.train_size if split == "train" else inp.eval_size)
        if size <= 0:
            raise ValueError(f"the synthetic NLVR2 {split} split needs a size > 0 "
                             f"(input.train_size / input.eval_size), got {size}")
        # val and test: the held-out stream, test with the next seed (disjoint records).
        paths = synthetic_nlvr2.cached_files(
            "train" if split == "train" else "heldout", size,
            image_size=config.model.image_size, seed=config.seed + (split == "test"),
            cache_dir=inp.get("synthetic_dir", ""))
        files, root = [paths["json"]], paths["root"]
    elif kind == "json":
        key = _FILES[split]
        files = inp.get(key) or []
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise ValueError(f"input.dataset='json' needs input.{key} (official NLVR2 json "
                             "files, a list)")
        root = inp.get("image_root", "")
        if not root:
            raise ValueError("input.dataset='json' needs input.image_root (the folder the "
                             "json image paths are relative to)")
    else:
        raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")
    src = nlvr2_format.read(files, root, max_words=int(inp.get("max_words", 30)),
                            max_skip_rate=float(inp.max_skip_rate))
    if sum(src.skipped.values()):
        logger.warning("NLVR2 %s: %d malformed annotation records skipped (%s)", split,
                       sum(src.skipped.values()),
                       ", ".join(f"{k}={v}" for k, v in src.skipped.items() if v))
    return src


def to_example(record: Any, rng: pipeline.RecordRng, *, image_size: int, max_tokens: int,
               augment: dict | None, train: bool) -> dict[str, Any]:
    """One NLVR2 record -> {images float32[2, R, R, 3], text_ids, text_mask, label} (module
    docstring): image k augmented with stream 1 + k of `rng`, the swap drawn from stream 0
    (training only). Raises BadRecord."""
    paths = record.get("images") if isinstance(record, dict) else None
    if not (isinstance(paths, (list, tuple)) and len(paths) == 2):
        raise BadRecord("bad_record", f"NLVR2 record needs two images, got {paths!r:.80}")
    images = []
    for k, path in enumerate(paths):
        img = transforms.decode_image(path)
        if augment is None:
            images.append(transforms.eval_transform(img, image_size))
        else:
            images.append(transforms.train_transform(img, image_size, rng.stream(1 + k),
                                                     **augment))
    sentence = record["sentence"]
    if train and rng.stream(0).random() < 0.5:
        images, sentence = images[::-1], swap_left_right(sentence)
    ids, mask = tokenizer.get_tokenizer().encode([sentence], max_length=max_tokens,
                                                 pad_to=max_tokens)
    return {"images": np.stack(images).astype(np.float32), "text_ids": ids[0],
            "text_mask": mask[0], "label": np.int32(record["label"])}


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    fn = functools.partial(to_example, image_size=config.model.image_size,
                           max_tokens=int(inp.max_tokens), train=True,
                           augment=pipeline.augment_options(inp.get("augment"),
                                                            pipeline.DEFAULT_AUGMENT))
    return pipeline.train_batches(inp, source(config, "train"), fn, process_index,
                                  process_count, what="NLVR2")


def _eval_source(config, ecfg) -> RecordSource:
    n = int(ecfg.get("num_examples", 0) or 0)
    src = source(config, str(ecfg.get("split", "val")))
    if 0 < n < len(src):
        src = RecordSource(src.records[:n], src.skipped, src.name)
    if len(src) == 0:
        raise ValueError("the NLVR2 eval set is empty")
    return src


def eval_records(config, ecfg) -> list[dict]:
    """The parsed eval records, in order (index = the batches' `idx`)."""
    return list(_eval_source(config, ecfg).records)


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """This process's rows of every global eval batch of `batch_size` (global) of the records
    `src` (`eval_records`), in order; the last batch is padded with copies of its last record
    (valid = 0).

    Raises:
      DataError: a record's image cannot be read (evaluation covers every record).
    """
    fn = functools.partial(to_example, image_size=config.model.image_size,
                           max_tokens=int(config.input.max_tokens), augment=None, train=False)
    return eval_loader.batches(src, fn, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, bad="raise", pad="last",
                               what="NLVR2")
