"""`mplug_jax.export_cache`: traced programs stored beside the compilation cache and reused,
keyed by everything that decides them; damaged files and a disabled cache fall back to tracing."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug_jax import export_cache


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts as a new process would: no program loaded in memory."""
    export_cache._CALLS.clear()
    yield
    export_cache._CALLS.clear()


def _files(where):
    return sorted(f for f in os.listdir(where) if f.endswith(".jaxexport"))


def _args(n=3):
    return ({"w": np.arange(n, dtype=np.float32)}, np.ones((n,), np.float32), None)


def _double(p, x, _):
    return p["w"] * 2 + x


def test_the_stored_trace_is_reused_without_tracing(tmp_path, monkeypatch):
    where = str(tmp_path)
    want = _double(*_args())
    out = export_cache.call(jax.jit(_double), "t", "s", _args(), where)
    np.testing.assert_array_equal(out, want)
    assert len(_files(where)) == 1
    # A "new process" whose function would compute something else and may not trace: the
    # stored program answers (same name, settings and argument shapes).
    export_cache._CALLS.clear()

    def no_trace(*a, **k):
        raise AssertionError("traced although a stored program exists")
    monkeypatch.setattr(jax.export, "export", no_trace)
    out = export_cache.call(jax.jit(lambda p, x, _: p["w"] - x), "t", "s", _args(), where)
    np.testing.assert_array_equal(out, want)


def test_key_covers_name_settings_and_shapes(tmp_path):
    where = str(tmp_path)
    f = jax.jit(_double)
    for name, static, n in (("t", "s", 3), ("u", "s", 3), ("t", "s2", 3), ("t", "s", 4),
                            ("t", "s", 3)):
        np.testing.assert_array_equal(export_cache.call(f, name, static, _args(n), where),
                                      _double(*_args(n)))
    assert len(_files(where)) == 4  # the last call reused the first one's program
    k = export_cache.key("t", "s", _args())
    assert k == export_cache.key("t", "s", _args()) and k != export_cache.key("t", "s ", _args())


def test_damaged_file_is_traced_again_and_replaced(tmp_path, caplog):
    where = str(tmp_path)
    f = jax.jit(_double)
    export_cache.call(f, "t", "s", _args(), where)
    (path,) = _files(where)
    with open(os.path.join(where, path), "wb") as fh:
        fh.write(b"not a program")
    export_cache._CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="mplug_jax.export_cache"):
        out = export_cache.call(f, "t", "s", _args(), where)
    np.testing.assert_array_equal(out, _double(*_args()))
    assert "ignoring the stored program" in caplog.text
    export_cache._CALLS.clear()
    assert export_cache._read(os.path.join(where, path)) is not None  # rewritten, readable


def test_oldest_programs_are_dropped_past_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(export_cache, "MAX_FILES", 2)
    f = jax.jit(_double)
    for n in (3, 4, 5):
        export_cache.call(f, "t", "s", _args(n), str(tmp_path))
    assert len(_files(tmp_path)) == 2


def test_off_while_the_compilation_cache_is_off(tmp_path):
    # The suite runs with JAX's persistent cache disabled (tests/conftest.py).
    assert not jax.config.jax_enable_compilation_cache
    assert export_cache.directory() is None
    out = export_cache.call(jax.jit(lambda x: jnp.sin(x)), "t", "s", (np.zeros(2),))
    np.testing.assert_array_equal(out, np.zeros(2))
    assert not export_cache._CALLS


def test_predictor_answers_the_same_through_a_stored_trace(pretrain_workdir, tmp_path,
                                                          monkeypatch):
    """A zero-shot caption through the stored program equals the directly traced one, and a
    second predictor (a warm start) reads it instead of tracing."""
    from skimage import data

    from mplug_jax.predict import Predictor
    image = data.astronaut()
    settings = dict(min_length=2, max_length=4, beam_size=2)
    direct = Predictor.from_checkpoint(pretrain_workdir, task="caption", **settings)(image)
    monkeypatch.setattr(export_cache, "directory", lambda: str(tmp_path))
    cold = Predictor.from_checkpoint(pretrain_workdir, task="caption", **settings)(image)
    assert len(_files(tmp_path)) == 1
    export_cache._CALLS.clear()
    monkeypatch.setattr(jax.export, "export", None)  # calling it would fail
    warm = Predictor.from_checkpoint(pretrain_workdir, task="caption", **settings)(image)
    assert direct == cold == warm
