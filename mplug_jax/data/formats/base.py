"""What every official-format reader shares: :class:`RecordSource`, file reading, the parse
loop that skips and counts malformed records, and :class:`Split` (one split for `prepare`).

A reader (``formats.<name>.read``) parses its annotation files once and returns a
:class:`RecordSource`: a random-access list of plain dict records with absolute image paths
(images are decoded later by the pipeline). Malformed records (not an object, missing or
mistyped fields) are skipped, counted by reason in ``source.skipped``, and logged with file
name and position; a :class:`DataError` is raised when they exceed `max_skip_rate` of a file
set, and for files that are not valid JSON at all. TensorFlow Datasets is not imported here
(the TFDS side is :mod:`mplug_jax.data.formats.builder`).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterable, Sequence

from mplug_jax.data.ops.image import SKIP_REASONS, BadRecord, DataError

logger = logging.getLogger(__name__)

__all__ = ["RecordSource", "Split", "read_annotations", "build", "items", "as_list",
           "str_field", "caption_field", "BadRecord", "DataError", "SKIP_REASONS"]


class RecordSource(collections.abc.Sequence):
    """A list of parsed records plus the skip counts of parsing (random access, picklable)."""

    def __init__(self, records: list[dict], skipped: dict[str, int] | None = None,
                 name: str = ""):
        self.records, self.name = records, name
        self.skipped = dict(skipped or dict.fromkeys(SKIP_REASONS, 0))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}: {len(self)} records, "
                f"{sum(self.skipped.values())} skipped)")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split handed to `prepare`: its annotation files and the options a reader may use.

    Attributes:
      files: annotation files of the split.
      image_root: root joined to relative image paths (video formats: the video folder).
      train: training-style records (one per caption, answer weights) or evaluation-style.
      roots: extra image roots by dataset tag (vqa: 'vg', 'gqa').
      flickr: grounding tuples in the flickr layout.
      max_skip_rate: the reader raises DataError when more records than this are malformed.
    """
    files: list[str]
    image_root: str
    train: bool = True
    roots: dict[str, str] = dataclasses.field(default_factory=dict)
    flickr: bool = False
    max_skip_rate: float = 0.01

    def one_file(self, format: str) -> str:
        """The split's only annotation file; ValueError for formats read one file at a time."""
        if len(self.files) != 1:
            raise ValueError(f"{format} takes exactly one annotation file per split, "
                             f"got {len(self.files)}")
        return self.files[0]


def as_list(paths: str | os.PathLike | Sequence) -> list[str]:
    """One path or a sequence of paths -> list of str paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def read_annotations(path: str) -> list[Any]:
    """A JSON array file, or JSON lines (``.jsonl``; a bad line becomes ``None``).

    Raises:
      DataError: the file is missing, or a ``.json`` file is not a valid JSON array.
    """
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            out = []
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    logger.warning("%s line %d: invalid JSON (%s)", path, n + 1, e)
                    out.append(None)
            return out
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def build(items: Iterable[tuple[str, int, Any]], parse: Callable[[Any, int], list[dict]],
          name: str, max_skip_rate: float, kind: type = dict) -> RecordSource:
    """Parse (file, position, raw) items; each raw record of type `kind` yields records.

    `parse(raw, position)` returns the records of one raw record, or raises BadRecord (or a
    KeyError / IndexError / TypeError / ValueError / AttributeError, counted as 'bad_record')
    to skip it.

    Raises:
      DataError: more than `max_skip_rate` of the raw records were skipped.
    """
    records: list[dict] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    total = 0
    for path, pos, raw in items:
        total += 1
        try:
            if not isinstance(raw, kind):
                raise BadRecord("bad_record", f"not a {kind.__name__}: {raw!r:.60}")
            records.extend(parse(raw, pos))
        except BadRecord as e:
            skipped[e.reason] += 1
            logger.warning("%s record %d skipped (%s): %s", path, pos, e.reason, e)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            skipped["bad_record"] += 1
            logger.warning("%s record %d skipped (bad_record): %r", path, pos, e)
    n_skipped = sum(skipped.values())
    if total and n_skipped / total > max_skip_rate:
        raise DataError(f"{name}: {n_skipped} of {total} annotation records malformed "
                        f"(> max_skip_rate={max_skip_rate}): "
                        + ", ".join(f"{k}={v}" for k, v in skipped.items() if v))
    if n_skipped:
        logger.warning("%s: skipped %d of %d annotation records", name, n_skipped, total)
    return RecordSource(records, skipped, name)


def items(files: list[str]) -> Iterable[tuple[str, int, Any]]:
    """(file, position, raw record) of every record of `files`, in order."""
    for path in files:
        for pos, raw in enumerate(read_annotations(path)):
            yield path, pos, raw


def str_field(raw: dict, key: str) -> str:
    """`raw[key]` when it is a non-empty string; BadRecord('bad_record') otherwise."""
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("bad_record", f"field {key!r} missing or not a non-empty string")
    return value


def caption_field(value: Any) -> str | list[str]:
    """A caption string, or the non-empty strings of a list; BadRecord('bad_caption')."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        caps = [c for c in value if isinstance(c, str) and c.strip()]
        if caps:
            return caps
    raise BadRecord("bad_caption", f"caption missing, empty or not text: {value!r:.60}")
