"""JAX's persistent compilation cache: where it lives, its flags, and a second `mplug-jax
predict` process that compiles nothing."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mplug_jax import cli
from mplug_jax import compilation_cache as cc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `mplug-jax ARGS...` in this process with the cache-event counter installed, then prints
# the counts as the last line.
_COUNTING = ("import json, sys; from mplug_jax import compilation_cache as cc, cli; "
             "k = cc.Counter(); rc = cli.main(sys.argv[1:]); "
             "print(json.dumps(dict(k.counts, rc=rc)))")


def test_conftest_keeps_tests_out_of_the_home_cache():
    assert os.environ[cc.ENV] == "off" and cc.resolve() is None
    # The run's shared cache (tests/conftest.py) is a directory of its own, set through JAX's
    # variables, which the tests below override with their own directories.
    if os.environ["MPLUG_TEST_JAX_CACHE"] != "off":
        assert os.environ["JAX_COMPILATION_CACHE_DIR"] == os.environ["MPLUG_TEST_JAX_CACHE"]
        assert os.environ["JAX_COMPILATION_CACHE_DIR"] != cc.default_dir()


def test_resolve_flags_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(cc.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.resolve() == str(tmp_path / "xdg" / "mplug_jax" / "jax_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cc.resolve() == os.path.expanduser("~/.cache/mplug_jax/jax_cache")
    monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
    assert cc.resolve() == str(tmp_path / "env")
    assert cc.resolve("OFF") is None and cc.resolve("") is None  # a flag beats the env
    for value in ("", "off"):
        monkeypatch.setenv(cc.ENV, value)
        assert cc.resolve() is None
    argv = ["predict", "--compilation-cache", "/c", "--image", "a.jpg"]
    assert cc.pop_flags(argv) == (["predict", "--image", "a.jpg"], "/c")
    assert cc.pop_flags(["--no-compilation-cache", "plan"]) == (["plan"], "off")
    assert cc.pop_flags(["train", "--compilation-cache=/d"]) == (["train"], "/d")
    with pytest.raises(ValueError, match="needs a directory"):
        cc.pop_flags(["score", "--compilation-cache"])


def test_unusable_directory_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["--compilation-cache", str(blocker / "sub"), "score", "--task", "vqa",
                   "--results", "r.json", "--annotations", "a.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: compilation cache directory {blocker / 'sub'}: ")
    assert "--no-compilation-cache" in err
    assert os.environ[cc.ENV] == "off"  # nothing exported for a directory that failed


@pytest.mark.integration
def test_second_predict_process_compiles_nothing(pretrain_workdir, tmp_path):
    """Two `mplug-jax predict` processes on one cache: the first writes every program it
    compiles, the second reads every one back (hits == requests, nothing compiled) and gives
    the same caption."""
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    cache = tmp_path / "cache"
    args = ["--compilation-cache", str(cache), "predict", "--checkpoint",
            str(pretrain_workdir), "--task", "caption", "--image", str(tmp_path / "red.png"),
            "--beam-size", "2", "--min-length", "2", "--max-length", "4"]
    env = dict(os.environ, PYTHONPATH=REPO)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _COUNTING, *args], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        runs.append((lines[:-1], json.loads(lines[-1])))
    (caption1, first), (caption2, second) = runs
    assert caption1 == caption2 and caption1 and first["rc"] == 0
    assert first["requests"] > 0 and first["hits"] == 0
    assert first["writes"] == first["requests"]  # no threshold leaves a program out
    assert len(os.listdir(cache)) >= first["writes"]
    assert second["requests"] == first["requests"]
    assert second["hits"] == second["requests"] and second["writes"] == 0
