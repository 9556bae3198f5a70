"""The training loop end to end: SIGTERM + resume bit-identity, non-finite stop (learning:
tests/learning/test_learn_pretrain.py)."""
import json
import signal

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from mplug_jax import metrics, trainer, workdir
from mplug_jax.evaluators import common as evaluators
from mplug_jax.evaluators.pretrain_zeroshot import Evaluator


def loop_config():
    """`tiny,mode=smoke` with a 32-wide, 1-2 layer model (real vocabulary, synthetic data)."""
    c = pretrain_config.get_config("tiny,mode=smoke")
    c.model.update(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
                   fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
                   vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16,
                   # CLIP's width ** -0.5 (0.18) is ~15x below the patch embeddings here (std
                   # ~2.8): fine-tuned from this init, grounding never learns where a shape is
                   # (measured: stuck at the constant box; with 3.0 it localises, test_grounding).
                   vision_posemb_init_std=3.0)
    c.input.update(batch_size=8, train_size=128, max_tokens=16)
    c.task.itc.queue_size = 32
    c.total_steps, c.log_every_steps, c.ckpt_every_steps = 6, 1, 100
    c.evals = {}
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)  # 1 of the 8 fake devices: 2 CPU cores
    return c


def _losses(workdir) -> dict[int, dict]:
    rows = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
    out = {}
    for r in rows:
        if "train/loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = {k: v for k, v in r.items() if k.startswith("train/")}
    return out


@pytest.mark.integration
def test_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = loop_config()
    full = trainer.run(cfg, str(tmp_path / "full"))
    assert full["stopped"] == "done" and full["step"] == 6

    write = metrics.MetricWriter.write

    def write_then_sigterm(self, step, scalars, console=True):
        write(self, step, scalars, console)
        if step == 3:
            signal.raise_signal(signal.SIGTERM)  # the real handler: save, then stop

    monkeypatch.setattr(metrics.MetricWriter, "write", write_then_sigterm)
    part = trainer.run(cfg, str(tmp_path / "killed"))
    assert part["stopped"] == "sigterm" and part["step"] == 3
    assert (tmp_path / "killed" / "ckpt" / "3" / "data_iter").is_dir()
    monkeypatch.undo()
    rest = trainer.run(cfg, str(tmp_path / "killed"))  # automatic resume from the workdir
    assert rest["stopped"] == "done" and rest["step"] == 6
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step] == b[step], step  # bit-identical floats, every metric
    for x, y in zip(jax.tree.leaves(jax.device_get(full["state"])),
                    jax.tree.leaves(jax.device_get(rest["state"]))):
        np.testing.assert_array_equal(x, y)


def test_nonfinite_streak_stops_with_checkpoint(tmp_path):
    cfg = loop_config()
    cfg.optim.lr = float("nan")  # every update non-finite from the second step on
    cfg.optim.warmup_steps = 0
    cfg.max_nonfinite_steps = 2
    with pytest.raises(trainer.NonFiniteError, match="consecutive steps with a non-finite"):
        trainer.run(cfg, str(tmp_path))
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert len(ckpts) == 1 and ckpts[0].isdigit()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["train/nonfinite_total"] >= 2


def test_evaluator_on_sharded_params_matches_one_device(mesh8):
    """The held-out evaluator splits its batches over the mesh (fsdp-sharded params here) and
    replicates its outputs: the metrics and captions equal the 1-device evaluation."""
    from mplug_jax import sharding as shd
    cfg = loop_config()
    ecfg = pretrain_config.get_config("tiny,mode=smoke").evals.heldout
    ecfg.update(num_examples=32, batch_size=16, num_captions=3, max_decode_len=6)
    results = []
    for mesh, preset in ((shd.make_mesh(cfg.mesh.shape, devices=jax.devices()[:1]), "dp"),
                         (mesh8, "fsdp")):
        cfg.mesh.sharding = preset
        s = trainer.setup(cfg, steps_per_epoch=10, mesh=mesh)
        results.append(Evaluator(s.task.predict_fns(), ecfg, cfg, mesh=mesh).run(
            trainer.init_state(s, cfg.seed).params))
    one, eight = results
    assert len(one["captions"]) == 3 and one["captions"] == eight["captions"]
    for k in ("i2t_r1", "t2i_r1", "itm_acc", "mlm_acc"):
        assert one[k] == pytest.approx(eight[k]), k
    with pytest.raises(ValueError, match="multiple of the 8 batch shards"):
        Evaluator(s.task.predict_fns(), _with(ecfg, batch_size=12, num_examples=36), cfg,
                  mesh=mesh8)


def _with(block, **kw):
    out = block.copy_and_resolve_references()
    out.update(kw)
    return out


class _ScriptedEval:
    """Evaluator stand-in: reports a scripted `score` per step and remembers the params."""

    def __init__(self, scores: dict[int, float], seen: dict):
        self.scores, self.seen, self.calls = scores, seen, 0

    def run(self, params):
        self.calls += 1
        step = 2 * self.calls
        self.seen[step] = jax.tree.map(np.asarray, params)
        return {"score": self.scores[step]}

    @staticmethod
    def report(res):
        return f"score {res['score']}"


def test_best_checkpoint_keeps_the_best_eval_step(tmp_path, monkeypatch):
    """config.best keeps the state of the best eval step as a workdir of its own (best/), which
    restores to exactly the params that eval saw; best.json records it."""
    cfg = loop_config()
    cfg.evals = {"val": {"type": "pretrain_zeroshot", "every_steps": 2}}
    cfg.best = {"eval": "val", "metric": "score", "mode": "max"}
    seen, want = {}, 4
    scripted = _ScriptedEval({2: 0.5, 4: 0.9, 6: 0.7}, seen)
    monkeypatch.setattr(evaluators, "build", lambda *a, **k: scripted)
    out = trainer.run(cfg, str(tmp_path / "run"))
    assert out["step"] == 6 and sorted(seen) == [2, 4, 6]
    best_dir = tmp_path / "run" / "best"
    record = json.loads((best_dir / "best.json").read_text())
    assert record["step"] == want and record["value"] == 0.9
    assert sorted(int(p.name) for p in (best_dir / "ckpt").iterdir() if p.name.isdigit()) == [want]
    _, params, _ = workdir.restore_params(best_dir)

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert same(jax.tree.map(np.asarray, params), seen[want])
    assert not same(seen[2], seen[4])  # the steps are distinguishable


def test_best_checkpoint_config_errors(tmp_path):
    cfg = loop_config()
    cfg.evals = {"val": {"type": "pretrain_zeroshot", "every_steps": 2}}
    cfg.best = {"eval": "nope", "metric": "score", "mode": "max"}
    with pytest.raises(ValueError, match="config.best.eval='nope' is not a block"):
        workdir.BestKeeper(workdir.resolve(str(tmp_path)), cfg)
    cfg.best = {"eval": "val", "metric": "score", "mode": "up"}
    with pytest.raises(ValueError, match="'max' or 'min'"):
        workdir.BestKeeper(workdir.resolve(str(tmp_path)), cfg)
    cfg.best = {"eval": "val", "metric": "score", "mode": "max"}
    keeper = workdir.BestKeeper(workdir.resolve(str(tmp_path)), cfg)
    try:
        assert "WARNING" in keeper.update(2, {"val": {"other": 1.0}}, None)
        assert keeper.update(2, {"train": {"score": 1.0}}, None) is None
        assert keeper.improves(0.1) and not keeper.improves(float("nan"))
    finally:
        keeper.close()
    cfg.best.mode = "min"
    keeper = workdir.BestKeeper(workdir.resolve(str(tmp_path / "min")), cfg)
    try:
        keeper.value = 0.5
        assert keeper.improves(0.4) and not keeper.improves(0.6)
    finally:
        keeper.close()
