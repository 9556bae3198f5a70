"""grain input pipelines: random-access source -> per-process, shuffled, batched numpy dicts.

Order of stages (official `pretrain_dataset_4m` + `create_loader` semantics, made deterministic):

1. record indices ``range(len(source))``, shuffled per epoch with `seed` (training only), cut to
   a multiple of `shard_count` and sliced ``[shard_index::shard_count]``, repeated `num_epochs`;
2. per record (threads, or `workers` processes): read, pick one caption of a list with a
   generator seeded by ``(seed, epoch, index)``, ``pre_caption``, decode the image, augment
   with the same per-record generator, tokenise (``[CLS] tokens``, right-padded, truncated);
3. records that fail (see :data:`transforms.SKIP_REASONS`) are logged with their file name and
   dropped BEFORE batching, so every batch is full; the count by reason travels with the next
   good record to the main process, where :class:`SkipStats` adds it up and raises
   :class:`DataError` once the skip rate exceeds `max_skip_rate`;
4. ``batch(drop_remainder=True)`` and ``mp_prefetch`` when ``workers > 0``.

Batch: ``image`` float32[B, R, R, 3] (CLIP-normalised, channels last; or uint8[B, R, R, 3]
before normalisation with ``image_dtype='uint8'``, normalised on the device by the vision
encoder, bit-identically: a quarter of the bytes to copy and no float work here), ``text_ids`` and
``text_mask`` int32[B, max_tokens], ``idx`` int32[B] (source index of each record).

The iterator of the returned dataset is checkpointable: ``it.get_state()`` / ``it.set_state()``
(JSON-serialisable dicts, skip counters included) or orbax via :func:`iterator_checkpoint_args`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import grain
import jax
import numpy as np

from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import SKIP_REASONS, BadRecord, DataError

__all__ = ["DataError", "SkipStats", "pretrain_dataset", "skip_stats", "make_global_batch",
           "iterator_checkpoint_args", "choose_caption"]

logger = logging.getLogger(__name__)

_SKIP_KEY = "_skip_reason"
_COUNT_KEY = "_skipped_before"
DEFAULT_AUGMENT = {"crop_scale": (0.2, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True}
IMAGE_DTYPES = ("float32", "uint8")


def check_image_dtype(image_dtype: str) -> str:
    """`image_dtype` if it is one of :data:`IMAGE_DTYPES` (ValueError otherwise)."""
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
    return image_dtype


def process_image(image: Any, image_size: int, rng: np.random.Generator | None, *,
                  augment: dict | None, image_dtype: str, reduced_decode: bool = False,
                  max_pixels: int = transforms.MAX_PIXELS) -> np.ndarray:
    """A record's image field -> uint8 or float32 (CLIP-normalised) [R, R, 3]: the official
    test transform when `augment` is None, else the training one drawn from `rng`
    (`reduced_decode`: see :func:`transforms.decode_train_image`). Raises BadRecord."""
    if augment is None:
        image = transforms.eval_image(transforms.decode_image(image, max_pixels=max_pixels),
                                      image_size)
    else:
        image = transforms.decode_train_image(image, image_size, rng, max_pixels=max_pixels,
                                              reduced_decode=reduced_decode, **augment)
    return transforms.normalize(image) if image_dtype == "float32" else image


@dataclasses.dataclass
class SkipStats:
    """Records seen and skipped (by reason) by one pipeline iterator."""

    seen: int = 0
    skipped: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def rate(self) -> float:
        return self.total_skipped / self.seen if self.seen else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped)}

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v)
        return (f"{self.total_skipped} of {self.seen} records skipped ({100 * self.rate:.2f}%)"
                + (f": {reasons}" if reasons else ""))


def choose_caption(caption: Any, rng: np.random.Generator, max_words: int) -> str:
    """Official caption handling: a list -> one uniformly at random; then ``pre_caption``.

    Non-string entries of a list are ignored and bytes are decoded as UTF-8; anything else,
    or a caption that is empty after normalisation, raises ``BadRecord('bad_caption')``.
    """
    if isinstance(caption, (list, tuple)):
        options = [c for c in caption if isinstance(c, (str, bytes)) and
                   (c.decode("utf-8", "replace") if isinstance(c, bytes) else c).strip()]
        if not options:
            raise BadRecord("bad_caption", f"no usable caption in {caption!r:.80}")
        caption = options[int(rng.integers(len(options)))]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", "replace")
    if not isinstance(caption, str):
        raise BadRecord("bad_caption", f"caption of type {type(caption).__name__}")
    caption = text.pre_caption(caption, max_words)
    if not caption:
        raise BadRecord("bad_caption", "caption is empty after normalisation")
    return caption


def _describe(record: Any) -> str:
    if isinstance(record, dict) and isinstance(record.get("image"), str):
        return record["image"]
    return "<in-memory image>"


class _PretrainRecord:
    """Index -> processed example (picklable, so it can run in grain worker processes)."""

    def __init__(self, source, *, image_size: int, max_words: int, max_tokens: int, seed: int,
                 augment: dict | None, epoch_length: int, max_pixels: int, image_dtype: str,
                 reduced_decode: bool):
        self.source, self.image_size, self.max_words = source, image_size, max_words
        self.max_tokens, self.seed, self.augment = max_tokens, seed, augment
        self.epoch_length, self.max_pixels = epoch_length, max_pixels
        self.image_dtype, self.reduced_decode = image_dtype, reduced_decode

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        epoch = position // self.epoch_length
        index = int(index)
        record = None
        try:
            record = self.source[index]
            if not isinstance(record, dict) or "image" not in record or "caption" not in record:
                raise BadRecord("bad_record", f"record {index} lacks 'image'/'caption': "
                                              f"{record!r:.80}")
            caption = choose_caption(record["caption"],
                                     np.random.default_rng([self.seed, epoch, index, 0]),
                                     self.max_words)
            image = process_image(record["image"], self.image_size,
                                  np.random.default_rng([self.seed, epoch, index, 1]),
                                  augment=self.augment, image_dtype=self.image_dtype,
                                  reduced_decode=self.reduced_decode,
                                  max_pixels=self.max_pixels)
        except BadRecord as e:
            logger.warning("skipping record %d (%s) %s: %s", index, e.reason,
                           _describe(record), e)
            return {_SKIP_KEY: e.reason}
        except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
            logger.warning("skipping record %d (bad_record) %s: %r", index, _describe(record), e)
            return {_SKIP_KEY: "bad_record"}
        ids, mask = tokenizer.get_tokenizer().encode([caption], max_length=self.max_tokens,
                                                     pad_to=self.max_tokens)
        return {"image": image, "text_ids": ids[0], "text_mask": mask[0],
                "idx": np.int32(index)}


class _DropSkippedIterDataset(grain.IterDataset):
    """Drops skipped records; attaches the count skipped since the last kept one to the next."""

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__())


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._pending = np.zeros(len(SKIP_REASONS), np.int32)

    def __next__(self):
        while True:
            element = next(self._parent)
            if _SKIP_KEY in element:
                self._pending[SKIP_REASONS.index(element[_SKIP_KEY])] += 1
                continue
            element[_COUNT_KEY] = self._pending
            self._pending = np.zeros(len(SKIP_REASONS), np.int32)
            return element

    def get_state(self):
        return {"parent": self._parent.get_state(), "pending": self._pending.tolist()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = np.asarray(state["pending"], np.int32)


class _SkipAccountingIterDataset(grain.IterDataset):
    """Main-process stage: sums per-batch skip counts and enforces the skip-rate limit."""

    def __init__(self, parent, *, max_skip_rate: float, min_records: int):
        super().__init__(parent)
        self._max_skip_rate, self._min_records = max_skip_rate, min_records

    def __iter__(self):
        return _SkipAccountingIterator(self._parent.__iter__(), self._max_skip_rate,
                                       self._min_records)


class _SkipAccountingIterator(grain.DatasetIterator):
    def __init__(self, parent, max_skip_rate: float, min_records: int):
        super().__init__(parent)
        self.stats = SkipStats()
        self._max_skip_rate, self._min_records = max_skip_rate, min_records

    def __next__(self):
        batch = dict(next(self._parent))
        counts = np.asarray(batch.pop(_COUNT_KEY)).sum(axis=0)
        self.stats.seen += len(batch["idx"]) + int(counts.sum())
        for reason, n in zip(SKIP_REASONS, counts.tolist()):
            self.stats.skipped[reason] += n
        if self.stats.seen >= self._min_records and self.stats.rate > self._max_skip_rate:
            raise DataError(f"skip rate above max_skip_rate={self._max_skip_rate}: {self.stats}"
                            " (see the warnings above for the files)")
        return batch

    def get_state(self):
        return {"parent": self._parent.get_state(), "skip_stats": self.stats.as_dict()}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.stats = SkipStats(state["skip_stats"]["seen"], dict(state["skip_stats"]["skipped"]))


def skip_stats(iterator: grain.DatasetIterator) -> SkipStats:
    """The :class:`SkipStats` of an iterator of :func:`pretrain_dataset`."""
    node, todo = iterator, [iterator]
    while todo:
        node = todo.pop()
        if isinstance(node, _SkipAccountingIterator):
            return node.stats
        todo.extend(getattr(node, "_parents", ()))
    raise ValueError(f"{type(iterator).__name__} is not an iterator of pretrain_dataset")


def pretrain_dataset(source: Sequence[dict], *, image_size: int, batch_size: int,
                     max_words: int = 30, max_tokens: int = 32, seed: int = 0,
                     train: bool = True, augment: dict | None = None, workers: int = 0,
                     shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                     max_skip_rate: float = 0.01, skip_check_after: int = 1000,
                     read_threads: int = 4, max_pixels: int = transforms.MAX_PIXELS,
                     image_dtype: str = "float32", reduced_decode: bool = False
                     ) -> grain.IterDataset:
    """Image-caption batches for pretraining (also usable for captioning/retrieval inputs).

    Args:
      source: random-access records with 'image' (uint8 array, PIL image, encoded bytes or
        path) and 'caption' (str or list of str).
      image_size: output side R.
      batch_size: per-process batch size B.
      max_words: ``pre_caption`` word limit (official 30).
      max_tokens: token length L (ids truncated and right-padded to it).
      seed: shuffle and augmentation seed (same on every process).
      train: shuffle every epoch; when False keep source order.
      augment: training augmentation keys (crop_scale, randaug_n, randaug_m, hflip; missing
        keys default to :data:`DEFAULT_AUGMENT`); None = official test transform.
      workers: grain worker processes (0 = threads in this process).
      shard_index, shard_count: this process's shard; every shard gets ``len // count``
        records per epoch, so all processes make the same number of steps.
      num_epochs: None repeats forever.
      max_skip_rate: raise :class:`DataError` above this fraction of skipped records.
      skip_check_after: records seen before the rate is checked.
      read_threads: threads reading/processing records per process.
      max_pixels: decompression-bomb guard, see :func:`transforms.decode_image`.
      image_dtype: 'float32' (CLIP-normalised) or 'uint8' (raw RGB; the vision encoder
        normalises it on the device to the same float32 values).
      reduced_decode: decode training JPEGs at a reduced DCT scale when the drawn crop allows
        it (not pixel-identical; see :func:`transforms.decode_train_image`).
    Returns:
      A grain IterDataset of dicts: image float32 or uint8 [B, R, R, 3], text_ids int32[B, L],
      text_mask int32[B, L], idx int32[B].
    """
    n = len(source)
    check_image_dtype(image_dtype)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    per_shard = n // shard_count
    if per_shard < batch_size:
        raise ValueError(f"{n} records over {shard_count} shards give {per_shard} per shard, "
                         f"fewer than batch_size={batch_size}")
    if augment is not None:
        unknown = set(augment) - set(DEFAULT_AUGMENT)
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; "
                             f"valid: {sorted(DEFAULT_AUGMENT)}")
        augment = {**DEFAULT_AUGMENT, **augment}
    ds = grain.MapDataset.range(n)
    if train:
        ds = ds.shuffle(seed=seed)
    ds = ds[shard_index:per_shard * shard_count:shard_count]
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_PretrainRecord(
        source, image_size=image_size, max_words=max_words, max_tokens=max_tokens, seed=seed,
        augment=augment, epoch_length=per_shard, max_pixels=max_pixels,
        image_dtype=image_dtype, reduced_decode=reduced_decode))
    return batched(ds, batch_size, workers=workers, max_skip_rate=max_skip_rate,
                   skip_check_after=skip_check_after, read_threads=read_threads)


def batched(ds: grain.MapDataset, batch_size: int, *, drop_remainder: bool = True,
            workers: int = 0, max_skip_rate: float = 0.01, skip_check_after: int = 1000,
            read_threads: int = 4) -> grain.IterDataset:
    """The shared tail of every input pipeline: a MapDataset of processed records (dicts, or
    skip markers for bad records) -> batches of `batch_size` without the skipped records,
    grain worker processes when `workers` > 0, and the skip accounting that raises
    :class:`DataError` above `max_skip_rate` (checked after `skip_check_after` records)."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=2 * batch_size))
    it_ds = _DropSkippedIterDataset(it_ds).batch(batch_size, drop_remainder=drop_remainder)
    if workers > 0:
        # grain reads absl flags when starting workers; outside an absl app (pytest, notebooks,
        # our CLI) they are unparsed and grain raises, so accept the defaults.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return _SkipAccountingIterDataset(it_ds, max_skip_rate=max_skip_rate,
                                      min_records=skip_check_after)


def process_batch_size(input_cfg, process_count: int) -> int:
    """`input.batch_size` per process (ValueError when the processes do not divide it)."""
    if input_cfg.batch_size % process_count:
        raise ValueError(f"input.batch_size {input_cfg.batch_size} is not divisible by the "
                         f"{process_count} processes")
    return input_cfg.batch_size // process_count


def make_global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                      batch_axes: tuple[str, ...] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays sharded on dim 0 over `batch_axes`.

    Each process passes its own ``[B_local, ...]`` arrays; the result has global batch
    ``B_local * process_count`` (`jax.make_array_from_process_local_data`).
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)

    def put(x):
        spec = jax.sharding.PartitionSpec(axes or None, *([None] * (np.ndim(x) - 1)))
        return jax.make_array_from_process_local_data(
            jax.sharding.NamedSharding(mesh, spec), np.asarray(x))

    return jax.tree.map(put, batch)


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False):
    """orbax args that save (or restore into) a grain iterator, for ``ocp.args.Composite``.

    Save: ``mngr.save(step, args=ocp.args.Composite(state=..., data_iter=
    iterator_checkpoint_args(it)))``. Restore into a fresh iterator of the same pipeline:
    ``mngr.restore(step, args=ocp.args.Composite(state=..., data_iter=
    iterator_checkpoint_args(it, restore=True)))``; `it` then continues where the saved one
    stopped. One JSON file per process is written (grain's checkpoint handler).
    """
    if restore:
        return grain.checkpoint.CheckpointRestore(iterator)
    return grain.checkpoint.CheckpointSave(iterator)
