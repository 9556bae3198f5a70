"""Evaluate a checkpoint with the evaluators of a config, without training.

    mplug-jax evaluate --config configs/vqa.py:tiny --checkpoint WORKDIR_OR_CONVERTED_DIR \
        [--out DIR] [--step N] [--config.x=y ...]

The params come from `--checkpoint` exactly as a fine-tuning run's `init.checkpoint` would
load them (`mplug_jax.pretrained`: a workdir of ours at `--step`, a `mplug-jax convert`
directory or an official file), placed with the config's mesh and sharding rules; every enabled
block of `config.evals` runs; the metrics go to `<out>/metrics.json` and each evaluator's result files
to `<out>/<eval name>/`.
"""
from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
from etils import epath

from mplug_jax import config_checks, trainer
from mplug_jax.errors import ConfigError
from mplug_jax.evaluators import common as evaluators


def eval_config(config, checkpoint: str, step: int = 0):
    """A copy of `config` that initialises from `checkpoint` at `step` (`init.checkpoint`; no
    CLIP / BERT) and has one train step if it had none (the train state's shapes need it)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if "init" not in config:
            config.init = {}
        config.init.update(clip="", bert="", checkpoint=str(checkpoint), step=int(step),
                           select="latest")  # --step, not the training preset's `select`
        if config.total_steps <= 0 and config.total_epochs <= 0:
            config.total_steps = 1
    return config


def load_params(config, checkpoint: str, step: int = 0):
    """(Setup, params sharded as the config's train state would hold them) from `checkpoint`."""
    config = eval_config(config, checkpoint, step)
    s = trainer.setup(config, 1)
    init = jax.jit(lambda k: nn.meta.unbox(s.task.init_params(k)),
                   out_shardings=s.shardings.params)
    return s, s.task.pretrained_params(init(jax.random.PRNGKey(config.seed)))


def evaluate(config, checkpoint: str, out_dir: str, step: int = 0, log=print) -> dict:
    """Run every `config.evals` block on `checkpoint`'s params.

    Returns {eval name: metrics}; writes `<out_dir>/metrics.json` and the result files."""
    if not config.get("evals"):
        raise ValueError(f"config (task {config.task.name!r}) has no evals to run")
    # Every input named (the checkpoint as init.checkpoint) exists, before anything is built.
    config_checks.check(eval_config(config, checkpoint, step))
    bad_out = config_checks.unwritable(out_dir, "--out")
    if bad_out:
        raise ConfigError(bad_out)
    t0 = time.perf_counter()
    s, params = load_params(config, checkpoint, step)
    log(f"loaded {checkpoint} for task {config.task.name!r} in {time.perf_counter() - t0:.0f}s")
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, ecfg in config.evals.items():
        if not ecfg.get("enabled", True):
            continue
        ev = evaluators.build(name, ecfg, config, s.task.predict_fns(), s.mesh)
        t = time.perf_counter()
        res = ev.run(params)
        files = evaluators.write_files(res, out / name)
        log(f"== eval '{name}' ({time.perf_counter() - t:.0f}s)\n" + ev.report(res)
            + "".join(f"\nwrote {p}" for p in files))
        results[name] = evaluators.scalars(res)
    if jax.process_index() == 0:
        (out / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        log(f"metrics: {out / 'metrics.json'}")
    return results
