"""Small helpers several test files share (imported by name: `from helpers import ...`)."""
import pytest


def set_path(config, path: str, value) -> None:
    """Set the dotted `path` ('task.itc.queue_size') of a ConfigDict to `value`."""
    *parents, key = path.split(".")
    for name in parents:
        config = config[name]
    config[key] = value


def assert_rejected(make_config, build, cases, error=ValueError) -> None:
    """For each `(path, value, match)` of `cases`: a fresh `make_config()` with `path` set to
    `value` makes `build(config)` raise `error` matching `match`."""
    for path, value, match in cases:
        c = make_config()
        set_path(c, path, value)
        with pytest.raises(error, match=match):
            build(c)
