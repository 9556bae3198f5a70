"""Configs from the command line: `--config=FILE[:ARG]` plus `--config.a.b=value` overrides.

ml_collections' `config_flags` does the parsing; this module adds what it lacks:

- list fields (e.g. `input.annotations`) can be overridden, in two forms:
  ``--config.input.annotations=a.json,b.json`` (comma-separated; numbers become numbers) or a
  JSON / Python list ``--config.input.annotations='["a.json", "b.json"]'`` (for names with
  commas); an empty value gives an empty list. Tuple fields take the same two forms (and
  ml_collections' repeated flag, ``--config.x=a --config.x=b``);
- every failure (config file missing, its `get_config` refusing the argument, a misspelled
  field, a value of the wrong type) becomes a one-line `ConfigError`.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

from mplug_jax.errors import ConfigError


def _element(text: str) -> Any:
    """One comma-separated element: a number stays a number, a quoted string loses its quotes,
    anything else is the text itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) \
        else text


def parse_sequence(argument: Any) -> list:
    """A command-line value -> list: a list / tuple as is; a string in JSON or Python list
    syntax (`'["a", "b"]'`, `'(1, 2)'`), or comma-separated (`a,b`); '' -> []."""
    if isinstance(argument, (list, tuple)):
        return list(argument)
    if not isinstance(argument, str):
        return [argument]
    text = argument.strip()
    if not text:
        return []
    if text[0] in "[({":
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as err:
                raise ValueError(f"cannot read {argument!r} as a list (write it as JSON, "
                                 f"'[\"a\", \"b\"]', or comma-separated, a,b): {err}") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{argument!r} is not a list")
        return list(value)
    parts = [p.strip() for p in text.split(",")]
    if parts and not parts[-1]:  # a trailing comma
        parts.pop()
    if any(not p for p in parts):
        raise ValueError(f"empty element in the comma-separated list {argument!r}")
    return [_element(p) for p in parts]


class ListParser(flags.ArgumentParser):
    """absl parser of list-typed config fields (see `parse_sequence`)."""

    def parse(self, argument):
        return parse_sequence(argument)

    def flag_type(self):
        return "list"


class TupleParser(tuple_parser.TupleParser):
    """ml_collections' tuple parser with the comma-separated form of `parse_sequence` (theirs
    reads `a,b` of names as the one string 'a,b')."""

    def parse(self, argument):
        if isinstance(argument, str):
            return tuple(parse_sequence(argument))
        return super().parse(argument)


config_flags.register_flag_parser_for_type(list, ListParser())
config_flags.register_flag_parser_for_type(tuple, TupleParser())


def config_path(spec: str) -> str:
    """The file of a `FILE[:ARG]` config spec."""
    return spec.split(":", 1)[0]


def _why_parsing_failed(err: Exception, spec: str, overrides: Sequence[str]) -> str:
    """One line for an exception of config-flag parsing."""
    text = str(err)
    if "Error whilst parsing config file" in text:
        # config_flags embeds get_config's traceback: its last line is the message.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else text
        reason = last.split(": ", 1)[1] if ": " in last and \
            last.split(":", 1)[0].replace(".", "").isidentifier() else last
        return f"--config={spec}: {reason}"
    key_err = err
    while key_err is not None and not isinstance(key_err, KeyError):
        key_err = key_err.__cause__ or key_err.__context__
    if isinstance(err, (KeyError, AttributeError)) and key_err is not None and key_err.args:
        # A misspelled field: ml_collections' KeyError("'batchsize'\nDid you mean ...").
        key_text = str(key_err.args[0]).splitlines()
        key = key_text[0].strip("'\"") if key_text else ""
        hint = " ".join(key_text[1:]).strip()
        named = [o.split("=", 1)[0] for o in overrides
                 if key in o.split("=", 1)[0][len("--config."):].split(".")]
        where = named[0] if named else repr(key)
        return f"unknown config field {where}" + (f": {hint}" if hint else "")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_flags(argv: Sequence[str], extra_flags=None, lock: bool = True):
    """Parse `argv` (argv[0] the program name) with a fresh `FlagValues` holding `--config`
    (whose overrides are read from this same argv) and whatever `extra_flags(fv)` defines.

    Returns the FlagValues; any failure is a `ConfigError` with a one-line message.
    """
    argv = list(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", flag_values=fv,
                                    lock_config=lock, sys_argv=argv)
    if extra_flags is not None:
        extra_flags(fv)
    specs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    specs += [b for a, b in zip(argv[1:], argv[2:]) if a == "--config"]  # `--config FILE`
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    if not specs:
        raise ConfigError("--config is required, e.g. --config=configs/pretrain.py:tiny")
    spec = specs[-1]
    if not os.path.isfile(config_path(spec)):
        raise ConfigError(f"config file {config_path(spec)!r} not found (--config={spec}; "
                          f"relative paths are from {os.getcwd()})")
    # Config files import `configs.common`: make the folder above theirs importable.
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_path(spec))))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        fv(argv)
        if fv.config is None:
            raise ConfigError(f"--config={spec} gave no config")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - everything here is about the command line
        raise ConfigError(_why_parsing_failed(err, spec, overrides)) from err
    return fv


def load_config(spec: str, overrides: Sequence[str] = (), lock: bool = False):
    """A config from `path[:arg]` plus `--config.a.b=value` overrides (the leading '--' is
    optional), e.g. `load_config('configs/pretrain.py:large', ['config.model.dtype=bfloat16'])`.

    Errors: `ConfigError`.
    """
    args = [o if o.startswith("--") else "--" + o for o in overrides]
    bad = [a for a in args if not a.startswith("--config.")]
    if bad:
        raise ConfigError(f"config overrides must look like --config.a.b=value, got {bad}")
    return parse_flags(["load_config", f"--config={spec}"] + args, lock=lock).config
