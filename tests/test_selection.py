"""Periodic evaluation by epochs, model selection, evaluation on the selected checkpoint and
starting a stage from another run's best / epoch checkpoint (mplug_jax/selection.py)."""
import json

import jax
import ml_collections
import numpy as np
import pytest

from mplug_jax import config_checks, pretrained, selection, tasks, trainer, workdir
from mplug_jax import params as params_lib
from mplug_jax.errors import ConfigError
from mplug_jax.evaluators import common as evaluators
from test_trainer import loop_config

SPE = 4  # 32 training records / batch 8


class _Scripted:
    """An evaluator whose score at each call is scripted; keeps the params it saw per call."""

    def __init__(self, scores: list[float]):
        self.scores, self.seen = scores, []

    def run(self, params):
        self.seen.append(jax.tree.map(np.asarray, params))
        score = self.scores[len(self.seen) - 1]
        return {"score": score, evaluators.FILES: {"scores.json": {"score": score}}}

    @staticmethod
    def report(res):
        return f"score {res['score']}"


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory):
    """12 updates = 3 epochs of 4; val every epoch (scores 0.5, 0.9, 0.7: the best is the
    middle one, step 8), 'late' only from epoch index 2 on, 'test' on the best checkpoint;
    one checkpoint per epoch kept although keep_ckpts is 1."""
    cfg = loop_config()
    cfg.input.train_size = 32
    cfg.total_steps, cfg.ckpt_every_steps, cfg.keep_ckpts = 12, 100, 1
    cfg.ckpt_every_epochs = 1.0
    block = {"type": "pretrain_zeroshot", "every_steps": 0}
    cfg.evals = {"val": dict(block, every_epochs=1.0),
                 "late": dict(block, every_epochs=1.0, from_epoch=2),
                 "test": dict(block),
                 "off": dict(block, every_steps=1, enabled=False)}
    cfg.best = {"eval": "val", "metric": "score", "mode": "max"}
    cfg.test_on_best = ["test"]
    fakes = {"val": _Scripted([0.5, 0.9, 0.7]), "late": _Scripted([0.1]),
             "test": _Scripted([0.3])}
    mp = pytest.MonkeyPatch()
    mp.setattr(evaluators, "build", lambda name, *a, **k: fakes[name])
    wd = tmp_path_factory.mktemp("sel") / "run"
    try:
        out = trainer.run(cfg, str(wd))
    finally:
        mp.undo()
    return wd, out, fakes


def test_best_not_last_is_kept_and_tested(selected_run):
    wd, out, fakes = selected_run
    val, test = fakes["val"], fakes["test"]
    assert len(val.seen) == 3 and len(test.seen) == 1  # epochs 1-3; test once, after training
    assert not _same(val.seen[1], val.seen[2])  # the best (step 8) is not the final state
    assert _same(test.seen[0], val.seen[1])  # the test eval saw the selected params
    assert out["selected_step"] == 8 and out["evals"]["test"]["score"] == 0.3
    record = json.loads((wd / "best" / "best.json").read_text())
    assert (record["step"], record["value"]) == (8, 0.9)
    _, kept, _ = workdir.restore_params(wd / "best")
    assert _same(jax.tree.map(np.asarray, kept), val.seen[1])
    results = sorted(p.name for p in (wd / "results").iterdir())
    assert results == ["late_step12", "test_step8", "val_step12", "val_step4", "val_step8"]
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    tested = [r for r in rows if "test/score" in r]
    assert len(tested) == 1 and tested[0]["test/selected_step"] == 8 and tested[0]["step"] == 12


def test_epoch_cadence(selected_run):
    wd, _, fakes = selected_run
    assert len(fakes["late"].seen) == 1  # from_epoch=2: only the end of the third epoch
    assert _same(fakes["late"].seen[0], fakes["val"].seen[2])
    assert json.loads((wd / selection.EPOCHS).read_text())["steps_per_epoch"] == SPE
    steps = sorted(int(p.name) for p in (wd / "ckpt").iterdir() if p.name.isdigit())
    assert steps == [4, 8, 12]  # ckpt_every_epochs keeps every epoch despite keep_ckpts=1


@pytest.mark.parametrize("every_steps,every_epochs,from_epoch,want", [
    (0, 1.0, 0, [4, 8, 12]), (0, 0.5, 0, [2, 4, 6, 8, 10, 12]), (3, 0.0, 0, [3, 6, 9, 12]),
    (6, 1.0, 1, [6, 8, 12]), (0, 0.0, 0, []), (0, 2.0, 0, [8])])
def test_due(every_steps, every_epochs, from_epoch, want):
    ecfg = ml_collections.ConfigDict(dict(every_steps=every_steps, every_epochs=every_epochs,
                                          from_epoch=from_epoch))
    assert [s for s in range(1, 13) if selection.due(ecfg, s, SPE)] == want
    ecfg.enabled = False
    assert not any(selection.due(ecfg, s, SPE) for s in range(1, 13))


def test_stage_starts_from_best_or_epoch(selected_run):
    """init.select picks the best / an epoch's checkpoint of another workdir, and what
    `init.checkpoint` loads is exactly the params that evaluation saw."""
    wd, _, fakes = selected_run
    init = ml_collections.ConfigDict(dict(checkpoint=str(wd), step=0, select="best"))
    assert selection.init_source(init) == (workdir.resolve(wd / "best"), None)
    model = tasks.model(workdir.read_config(wd))
    assert not model.scan_layers  # the loop layout: loaded and saved names are the same
    cases = {"best": fakes["val"].seen[1], "epoch:0": fakes["val"].seen[0],
             "epoch:1": fakes["val"].seen[1], "latest": fakes["val"].seen[2]}
    for select, want in cases.items():
        init.select = select
        loaded = pretrained.load(init, model)
        flat = {k: np.asarray(v) for k, v in loaded.params.items()}
        ref = {k: np.asarray(v) for k, v in params_lib.flatten(want).items()}
        assert flat.keys() == ref.keys(), select
        assert all(np.array_equal(flat[k], ref[k]) for k in ref), select
    init.select = "epoch:5"  # no such checkpoint: a clear error naming the step
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 24"):
        pretrained.load(init, model)


def test_config_checks_refuse_bad_selection(tmp_path, selected_run):
    wd, _, _ = selected_run
    cfg = loop_config()
    cfg.evals = {"val": {"type": "pretrain_zeroshot", "every_epochs": -1.0}}
    cfg.best = {"eval": "nope", "metric": "", "mode": "up"}
    cfg.test_on_best = ["missing"]
    cfg.init.select = "epoch:x"
    with pytest.raises(ConfigError) as err:
        config_checks.check(cfg, files=False)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("evals.val.every_epochs must be >= 0", "best.eval='nope' is not an enabled",
                 "best.metric is empty", "best.mode must be 'max' or 'min'",
                 "test_on_best names ['missing']", "init.select='epoch:x' must be"):
        assert part in msg, part
    cfg = loop_config()
    cfg.evals = {"val": {"type": "pretrain_zeroshot", "input": {"no_such_field": 1}}}
    cfg.test_on_best = ["val"]
    cfg.init.update(select="best", step=3)
    with pytest.raises(ConfigError) as err:
        config_checks.check(cfg, files=False)
    for part in ("evals.val.input names ['no_such_field']", "test_on_best=['val'] needs best",
                 "init.select='best' and init.step=3 both"):
        assert part in str(err.value), part
    cfg = loop_config()
    cfg.init.update(checkpoint=str(wd / "best"), select="best")  # best/ has no best/ itself
    with pytest.raises(ConfigError, match="has no best/"):
        config_checks.check(cfg, workdir=str(tmp_path / "new"))
    cfg.init.update(checkpoint=str(wd), select="epoch:0")
    config_checks.check(cfg, workdir=str(tmp_path / "new"))  # the source has epochs.json
