"""`mplug-jax evaluate` (a config's evaluators on a checkpoint) and `mplug-jax score` plumbing."""
import json

import numpy as np
import pytest

from mplug_jax import cli, evaluate, workdir
from test_trainer import loop_config

# What `test_trainer.loop_config` changes in configs/pretrain.py:tiny,mode=smoke, as overrides.
MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
             fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16, vision_width=32,
             vision_layers=1, vision_heads=2, embed_dim=16)


def test_evaluate_cli_on_a_pretraining_workdir(pretrain_workdir, tmp_path, capsys):
    overrides = [f"--config.model.{k}={v}" for k, v in MODEL.items()]
    overrides += ["--config.input.batch_size=8", "--config.input.max_tokens=16",
                  "--config.task.itc.queue_size=32", "--config.mesh.shape.data=1",
                  "--config.evals.heldout.num_examples=16", "--config.evals.heldout.batch_size=8",
                  "--config.evals.heldout.num_captions=1"]
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", "--config=configs/pretrain.py:tiny,mode=smoke", "--checkpoint",
                   str(pretrain_workdir), "--step", "2", "--out", str(out), *overrides])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"heldout"}
    assert 0.0 <= metrics["heldout"]["itm_acc"] <= 1.0
    assert "== eval 'heldout'" in capsys.readouterr().out


def test_evaluate_loads_exactly_the_checkpoint_params(pretrain_workdir):
    cfg = loop_config()
    _, params = evaluate.load_params(cfg, str(pretrain_workdir), step=1)
    _, want, _ = workdir.restore_params(pretrain_workdir, step=1)
    got, ref = np.asarray(params["text_proj"]["kernel"]), np.asarray(want["text_proj"]["kernel"])
    np.testing.assert_array_equal(got, ref)


def test_evaluate_without_evals_is_a_clear_error(pretrain_workdir, tmp_path):
    with pytest.raises(ValueError, match="no evals"):
        evaluate.evaluate(loop_config(), str(pretrain_workdir), str(tmp_path))


def test_score_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse lists the valid tasks
        cli.main(["score", "--task", "nope", "--results", "r", "--annotations", "a"])
    assert exit_.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
