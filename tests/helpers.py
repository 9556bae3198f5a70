"""Small helpers several test files share (imported by name: `from helpers import ...`)."""
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from mplug_jax import metrics, tasks

REPO = pathlib.Path(__file__).resolve().parents[1]


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


# A two-layer mPLUG of width 32 at 32 px (2 x 2 patches): the task unit tests' model.
SMALL_MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
                   fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
                   vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16)


def built_task(config, seed: int = 0):
    """(`tasks.build(config)`, its unboxed initial params from PRNGKey(`seed`))."""
    task = tasks.build(config)
    return task, nn.meta.unbox(task.init_params(jax.random.PRNGKey(seed)))


def train_cli(config: str, workdir, overrides: dict, *, timeout: int = 600,
              default_xla: bool = True):
    """`python -m mplug_jax.main --config=CONFIG --workdir=WORKDIR --config.K=V ...` (one
    `--config.K=V` per item of `overrides`) in a subprocess at the repository root; asserts
    it exits 0 and returns the CompletedProcess. `default_xla`: without the suite's
    XLA_FLAGS, i.e. at XLA's default optimisation (the learning runs' speed)."""
    env = dict(os.environ)
    if default_xla:
        env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "mplug_jax.main", f"--config={config}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metric_rows(workdir, key: str) -> list[dict]:
    """The rows of <workdir>/metrics.jsonl that have `key`."""
    return [r for r in metrics.read_jsonl(os.path.join(str(workdir), "metrics.jsonl"))
            if key in r]
