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

import concurrent.futures
import logging
from typing import Any, Iterator

import grain
import numpy as np

from mplug_jax.data import pipeline
from mplug_jax.data.formats import nlvr2 as nlvr2_format
from mplug_jax.data.formats.base import RecordSource
from mplug_jax.data.synthetic import nlvr2 as synthetic_nlvr2
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import BadRecord, DataError

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


class _NLVR2Record:
    """(position, index) -> processed example; picklable for grain worker processes."""

    def __init__(self, source, *, image_size: int, max_tokens: int, seed: int,
                 augment: dict | None, epoch_length: int, train: bool):
        self.source, self.image_size, self.max_tokens = source, image_size, max_tokens
        self.seed, self.augment, self.epoch_length = seed, augment, max(epoch_length, 1)
        self.train = train

    def load(self, index: int, epoch: int = 0) -> dict[str, Any]:
        """Record `index` as arrays (see module docstring); raises BadRecord."""
        record = self.source[index]
        paths = record.get("images") if isinstance(record, dict) else None
        if not (isinstance(paths, (list, tuple)) and len(paths) == 2):
            raise BadRecord("bad_record", f"NLVR2 record {index} needs two images, got "
                                          f"{paths!r:.80}")
        images = []
        for k, path in enumerate(paths):
            img = transforms.decode_image(path)
            if self.augment is None:
                images.append(transforms.eval_transform(img, self.image_size))
            else:
                rng = np.random.default_rng([self.seed, epoch, index, 1 + k])
                images.append(transforms.train_transform(img, self.image_size, rng,
                                                         **self.augment))
        sentence = record["sentence"]
        if self.train and np.random.default_rng([self.seed, epoch, index, 0]).random() < 0.5:
            images, sentence = images[::-1], swap_left_right(sentence)
        ids, mask = tokenizer.get_tokenizer().encode([sentence], max_length=self.max_tokens,
                                                     pad_to=self.max_tokens)
        return {"images": np.stack(images).astype(np.float32), "text_ids": ids[0],
                "text_mask": mask[0], "label": np.int32(record["label"]),
                "idx": np.int32(index)}

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            return self.load(index, position // self.epoch_length)
        except BadRecord as e:
            logger.warning("skipping NLVR2 record %d (%s): %s", index, e.reason, e)
            return {pipeline._SKIP_KEY: e.reason}
        except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
            logger.warning("skipping NLVR2 record %d (bad_record): %r", index, e)
            return {pipeline._SKIP_KEY: "bad_record"}


def _augment(input_cfg) -> dict | None:
    aug = input_cfg.get("augment")
    if aug is None or not aug.get("enabled"):
        return None
    return {**pipeline.DEFAULT_AUGMENT, **{k: v for k, v in aug.items() if k != "enabled"}}


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    batch = pipeline.process_batch_size(inp, process_count)
    src = source(config, "train")
    n = len(src)
    per_shard = n // process_count
    if per_shard < batch:
        raise ValueError(f"{n} NLVR2 records over {process_count} processes give {per_shard} "
                         f"per process, fewer than the batch of {batch}")
    ds = grain.MapDataset.range(n).shuffle(seed=int(inp.shuffle_seed))
    ds = ds[process_index:per_shard * process_count:process_count].repeat(None)
    ds = ds.map_with_index(_NLVR2Record(
        src, image_size=config.model.image_size, max_tokens=int(inp.max_tokens),
        seed=int(inp.shuffle_seed), augment=_augment(inp), epoch_length=per_shard, train=True))
    it_ds = pipeline.batched(ds, batch, drop_remainder=True,
                             workers=int(inp.get("workers", 0)),
                             max_skip_rate=float(inp.max_skip_rate))
    return iter(it_ds), n


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


def eval_batches(config, ecfg, process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict]:
    """This process's rows of every global eval batch of `ecfg.batch_size` (global), in
    record order; the last batch is padded with copies of its last record (valid = 0).

    Raises:
      DataError: a record's image cannot be read (evaluation covers every record).
    """
    src = _eval_source(config, ecfg)
    bs = int(ecfg.batch_size)
    if bs % process_count:
        raise ValueError(f"eval batch_size {bs} is not divisible by the {process_count} "
                         "processes")
    local = bs // process_count
    rec = _NLVR2Record(src, image_size=config.model.image_size,
                       max_tokens=int(config.input.max_tokens), seed=0, augment=None,
                       epoch_length=len(src), train=False)

    def load(i: int) -> dict:
        try:
            return rec.load(i)
        except BadRecord as e:
            raise DataError(f"NLVR2 eval record {i} ({src[i].get('images')}): {e}") from e

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for start in range(0, len(src), bs):
            rows = list(range(start, min(start + bs, len(src))))
            valid = [1] * len(rows) + [0] * (bs - len(rows))
            rows += [rows[-1]] * (bs - len(rows))
            mine = slice(process_index * local, (process_index + 1) * local)
            examples = list(pool.map(load, rows[mine]))
            batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
            batch["valid"] = np.asarray(valid[mine], np.int32)
            yield batch
