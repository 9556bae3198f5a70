"""The official mPLUG / mPLUG-2 annotation formats, one module each, found by name
(docs/official-formats.md#annotation-formats).

``formats.get("vqa")`` is the module :mod:`mplug_jax.data.formats.vqa`; :func:`available` lists
every format, :func:`preparable` those that `mplug-jax prepare` can write as a TFDS dataset.
Adding a format is adding one module here (tests/data/test_formats.py checks each one), with:

- ``read(annotations, root, *, ..., max_skip_rate) -> base.RecordSource``: the reader
  (records are plain dicts with absolute media paths; bad records skipped and counted, see
  :mod:`.base`), and a module docstring naming the record fields.

and, for a format that `prepare` writes (all four or none):

- ``DESCRIPTION``: one line, the prepared dataset's TFDS description;
- ``FEATURES``: stored feature name -> kind (:data:`builder.KINDS`; a 'frames' feature makes
  it a video format that samples `num_frames` frames per record);
- ``example(builder, record, source, index) -> dict``: one reader record -> feature values
  (``builder.image(path)`` / ``builder.frames(path)`` encode media; raise BadRecord to skip);
- ``prepare_reader(split: base.Split) -> () -> RecordSource``: the zero-argument reader of one
  split (checks such as "one file per split" happen here, before anything is written).

`base` (reader machinery) and `builder` (TFDS machinery) are shared modules, not formats.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

SHARED = ("base", "builder")
# What a preparable format module defines besides `read` (see the docstring above).
PREPARE_ATTRS = ("DESCRIPTION", "FEATURES", "example", "prepare_reader")


def available() -> list[str]:
    """Every format name: the modules of this package except the shared ones."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED)


def get(name: str) -> ModuleType:
    """The module of format `name`; a clear error for an unknown name."""
    if name not in available():
        raise ValueError(f"unknown format {name!r}; valid: {available()}")
    return importlib.import_module(f"{__name__}.{name}")


def preparable() -> list[str]:
    """The formats that `prepare` can write (their modules define FEATURES and the rest)."""
    return [name for name in available() if hasattr(get(name), "FEATURES")]
