"""The one input-pipeline builder (grain): random-access source -> per-process, shuffled, batched
numpy dicts, for every task's training input; its skip marker and skip accounting.

A task's input (`mplug_jax.data.inputs.<task>`, `mplug_jax.mplug2.input`) is its record source
plus ``to_example(record, rng, **options) -> dict`` (one processed example, numpy arrays); bad
records raise :class:`BadRecord` (or KeyError / IndexError / TypeError / ValueError / OSError:
counted as 'bad_record'). :func:`dataset` does the rest, in this order (official
`create_loader` semantics, made deterministic):

1. record indices ``range(len(source))``, shuffled per epoch with `seed` (when shuffling), cut to
   a multiple of `shard_count` and sliced ``[shard_index::shard_count]``, repeated `num_epochs`;
2. per record (threads, or `workers` processes): ``to_example(source[index], rng)`` where `rng`
   is a :class:`RecordRng` of ``(seed, epoch, index)`` (``rng.stream(k)``: the generator of
   stream k), then ``idx`` int32 = the record's index is added;
3. records that fail are logged with their file name and replaced by the public skip marker
   (:func:`skip`), dropped BEFORE batching, so every batch is full; the count by reason
   (:data:`SKIP_REASONS`) travels with the next good record to the main process, where
   :class:`SkipStats` adds it up and raises :class:`DataError` once the skip rate exceeds
   `max_skip_rate`;
4. ``batch(drop_remainder)`` and ``mp_prefetch`` when ``workers > 0``.

The iterator of the returned dataset is checkpointable: ``it.get_state()`` / ``it.set_state()``
(JSON-serialisable dicts, skip counters included) or orbax via :func:`iterator_checkpoint_args`.
Evaluation batches (in order, every process the same number) come from
`mplug_jax.data.eval_loader` with the same ``to_example`` functions.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import SKIP_REASONS, BadRecord, DataError

__all__ = ["DataError", "SkipStats", "RecordRng", "SKIP_REASONS", "skip", "skipped_reason",
           "dataset", "train_batches", "batched", "skip_stats", "make_global_batch",
           "iterator_checkpoint_args", "augment_options"]

logger = logging.getLogger(__name__)

SKIP_KEY = "_skip_reason"  # the key of the skip marker (:func:`skip`)
_COUNT_KEY = "_skipped_before"
DEFAULT_AUGMENT = {"crop_scale": (0.2, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True,
                   "backend": "pil"}
IMAGE_DTYPES = ("float32", "uint8")
# Errors of a malformed record (a missing key, a wrong type ...): skipped as 'bad_record'.
BAD_RECORD_ERRORS = (KeyError, IndexError, TypeError, ValueError, OSError)


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


def skip(reason: str) -> dict[str, str]:
    """The skip marker: what a record mapper returns for a record that cannot be used
    (`reason` one of :data:`SKIP_REASONS`); :func:`batched` drops it and counts the reason."""
    if reason not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {reason!r}; valid: {SKIP_REASONS}")
    return {SKIP_KEY: reason}


def skipped_reason(element: Any) -> str | None:
    """The reason of a skip marker (:func:`skip`); None for an example."""
    return element.get(SKIP_KEY) if isinstance(element, dict) else None


class RecordRng:
    """The random streams of one record (``index``, its source index) in one epoch:
    ``stream(k)`` is ``np.random.default_rng([seed, epoch, index, k])`` (independent of
    threads, workers and order, so a resumed or re-sharded run draws the same numbers)."""

    __slots__ = ("seed", "epoch", "index")

    def __init__(self, seed: int, epoch: int, index: int):
        self.seed, self.epoch, self.index = int(seed), int(epoch), int(index)

    def stream(self, k: int) -> np.random.Generator:
        """The generator of stream `k` of this record."""
        return np.random.default_rng([self.seed, self.epoch, self.index, k])


def describe(record: Any) -> str:
    """A record's file(s) for log lines: its 'image' / 'video' path (or 'images' list), else a
    placeholder."""
    if isinstance(record, dict):
        for key in ("image", "video", "images"):
            if isinstance(record.get(key), (str, list, tuple)):
                return str(record[key])
    return "<in-memory record>"


class Examples:
    """``(position, index) -> to_example(source[index], RecordRng(seed, epoch, index))`` plus
    ``idx``, or the skip marker (logged) for a bad record; the epoch is ``position //
    epoch_length``. Picklable (grain worker processes) when `to_example` is, e.g. a
    ``functools.partial`` of a module-level function."""

    def __init__(self, source: Sequence, to_example: Callable, *, seed: int = 0,
                 epoch_length: int = 1, what: str = ""):
        self.source, self.to_example, self.seed = source, to_example, int(seed)
        self.epoch_length, self.prefix = max(int(epoch_length), 1), f"{what} " if what else ""

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        index, record = int(index), None
        try:
            record = self.source[index]
            example = self.to_example(record, RecordRng(self.seed,
                                                        position // self.epoch_length, index))
        except BadRecord as e:
            logger.warning("skipping %srecord %d (%s) %s: %s", self.prefix, index, e.reason,
                           describe(record), e)
            return skip(e.reason)
        except BAD_RECORD_ERRORS as e:
            logger.warning("skipping %srecord %d (bad_record) %s: %r", self.prefix, index,
                           describe(record), e)
            return skip("bad_record")
        example["idx"] = np.int32(index)
        return example


def augment_options(aug, defaults: dict | None = None) -> dict | None:
    """The training augmentation of an `input.augment` block: None when it is missing or not
    enabled, else its keys but 'enabled' over `defaults` (when given; other keys are a
    ValueError). Its 'backend', when set, is checked here, before any record is read
    (ValueError / ImportError with the install hint)."""
    if aug is None or not aug.get("enabled"):
        return None
    out = {k: v for k, v in dict(aug).items() if k != "enabled"}
    if "backend" in out:
        transforms.check_backend(out["backend"])
    if defaults is None:
        return out
    unknown = set(out) - set(defaults)
    if unknown:
        raise ValueError(f"unknown input.augment keys {sorted(unknown)}; valid: "
                         f"{sorted(defaults)} and 'enabled'")
    return {**defaults, **out}


def dataset(source: Sequence, to_example: Callable, *, batch_size: int, seed: int = 0,
            shuffle: bool = True, shard_index: int = 0, shard_count: int = 1,
            num_epochs: int | None = None, drop_remainder: bool = True, workers: int = 0,
            max_skip_rate: float = 0.01, skip_check_after: int = 1000, read_threads: int = 4,
            what: str = "") -> grain.IterDataset:
    """The one pipeline builder (module docstring): shuffle / shard / repeat / map with skip
    accounting / batch.

    Args:
      source: random-access records.
      to_example: ``fn(record, rng: RecordRng) -> dict`` of numpy arrays (one example);
        raises BadRecord for a record to skip.
      batch_size: per-process batch size B.
      seed: shuffle seed and seed of every :class:`RecordRng`.
      shuffle: a new order every epoch; False keeps source order.
      shard_index, shard_count: this process's shard; every shard gets ``len // count``
        records per epoch, so all processes make the same number of steps.
      num_epochs: None repeats forever.
      drop_remainder: drop a last incomplete batch (then a shard needs >= B records).
      workers, max_skip_rate, skip_check_after, read_threads: see :func:`batched`.
      what: the record kind in log lines and errors (e.g. 'VQA').
    Returns:
      A grain IterDataset of batches: every key of the examples stacked to [B, ...], plus
      idx int32[B] (source index of each record).
    """
    n = len(source)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    per_shard = n // shard_count
    if drop_remainder and per_shard < batch_size:
        raise ValueError(f"{n} {what + ' ' if what else ''}records over {shard_count} shards "
                         f"give {per_shard} per shard, fewer than batch_size={batch_size}")
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[shard_index:per_shard * shard_count:shard_count].repeat(num_epochs)
    ds = ds.map_with_index(Examples(source, to_example, seed=seed, epoch_length=per_shard,
                                    what=what))
    return batched(ds, batch_size, drop_remainder=drop_remainder, workers=workers,
                   max_skip_rate=max_skip_rate, skip_check_after=skip_check_after,
                   read_threads=read_threads)


def train_batches(input_cfg, source: Sequence, to_example: Callable, process_index: int,
                  process_count: int, what: str = "") -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch): every
    task's training input. `input_cfg` gives batch_size (global), shuffle_seed, workers and
    max_skip_rate; the batches are those of :func:`dataset`, shuffled and sharded."""
    workers = int(input_cfg.get("workers", 0))
    ds = dataset(source, to_example, batch_size=process_batch_size(input_cfg, process_count),
                 seed=int(input_cfg.shuffle_seed), shard_index=process_index,
                 shard_count=process_count, workers=workers,
                 max_skip_rate=float(input_cfg.get("max_skip_rate", 0.01)), what=what,
                 read_threads=read_threads(input_cfg, workers))
    return iter(ds), len(source)


def read_threads(input_cfg, workers: int) -> int:
    """`input.read_threads` for a pipeline with `workers` worker processes: threads running
    `to_example` in each worker process (in this process when `workers` is 0). 0 (the presets'
    default) = auto: 4 without worker processes, 1 per worker process, so W workers keep to W
    cores (1 or 4 threads per worker cost the same CPU per image within 6%:
    benchmarks/results/input_pipeline_cpu2.json)."""
    value = input_cfg.get("read_threads", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"input.read_threads must be an integer >= 0 (0 = auto), got {value!r}")
    if value == 0:
        return 1 if workers > 0 else 4
    return value


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
            reason = skipped_reason(element)
            if reason is not None:
                self._pending[SKIP_REASONS.index(reason)] += 1
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
    """The :class:`SkipStats` of an iterator of :func:`dataset` / :func:`batched`."""
    node, todo = iterator, [iterator]
    while todo:
        node = todo.pop()
        if isinstance(node, _SkipAccountingIterator):
            return node.stats
        todo.extend(getattr(node, "_parents", ()))
    raise ValueError(f"{type(iterator).__name__} is not an iterator of pipeline.dataset")


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
