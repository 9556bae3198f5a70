"""mPLUG-2 video retrieval fine-tuned from scratch beats chance (learning tier)."""
import json

import numpy as np
import pytest

from mplug_jax import metrics
from helpers import train_cli


@pytest.mark.learning
def test_finetune_from_scratch_beats_chance(tmp_path):
    """The tiny config as is (250 steps from scratch, CLI subprocess, XLA default
    optimisation): the train loss falls and held-out text->video R@1 / R@5 beat chance
    clearly. Measured: t2v R@1 / R@5 / R@10 6.25 / 31.25 / 45.3 % on 64 held-out videos
    (chance 1.56 / 7.8 / 15.6), v2t R@1 6.25; ~5.5 min on 2 heavily shared cores (compile
    ~160 s of it), ~2 min on an idle 2-core machine."""
    overrides = {"input.synthetic_dir": str(tmp_path / "videos"),
                 "evals.val.synthetic_dir": str(tmp_path / "eval"), "ckpt_every_steps": 1000}
    train_cli("configs/mplug2/retrieval.py:tiny", tmp_path / "run", overrides, timeout=900)
    rows = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    train = [r for r in rows if "train/loss" in r]
    ev = [r for r in rows if "val/vid_r1" in r][-1]
    first, last = train[0]["train/loss"], np.mean([r["train/loss"] for r in train[-2:]])
    print(json.dumps({"first_loss": first, "last_loss": last,
                      **{k: ev[k] for k in ev if k.startswith("val/")}}))
    chance = 100.0 / ev["val/num_videos"]
    assert last < first - 0.3, (first, last)
    # R@1 is 4 of 64 videos: only asked to beat chance; R@5 / R@10 clearly (4x / 3x measured).
    assert ev["val/vid_r1"] > chance, ev
    assert ev["val/vid_r5"] >= 2.0 * 5 * chance, ev
    assert ev["val/vid_r10"] >= 2.0 * 10 * chance, ev
