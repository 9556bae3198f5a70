"""Checks every scorer runs on its input files before computing a number.

A result file that is not JSON, is empty, repeats a query, or holds a null / NaN / wrongly
typed value raises `ScoreInputError` naming the file and the first bad entry: a score is only
reported for a file that says what it should (duplicates are never silently dropped or counted
twice, a missing caption never scored as the string "None").
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Callable, Hashable, Iterator, Mapping


class ScoreInputError(ValueError):
    """A result or annotation file that cannot be scored; the message names the file and the
    first bad entry."""


def read_json(path: str, what: str = "results") -> Any:
    """The parsed JSON of `path` ('what' names the file's role in the error)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoreInputError(f"{what} file {path} is not valid JSON ({e})") from e


def nonempty_list(path: str, data: Any, what: str) -> list:
    """`data` if it is a non-empty list; `what` describes one entry, e.g. '{question_id, answer}'
    objects."""
    if not isinstance(data, list):
        raise ScoreInputError(f"{path}: expected a JSON array of {what}, got "
                              f"{type(data).__name__}")
    if not data:
        raise ScoreInputError(f"{path} is empty: no {what} to score")
    return data


# ---- value kinds: (test, description) ------------------------------------------------------

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


STR = (lambda v: isinstance(v, str), "a string")
INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
ID = (lambda v: isinstance(v, str) or INT[0](v), "a string or an integer")
NUMBER = (_finite, "a finite number")


def list_of(kind: tuple[Callable, str], length: int | None = None) -> tuple[Callable, str]:
    """Kind: a list (of `length` items when given) whose items are all of `kind`."""
    test, desc = kind
    return (lambda v: isinstance(v, list) and (length is None or len(v) == length)
            and all(test(x) for x in v),
            f"a list of {length or ''}{' ' if length else ''}items, each {desc}")


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else "infinite"
    return f"{value!r:.60}"


def check_entry(path: str, index: int, row: Any, spec: Mapping[str, tuple[Callable, str]],
                label: str = "entry") -> Mapping:
    """`row` if it is an object whose fields in `spec` are present and of their kind."""
    if not isinstance(row, Mapping):
        raise ScoreInputError(f"{path} {label} {index}: expected an object with "
                              f"{sorted(spec)}, got {_describe(row)}")
    for field, (test, desc) in spec.items():
        if field not in row:
            raise ScoreInputError(f"{path} {label} {index}: no '{field}' (needs "
                                  f"{sorted(spec)})")
        if not test(row[field]):
            raise ScoreInputError(f"{path} {label} {index}: '{field}' must be {desc}, got "
                                  f"{_describe(row[field])}")
    return row


class Unique:
    """Refuses a key seen before: `add(index, key)` raises naming both entries."""

    def __init__(self, path: str, what: str, label: str = "entry"):
        self.path, self.what, self.label = path, what, label
        self.first: dict[Hashable, int] = {}

    def add(self, index: int, key: Hashable) -> None:
        if key in self.first:
            raise ScoreInputError(f"{self.path} {self.label} {index}: {self.what} {key!r} "
                                  f"repeats {self.label} {self.first[key]} (each may appear "
                                  "once)")
        self.first[key] = index


def check_rows(path: str, rows: Any, spec: Mapping[str, tuple[Callable, str]], key: str,
               what: str, label: str = "entry") -> list[Mapping]:
    """A non-empty list of objects matching `spec` whose `key` field is unique."""
    rows = nonempty_list(path, rows, what)
    seen = Unique(path, key, label)
    for i, row in enumerate(rows):
        check_entry(path, i, row, spec, label)
        seen.add(i, row[key])
    return rows


@contextlib.contextmanager
def reading_annotations() -> Iterator[None]:
    """Turns the data readers' DataError (annotation files read by `mplug_jax.data.formats`)
    into ScoreInputError, so that every bad scoring input has one exception type."""
    from mplug_jax.data.ops.image import DataError
    try:
        yield
    except DataError as e:
        raise ScoreInputError(str(e)) from e
