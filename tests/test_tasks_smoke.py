"""Every task of the registry (`mplug_jax.tasks.available()`: the mPLUG tasks and the dotted
mPLUG-2 ones) at tiny dims through the one trainer: its `tiny` config builds, the state
initialises, one train step runs with a finite loss, and at the end every evaluator the task
is scored by runs one batch on the trained params through the task's predict fns and logs its
metrics. A new task module gets this test without writing one. What a task computes (losses
vs hand computations, metrics, learning) is tested in its own files.
"""
import importlib
import math

import jax
import numpy as np
import pytest

from mplug_jax import metrics, tasks, trainer

# One layer per stack (mPLUG-2: two text layers, the universal layers of the release).
LAYERS = {"mplug": dict(vision_layers=1, text_layers=1, fusion_layers=1, decoder_layers=1),
          "mplug2": dict(vision_layers=1, text_layers=2, fusion_layers=1, decoder_layers=1)}
# Eval settings shrunk to one batch of 8 (every key only where a block has it).
EVAL_SMALL = dict(num_examples=8, synthetic_size=8, batch_size=8, itm_batch_size=8, k_test=2,
                  sim_chunk=8, num_captions=1, max_decode_len=4, beam_size=2, max_length=4,
                  rank_k=4, eval_size=8)


def config_module(name: str):
    """`configs/<name>.py`, or `configs/<family>/<leaf>.py` for a dotted name."""
    return importlib.import_module("configs." + tasks.canonical(name))


def _video_qa_eval(c, tmp_path) -> dict:
    """The `tiny` mPLUG-2 video QA config has no eval block (the video QA evaluator reads
    json files): one on the synthetic held-out questions written as such files."""
    from mplug_jax.mplug2 import input as mplug2_input
    c.input.eval_size = 8
    ann, root = mplug2_input.synthetic_files(c.input, "heldout", 0)
    return dict(type="video_qa", every_steps=0, dataset="json", annotations=ann,
                video_root=root, num_frames=c.model.num_frames, batch_size=8,
                max_question_tokens=c.input.max_question_tokens, beam_size=2, min_length=1,
                max_length=4, workers=1, num_examples_shown=1, resize="nearest")


def _pretrain2_eval(c, tmp_path) -> dict:
    """mPLUG-2 pretraining has no eval block in `tiny`: zero-shot video retrieval (the
    retrieval task's evaluator) on its embedding predict fns."""
    block = config_module("mplug2.retrieval").get_config("tiny,mode=smoke").evals.val
    return dict(block, num_frames=c.model.num_frames)


EXTRA_EVALS = {"mplug2.video_qa": _video_qa_eval, "mplug2.pretrain": _pretrain2_eval}


def tiny_config(name: str, tmp_path):
    """Task `name`'s `tiny` config shrunk to one train step of 8 on 2 devices and one
    eval batch of 8 per evaluator."""
    mod = config_module(name)
    try:
        c = mod.get_config("tiny,mode=smoke")
    except ValueError:  # a config without a smoke mode (caption: ce | scst | zeroshot)
        c = mod.get_config("tiny")
    c.total_steps, c.total_epochs = 1, 0.0
    c.log_every_steps, c.ckpt_every_steps = 1, 1000
    c.peak_flops = 1e11  # no CPU matmul measurement
    c.eval_at_start = False
    # 2 devices: the batch-split, sharded path of every task at 0.7x the compile time of 8.
    c.mesh.shape = dict(data=2, fsdp=1, tensor=1)
    c.init.allow_scratch = True  # fine-tuning from a pretrained model: test_init_pretrained.py
    c.model.update(LAYERS["mplug2" if name.startswith("mplug2.") else "mplug"])
    c.input.batch_size = 8
    for key, value in dict(train_size=16, synthetic_dir=str(tmp_path / "data")).items():
        if key in c.input:
            c.input[key] = value
    if name in EXTRA_EVALS:
        c.evals = {"val": EXTRA_EVALS[name](c, tmp_path)}
    for block in c.evals.values():
        block.update({k: v for k, v in EVAL_SMALL.items() if k in block})
        if "synthetic_dir" in block:
            block["synthetic_dir"] = str(tmp_path / "eval")
    if "generation" in c.task:
        c.task.generation.update(beam_size=2, min_length=1, max_length=4)
    return c


@pytest.mark.parametrize("name", tasks.available())
def test_init_train_step_eval(name, tmp_path):
    c = tiny_config(name, tmp_path)
    assert c.evals, f"{name}: no evaluator exercises its predict fns"
    out = trainer.run(c, str(tmp_path / "run"))
    assert out["stopped"] == "done" and out["step"] == 1
    rows = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0]), losses
    assert sorted(out["evals"]) == sorted(c.evals)
    for block, result in out["evals"].items():
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        assert scalars, (block, result)
        logged = {k.split("/", 1)[1] for r in rows for k in r if k.startswith(f"{block}/")}
        assert logged, f"{name}: eval block {block!r} logged nothing"
    if name == "mplug2.pretrain":  # a predict fn no evaluator calls
        task = tasks.build(c)
        video = np.zeros((2, c.model.num_frames, c.model.image_size, c.model.image_size, 3),
                         np.float32)
        ids = jax.jit(task.predict_fns()["lm_generate"], static_argnums=2)(
            out["state"].params, video, 4)
        assert ids.shape == (2, 4)
