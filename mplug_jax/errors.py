"""Telling a bad config or input from a bug, and the one place that reports it.

Every command-line entry (`mplug-jax ...`, `python -m mplug_jax.main`) runs its command through
`guarded`: an error of the user's making (see `is_user_error`) prints one line,
``error: <message>``, on stderr and exits with status 2; anything else is a bug and keeps its
traceback. `--debug` or ``MPLUG_JAX_DEBUG=1`` shows the traceback of user errors too.

User errors are:

- `ConfigError` (raised by `mplug_jax.config_checks`, the config loading in
  `mplug_jax.config_args`, and any code that finds a bad value or input; subclass it for new
  kinds, e.g. a workdir in use);
- `OSError` (a file or folder missing, not writable, a disk full: the environment, not the code);
- `mplug_jax.data.ops.image.DataError` (the data as a whole is unusable);
- a `ValueError` or `KeyError` raised by an explicit ``raise SomeError(...)`` statement in this
  package or in a config file: by this project's convention those are messages for the user
  (library-internal ValueErrors, and ones Python raises by itself such as a failed unpacking,
  stay bugs).
"""
from __future__ import annotations

import linecache
import os
import re
import sys
import traceback
from typing import Callable

DEBUG_ENV = "MPLUG_JAX_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_USER_ERROR = 2

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_RAISE_CALL = re.compile(r"raise\s+[\w.]+\(")


class ConfigError(ValueError):
    """A bad config value, command line or input (file missing, value out of range): reported as
    one `error:` line with exit status 2 by the command-line entries."""


def _ours(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR + os.sep) or \
        os.path.basename(os.path.dirname(path)) == "configs"


def _raised_explicitly_by_us(err: BaseException) -> bool:
    """Whether the innermost frame of `err` is a `raise X(...)` line of this package or of a
    config file."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    line = (last.line or linecache.getline(last.filename, last.lineno)).strip()
    return _ours(last.filename) and bool(_RAISE_CALL.match(line))


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is a config or input error (one line, exit 2) rather than a bug."""
    if isinstance(err, (ConfigError, OSError)):
        return True
    from mplug_jax.data.ops.image import DataError  # lazy: keeps this module light
    if isinstance(err, DataError):
        return True
    return isinstance(err, (ValueError, KeyError)) and _raised_explicitly_by_us(err)


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a KeyError's message without its quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 and \
        isinstance(err.args[0], str) else str(err)
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text or type(err).__name__


def debug_requested(argv: list[str] | None = None) -> bool:
    """`--debug` among `argv` or MPLUG_JAX_DEBUG set to a true value."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or DEBUG_FLAG in (argv or ())


def without_debug(argv: list[str]) -> list[str]:
    """`argv` without the `--debug` switch."""
    return [a for a in argv if a != DEBUG_FLAG]


def guarded(fn: Callable[[], int], debug: bool = False) -> int:
    """`fn()`'s exit status; a user error prints ``error: ...`` (one line) and gives 2, unless
    `debug`, which re-raises it (the traceback). Bugs always propagate."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - sorted below; bugs are re-raised
        if debug or not is_user_error(err):
            raise
        sys.stdout.flush()
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
