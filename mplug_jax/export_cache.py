"""Traced programs kept beside JAX's persistent compilation cache, so that a warm start skips
tracing as well as compiling.

JAX's persistent cache (`mplug_jax.compilation_cache`) stores compiled programs, but its key is
the lowered program, so every process still traces the Flax model in Python before it can look
the program up: ~0.9 s of a warm `mplug-jax predict` on the tiny model, a quarter of it. Here the
traced program itself (`jax.export`, serialised StableHLO) is stored under a key made of
everything that decides it: the function's name and static settings, the argument shapes and
dtypes, the jax / jaxlib versions, the JAX options that change a trace, and a digest of this
package's source files (an edited model never reuses an old trace). A warm start deserialises
it and calls it; its compile is then a hit of the persistent cache.

Active only while JAX's persistent cache is (a directory set and the cache enabled): the
programs go to `<that directory>/mplug_jax_exports/` (JAX's own eviction only looks at its
`*-cache` files), at most `MAX_FILES` of them, the least recently used dropped first. Any
failure to read or write one falls back to tracing, with a warning.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import tempfile
from typing import Any, Callable

import jax

SUBDIR = "mplug_jax_exports"
MAX_FILES = 64
_log = logging.getLogger(__name__)
_CALLS: dict[str, Callable] = {}  # file -> jitted call of its program, in this process


@functools.cache
def source_digest() -> str:
    """sha256 of every .py file of the mplug_jax package (relative path and contents)."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def directory() -> str | None:
    """Where traced programs go: `<JAX's cache directory>/mplug_jax_exports`, or None while
    JAX's persistent cache is off."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or not jax.config.jax_enable_compilation_cache:
        return None
    return os.path.join(cache, SUBDIR)


def key(name: str, static: str, args: Any) -> str:
    """The file name (hex digest) of `name`'s program for `static` settings and `args`."""
    import jaxlib
    shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), args)
    parts = [name, static, repr(jax.tree.structure(args)), repr(jax.tree.leaves(shapes)),
             jax.__version__, jaxlib.__version__, jax.default_backend(),
             str(jax.config.jax_default_matmul_precision), str(jax.config.jax_enable_x64),
             str(jax.config.jax_default_prng_impl), source_digest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def call(fn: Callable, name: str, static: str, args: tuple, where: str | None = None):
    """`fn(*args)`, through the stored trace of `fn` when there is one (module docstring).

    Args:
      fn: a jitted function of arrays (pytrees of them; None leaves allowed).
      name: what `fn` is ('predict.search'); static: everything else its trace depends on
        (model and settings reprs).
      args: its positional arguments.
      where: the programs' directory (default `directory()`; None there: `fn` is called as is).
    """
    where = where or directory()
    if where is None:
        return fn(*args)
    path = os.path.join(where, key(name, static, args) + ".jaxexport")
    if path not in _CALLS:
        exported = _read(path)
        if exported is None:
            exported = jax.export.export(fn)(*args)
            _write(path, exported)
        _CALLS[path] = jax.jit(exported.call)
    return _CALLS[path](*args)


def _read(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: trace again
        _log.warning("ignoring the stored program %s (%s: %s); tracing again", path,
                     type(err).__name__, err)
        return None
    try:
        os.utime(path)  # recently used (eviction drops the oldest)
    except OSError:
        pass
    return exported


def _write(path: str, exported) -> None:
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(exported.serialize())
        os.replace(tmp, path)  # readers never see a partial file
        files = sorted(pathlib.Path(folder).glob("*.jaxexport"), key=lambda p: p.stat().st_mtime)
        for old in files[:-MAX_FILES]:
            old.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - a read-only or full disk: only slower starts
        _log.warning("could not store the traced program in %s (%s: %s)", folder,
                     type(err).__name__, err)
