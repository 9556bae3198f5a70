"""Retrieval fine-tuning from the shared pretraining fixture learns beyond chance (learning
tier)."""

import pytest


from test_retrieval import SMALL_MODEL
from helpers import metric_rows, train_cli


LEARN = {"total_steps": 300, "optim.lr": 3e-3, "optim.warmup_steps": 30,
         "log_every_steps": 100, "ckpt_every_steps": 10000,
         "mesh.shape.data": 1, "input.train_size": 1000, "input.eval_size": 100,
         "evals.val.k_test": 16}


@pytest.mark.learning
def test_finetuning_tiny_learns_retrieval(pretrain_workdir, tmp_path):
    """`configs/retrieval.py:tiny` from the (2-step, near-random) pretraining workdir at 48 px,
    300 steps on 1000 synthetic images x 2 captions: held-out R@1 and R@5 both ways (100
    images, 200 captions) clearly above chance (1% / 5%). CLI in a subprocess at XLA's default
    optimisation."""
    overrides = {f"model.{k}": v for k, v in SMALL_MODEL.items()}
    overrides.update(LEARN, **{"model.image_size": 48, "init.checkpoint": str(pretrain_workdir),
                               "input.synthetic_dir": str(tmp_path / "data")})
    train_cli("configs/retrieval.py:tiny", tmp_path / "run", overrides)
    rows = metric_rows(tmp_path / "run", "val/txt_r1")
    assert [r["step"] for r in rows] == [300]
    m = {k[4:]: v for k, v in rows[0].items() if k.startswith("val/")}
    print("held-out retrieval (100 images, chance R@1 1%):",
          {k: round(v, 2) for k, v in m.items()})
    # Measured text / image R@1 10.0 / 10.0 and R@5 35.0 / 31.0; chance 1 / 5.
    assert m["txt_r1"] > 4.0 and m["img_r1"] > 4.0, m
    assert m["txt_r5"] > 20.0 and m["img_r5"] > 20.0, m
