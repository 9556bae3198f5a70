"""JAX's persistent compilation cache for every `mplug-jax` command and the main job.

Compiled XLA programs are written to a per-user directory and read back by the next process
that compiles the same program (same HLO, compile options, devices and jax/jaxlib version), so
a second `mplug-jax predict` or a resumed run skips its compiles. Where it lives:

  --compilation-cache DIR / --no-compilation-cache   (`mplug-jax ...`; `--compilation_cache`
                                                      for `python -m mplug_jax.main`)
  MPLUG_JAX_CACHE_DIR=DIR, or '' / 'off' to disable  (inherited by subprocesses)
  default: $XDG_CACHE_HOME/mplug_jax/jax_cache, else ~/.cache/mplug_jax/jax_cache

Disabled, JAX is left as configured (its own JAX_COMPILATION_CACHE_DIR still applies).
JAX puts the directory's path in every key (through XLA's GPU autotune-cache option), so a
cache copied or moved elsewhere starts cold.
"""
from __future__ import annotations

import os
import sys

ENV = "MPLUG_JAX_CACHE_DIR"
OFF_VALUES = ("", "off", "none", "0", "false", "no")
FLAG, NO_FLAG = "--compilation-cache", "--no-compilation-cache"
MAX_BYTES = 4 * 2**30  # least recently used entries are dropped above this size


def default_dir() -> str:
    """`$XDG_CACHE_HOME/mplug_jax/jax_cache`, or `~/.cache/mplug_jax/jax_cache`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mplug_jax", "jax_cache")


def resolve(value: str | None = None) -> str | None:
    """The cache directory from a flag `value` (None: not given), else $MPLUG_JAX_CACHE_DIR,
    else `default_dir()`; None when disabled ('' / 'off' / 'none' / '0')."""
    if value is None:
        value = os.environ.get(ENV)
    if value is None:
        return default_dir()
    if value.strip().lower() in OFF_VALUES:
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable(path: str) -> None:
    """Point JAX's persistent cache at `path` and cache every program, however small.

    JAX's defaults only write programs that took >= 1 s to compile; the predictor and the
    tiny configs compile dozens of 0.05-0.5 s programs on CPU, which together dominate a
    start, so the compile-time threshold is 0 and the entry-size threshold off (-1). Set
    through JAX's own environment variables (read when jax is imported, inherited by child
    processes; commands that never import jax pay nothing) and, if jax is already imported,
    through `jax.config`.
    """
    os.makedirs(path, exist_ok=True)
    settings = {"jax_compilation_cache_dir": path,
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1,
                "jax_compilation_cache_max_size": MAX_BYTES}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:
        import jax
        from jax._src import compilation_cache as cc
        for name, value in settings.items():
            jax.config.update(name, value)
        if cc.is_initialized():  # something compiled already: use the new directory from now
            cc.reset_cache()


def setup(value: str | None = None) -> str | None:
    """Enable the cache where `resolve(value)` says (a directory that cannot be created is a
    one-line ValueError); also exports it as $MPLUG_JAX_CACHE_DIR so re-executed and child
    processes use the same place. Returns the directory, or None when disabled."""
    path = resolve(value)
    if path is not None:
        try:
            enable(path)
        except OSError as err:
            raise ValueError(f"compilation cache directory {path}: {err.strerror or err} "
                             f"(move it with {FLAG} DIR or {ENV}=DIR, or pass {NO_FLAG})"
                             ) from None
    os.environ[ENV] = path or "off"
    return path


def pop_flags(argv: list[str]) -> tuple[list[str], str | None]:
    """(argv without the cache flags, the flag's value: a directory, 'off', or None if absent).

    The flags may appear anywhere in a `mplug-jax` command line (before or after the
    subcommand), so every subcommand, `train` included, takes them."""
    rest, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == NO_FLAG:
            value = "off"
        elif a == FLAG:
            if i + 1 >= len(argv):
                raise ValueError(f"{FLAG} needs a directory (or pass {NO_FLAG})")
            value, i = argv[i + 1], i + 1
        elif a.startswith(FLAG + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return rest, value


def setup_from_argv(argv: list[str]) -> list[str]:
    """`setup` from the cache flags in `argv` (see `pop_flags`); returns argv without them."""
    rest, value = pop_flags(argv)
    setup(value)
    return rest


HELP = (f"{FLAG} DIR / {NO_FLAG} (any command, anywhere on the line): where JAX's persistent "
        f"compilation cache lives (default ${ENV}, else {default_dir()}; '' or 'off' "
        "disables it), so a second run skips its compiles.")


class Counter:
    """Counts JAX's persistent-cache events in this process (jax.monitoring listeners).

    `requests`: compiles that consulted the cache; `hits`: served from it; `writes`:
    compiled and written (what JAX reports as a cache miss); `requests - hits - writes`:
    compiled but not written (below a threshold)."""

    EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
              "/jax/compilation_cache/cache_hits": "hits",
              "/jax/compilation_cache/cache_misses": "writes"}

    def __init__(self):
        from jax import monitoring
        self.counts = dict.fromkeys(self.EVENTS.values(), 0)
        monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_) -> None:
        if event in self.EVENTS:
            self.counts[self.EVENTS[event]] += 1
