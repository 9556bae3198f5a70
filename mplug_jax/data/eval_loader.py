"""The one evaluation loader: a record source and a task's ``to_example`` -> batches in record
order, decoded by one thread pool (`ordered_map`), the same number of batches on every process.

Every evaluator's input goes through :func:`batches` (VQA, grounding, NLVR2, SNLI-VE, caption,
pretraining zero-shot, the video tasks); only the choice of what a bad record does and how the
last batch is filled differs:

- ``bad='raise'``: a record that cannot be read is a :class:`DataError` naming its file (an
  evaluation that must score every record); global batch j holds records [j B, (j + 1) B);
- ``bad='skip'``: it is logged, counted in `stats` (reason -> count, and `skipped_ids`) and left
  out; batches are filled with the next usable records.

``pad``: None leaves the last batch shorter; 'last' / 'first' fills it up to B with copies of
its last / first row and adds ``valid`` int32[B] (0 = padding). Process p of P gets rows
[p B / P, (p + 1) B / P) of every global batch. Every batch has the keys of the examples plus
``idx`` int32 (the record's index in `source`, unless the example sets its own).
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from mplug_jax.data.ops.image import SKIP_REASONS, BadRecord, DataError
from mplug_jax.data.pipeline import BAD_RECORD_ERRORS, RecordRng, describe

logger = logging.getLogger(__name__)

BAD = ("raise", "skip")
PADS = (None, "first", "last")


def ordered_map(fn: Callable, items: Iterable, threads: int = 4,
                window: int | None = None) -> Iterator:
    """``fn(item)`` for every item, in order, computed by `threads` threads; at most `window`
    (default 2 x threads) results are held at a time, so memory stays bounded."""
    items = list(items)
    threads = max(int(threads), 1)
    window = max(int(window or 2 * threads), 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(items), window):
            yield from pool.map(fn, items[start:start + window])


class Head:
    """The first `n` records of a source (random access; all of them when it has fewer)."""

    def __init__(self, source: Sequence, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


class SkipCounts:
    """Records left out by a ``bad='skip'`` pass: ``skipped`` reason -> count, ``ids``."""

    def __init__(self):
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.ids: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.skipped.values())


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batches(source: Sequence, to_example: Callable, *, batch_size: int,
            process_index: int = 0, process_count: int = 1, bad: str = "raise",
            pad: str | None = "last", threads: int = 4, window: int | None = None,
            seed: int = 0, what: str = "", stats: SkipCounts | None = None,
            id_key: str = "") -> Iterator[dict[str, Any]]:
    """This process's rows of every evaluation batch of `source` (module docstring).

    Args:
      source: random-access records.
      to_example: ``fn(record, rng: RecordRng) -> dict`` (rng of (seed, 0, index)); raises
        BadRecord for an unusable record.
      batch_size: global batch size B (divisible by `process_count`).
      bad: 'raise' or 'skip'; pad: None, 'first' or 'last'.
      threads, window: decoding threads and the records decoded ahead (`ordered_map`).
      what: record kind in messages; stats: where 'skip' counts; id_key: record field logged
        and listed in `stats.ids` for a skipped record (default: its index).
    With ``pad=None`` and several processes every batch must be full (the rows are split).
    """
    if bad not in BAD or pad not in PADS:
        raise ValueError(f"bad must be one of {BAD} and pad one of {PADS}, got {bad!r}, {pad!r}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"eval batch_size {batch_size} is not a positive multiple of the "
                         f"{process_count} processes")
    local = batch_size // process_count
    mine = slice(process_index * local, (process_index + 1) * local)
    name = f"{what} " if what else ""

    def load(index: int) -> dict | BadRecord:
        record = None
        try:
            record = source[index]
            example = to_example(record, RecordRng(seed, 0, index))
        except BadRecord as e:
            if bad == "skip":
                return e
            raise DataError(f"{name}eval record {index} ({describe(record)}): {e}") from e
        except BAD_RECORD_ERRORS as e:
            if bad == "skip":
                return BadRecord("bad_record", repr(e))
            raise DataError(f"{name}eval record {index} ({describe(record)}): {e!r}") from e
        example.setdefault("idx", np.int32(index))
        return example

    def finish(rows: list[dict], real: int, sliced: bool = False) -> dict:
        """Batch of `rows` (`real` of them real; `sliced`: already padded and this
        process's)."""
        if not sliced:
            if pad is not None:
                rows = rows + [rows[0 if pad == "first" else -1]] * (batch_size - real)
            rows = rows[mine]
        out = _stack(rows)
        if pad is not None:
            out["valid"] = (np.arange(batch_size) < real).astype(np.int32)[mine]
        return out

    n = len(source)
    if bad == "raise":  # fixed batches of indices: decode only this process's rows
        groups = []
        for start in range(0, n, batch_size):
            rows = list(range(start, min(start + batch_size, n)))
            real = len(rows)
            if pad is not None:
                rows += [rows[0 if pad == "first" else -1]] * (batch_size - real)
            groups.append((real, rows[mine]))
        loaded = ordered_map(load, [i for _, rows in groups for i in rows], threads, window)
        for real, rows in groups:
            yield finish([next(loaded) for _ in rows], real, sliced=True)
        return
    rows: list[dict] = []
    for i, ex in zip(range(n), ordered_map(load, range(n), threads, window)):
        if isinstance(ex, BadRecord):
            rid = str(source[i].get(id_key, i)) if id_key and isinstance(source[i], dict) \
                else str(i)
            logger.warning("skipping %srecord %s (%s): %s", name, rid, ex.reason, ex)
            if stats is not None:
                stats.skipped[ex.reason] = stats.skipped.get(ex.reason, 0) + 1
                stats.ids.append(rid)
            continue
        rows.append(ex)
        if len(rows) == batch_size:
            yield finish(rows, batch_size)
            rows = []
    if rows:
        yield finish(rows, len(rows))
