"""SNLI-VE fine-tuning learns beyond its baseline (learning tier)."""
import json
import os
import subprocess

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import snli_ve as snli_config
from mplug_jax import cli, metrics, scoring, tasks
from mplug_jax.data.inputs import snli_ve as snli_ve_input
from mplug_jax.data.synthetic import snli_ve as S

from test_snli_ve import SMALL_MODEL
from helpers import train_cli


LEARN = {"total_steps": 300, "optim.lr": 3e-3, "optim.warmup_steps": 30,
         "log_every_steps": 100, "ckpt_every_steps": 10000, "mesh.shape.data": 1,
         "input.train_size": 4000, "input.eval_size": 512, "evals.val.batch_size": 128,
         "model.image_size": 48}


def train_snli_ve(workdir, overrides: dict) -> subprocess.CompletedProcess:
    """`configs/snli_ve.py:tiny` through the CLI in a subprocess (XLA's default optimisation,
    not the suite's -O0), `overrides` on top."""
    return train_cli("configs/snli_ve.py:tiny", workdir, overrides)


@pytest.mark.learning
def test_finetuning_tiny_learns_snli_ve(pretrain_workdir, tmp_path, capsys):
    """`configs/snli_ve.py:tiny` hypothesis only (`task.premise=False`, the ALBEF-format json
    of the synthetic data) with the 32-wide model of the (2-step, near-random) pretraining
    workdir, at 48 px (one 16 px patch per grid cell), 300 steps from `init.checkpoint`:
    held-out 3-way accuracy clearly above chance (1/3), the majority class (35.2%) and the best
    hypothesis-only guess (46.1%), i.e. the model reads the image; measured 69.9% (70.1%,
    neutral 92%, with the earlier pretraining fixture). That is the ceiling of reading the
    hypothesis form and whether the image has a cover (69.9%): the cover is learnt, the
    objects' presence is not yet (still 70.1% at step 1000 of a longer run). CLI in a
    subprocess at XLA's default optimisation; then `mplug-jax evaluate` on the fine-tuned
    workdir (cls_head loaded) agrees with the trainer's evaluation."""
    overrides = {f"model.{k}": v for k, v in SMALL_MODEL.items()}
    # Hypothesis only (the ALBEF json), at the text length it was measured with.
    overrides.update(LEARN, **{"init.checkpoint": str(pretrain_workdir),
                               "input.synthetic_dir": str(tmp_path / "synth"),
                               "task.premise": False, "input.max_text_tokens": 12})
    wd = tmp_path / "run"
    proc = train_snli_ve(wd, overrides)
    # Every encoder-side array (mlm_bias, temp included) comes from the workdir; cls_head
    # (absent there) stays fresh; the decoder and dense heads of the workdir are skipped.
    cfg = snli_config.get_config("tiny")
    cfg.model.update({k.split(".", 1)[1]: v for k, v in overrides.items()
                      if k.startswith("model.")})
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(tasks.build(cfg).init_params(k)),
                            jax.random.PRNGKey(0))
    n_enc = len(jax.tree.leaves({k: v for k, v in shapes.items() if k != "cls_head"}))
    assert f"initialised {n_enc} arrays from workdir {pretrain_workdir}" in proc.stdout
    rows = [r for r in metrics.read_jsonl(str(wd / "metrics.jsonl")) if "val/acc" in r]
    assert [r["step"] for r in rows] == [300]
    res = rows[0]
    train = [S.example("train", i, image_size=8) for i in range(4000)]
    held = [S.example("val", i, image_size=8) for i in range(512)]
    blind = S.hypothesis_only_accuracy(train, held)
    majority = max(res[f"val/n_{c}"] for c in snli_ve_input.LABELS) / res["val/n"]
    print(f"held-out SNLI-VE accuracy {res['val/acc']:.4f}; chance 0.3333, majority "
          f"{majority:.4f}, hypothesis-only {blind:.4f}; per class",
          {c: round(res[f"val/acc_{c}"], 4) for c in snli_ve_input.LABELS})
    assert res["val/acc"] > max(majority, blind) + 0.15, (res, majority, blind)

    result = wd / "results" / "val_step300" / "snli_ve_result.json"
    ann = next((tmp_path / "synth").glob("val_*")) / "ve_val.json"
    assert scoring.score_file("snli_ve", str(result), str(ann))["acc"] == \
        pytest.approx(res["val/acc"])

    out = tmp_path / "eval"
    args = [f"--config.{k}={v}" for k, v in overrides.items() if k != "init.checkpoint"]
    assert cli.main(["evaluate", "--config=configs/snli_ve.py:tiny", "--checkpoint", str(wd),
                     "--out", str(out), *args, "--config.evals.val.num_examples=128"]) == 0
    again = json.loads((out / "metrics.json").read_text())["val"]
    first = {r["id"]: r["pred"] for r in json.loads(result.read_text())}
    rerun = json.loads((out / "val" / "snli_ve_result.json").read_text())
    same = np.mean([first[r["id"]] == r["pred"] for r in rerun])
    assert again["n"] == 128 and same >= 0.98, same  # -O0 here vs -O2 there: near-ties may flip


PREMISE_LEARN = {**LEARN, "optim.warmup_steps": 15, "input.train_size": 2000,
                 "input.eval_size": 256}


@pytest.mark.learning
def test_premise_beats_hypothesis_only(pretrain_workdir, tmp_path):
    """Paper 5.2.5 feeds the text premise. On the synthetic triples whose premise says what
    the striped cover hides (`mplug_jax.data.synthetic.snli_ve`), two runs of the tiny config
    from the same pretraining workdir, same seeds, same files (the original-format jsonl,
    labels given the premise), 300 steps each: `task.premise=True` (`[CLS] premise [SEP]
    hypothesis`) against `task.premise=False` (`[CLS] hypothesis`). The premise run must beat
    the hypothesis-only run by 10 points and the best any model without the premise can do
    (a perfect image reader: hypothesis form, cover and object visibility known, 0.883).
    Measured: 1.000 with the premise (1.000 from step 250; 0.99 at 200), 0.605 without."""
    synth = str(tmp_path / "synth")
    files = {sp: S.ensure_files(synth, sp, n, image_size=48, seed=0)
             for sp, n in (("train", 2000), ("val", 256))}
    # Train and val images under one root, as Flickr30k's: val's linked beside train's.
    for name in os.listdir(files["val"]["image_root"]):
        os.symlink(os.path.join(files["val"]["image_root"], name),
                   os.path.join(files["train"]["image_root"], name))
    base = {f"model.{k}": v for k, v in SMALL_MODEL.items()}
    base.update(PREMISE_LEARN, **{"init.checkpoint": str(pretrain_workdir),
                                  "input.dataset": "json",
                                  "input.image_root": files["train"]["image_root"],
                                  "input.train_file": files["train"]["original"],
                                  "input.val_file": files["val"]["original"]})
    acc = {}
    for premise in (True, False):
        wd = tmp_path / f"premise_{premise}"
        train_snli_ve(wd, {**base, "task.premise": premise})
        rows = [r for r in metrics.read_jsonl(str(wd / "metrics.jsonl")) if "val/acc" in r]
        assert [r["step"] for r in rows] == [300] and rows[0]["val/n"] == 256
        acc[premise] = rows[0]["val/acc"]
    train = [S.example("train", i, image_size=8) for i in range(2000)]
    held = [S.example("val", i, image_size=8) for i in range(256)]
    ceiling = S.best_guess_accuracy(train, held, ("sentence", "cover", "visible"),
                                    "premise_label")
    print(f"held-out accuracy with the premise {acc[True]:.4f}, hypothesis only "
          f"{acc[False]:.4f}; best without the premise (perfect image reader) {ceiling:.4f}")
    assert acc[True] > acc[False] + 0.10, acc
    assert acc[True] > ceiling, (acc, ceiling)
