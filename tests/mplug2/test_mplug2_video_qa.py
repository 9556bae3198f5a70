"""mPLUG-2 video QA task: synthetic motion data, input pipeline, loss, temporal switch,
generation (learning test: tests/learning/test_learn_mplug2_video_qa.py)."""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mplug2 import video_qa as cfg_lib
from mplug_jax import tasks
from mplug_jax.data.formats import video_qa as video_qa_format
from mplug_jax.mplug2 import input as mplug2_input
from mplug_jax.data.synthetic import motion as synthetic_motion
from mplug_jax.data.ops import tokenizer
from mplug_jax.mplug2.parity import token_nll
from mplug_jax.mplug2.tasks import video_qa as m2task


def _config(tmp_path, **kw):
    c = cfg_lib.get_config("tiny")
    c.input.synthetic_dir = str(tmp_path / "motion")
    c.input.update(train_size=12, eval_size=6, batch_size=4)
    c.model.num_frames = 4
    for k, v in kw.items():
        c.model[k] = v
    return c


def test_synthetic_motion_needs_time(tmp_path):
    """Official jsonl + frame folders read by the real reader; 'order' clips show the answer's
    shape only in the first half and reversed videos swap the answers of 'order' questions."""
    paths = synthetic_motion.write_motion_files(str(tmp_path), 6, split="train")
    recs = video_qa_format.read(paths["msrvtt_qa"], paths["frames_root"])
    assert len(recs) == 6 and paths["kinds"] == list(synthetic_motion.KINDS) * 2
    ds = synthetic_motion.SyntheticMotion("train", 6)
    for i in range(6):
        r, v = recs[i], ds.video(i)
        assert synthetic_motion.question_kind(r["question"]) == v.kind
        assert r["answer"] in synthetic_motion.answer_choices(v.kind)
        assert len(os.listdir(r["video"])) == 8
    order = ds.video(1)
    first, second = order.tracks[0][0].shape, order.tracks[1][0].shape
    assert order.answer == first != second
    assert [s.shape for s in order.scene_at(0.1).shapes] == [first]
    assert [s.shape for s in order.scene_at(0.9).shapes] == [second]
    frames = ds.frames(0)  # direction: the frames differ, the first and last most
    assert np.abs(frames[0].astype(int) - frames[-1]).sum() > 0
    with pytest.raises(ValueError, match="not a synthetic motion"):
        synthetic_motion.question_kind("what colour is it?")


def test_direction_path_does_not_leak_the_answer():
    """Regression: 'direction' movers used to start at one fixed edge of their lane (right /
    down from the low side, left / up from the high side), so the mean position over the
    frames (what a model without time sees) told left from right: 0.39 vs 0.61 of the side, a
    threshold on it 98% right. The path is now drawn independently of the direction and frames
    show the middles of their time slots: the mean positions of the two directions on an axis
    agree, and a threshold on them is at chance."""
    rng = np.random.default_rng(0)
    mean_pos = {d: [] for d in synthetic_motion.DIRECTIONS}
    for _ in range(600):
        v = synthetic_motion.sample_video(rng, "direction")
        axis = 0 if v.answer in ("left", "right") else 1
        track = [(s.cx, s.cy)[axis] for s in
                 (v.scene_at(synthetic_motion.frame_time(f, 8)).shapes[0]
                  for f in range(8))]
        mean_pos[v.answer].append(np.mean(track))
    for a, b in (("left", "right"), ("up", "down")):
        x, y = np.asarray(mean_pos[a]), np.asarray(mean_pos[b])
        assert abs(x.mean() - y.mean()) < 0.03, (a, x.mean(), b, y.mean())
        # the best threshold on the mean position separates the two directions at chance
        both = np.concatenate([x, y])
        best = max(max(np.mean(np.r_[x < t, y >= t]), np.mean(np.r_[x >= t, y < t]))
                   for t in np.quantile(both, np.linspace(0.05, 0.95, 19)))
        assert best < 0.62, (a, b, best)


def test_easy_variant_is_reversal_symmetric():
    """The 'easy' variant (the tiny learning test's data): two answers per kind; with 4 raw
    frames, 'order' shows each colour in exactly two frames (first half = the answer) and the
    'direction' path is independent of the direction, so the mean position of left and right
    movers agree (an unordered frame set says nothing about the answer)."""
    assert synthetic_motion.kinds("easy") == ("direction", "order")
    ds = synthetic_motion.SyntheticMotion("heldout", 400, raw_frames=4, variant="easy")
    mean_x = {"left": [], "right": []}
    for i in range(400):
        v = ds.video(i)
        assert v.answer in synthetic_motion.answer_choices(v.kind, "easy")
        scenes = [v.scene_at(synthetic_motion.frame_time(f, 4)) for f in range(4)]
        assert all(len(sc.shapes) == 1 and sc.style == "solid" for sc in scenes)
        if v.kind == "order":
            colors = [sc.shapes[0].color for sc in scenes]
            assert colors[:2] == [v.answer] * 2 and len(set(colors[2:])) == 1 != len(set(colors))
        else:
            xs = [sc.shapes[0].cx for sc in scenes]
            assert (np.diff(xs) > 0).all() == (v.answer == "right")
            mean_x[v.answer].append(np.mean(xs))
    assert abs(np.mean(mean_x["left"]) - np.mean(mean_x["right"])) < 0.03
    assert synthetic_motion.question_kind("which colour appears first?") == "order"
    with pytest.raises(ValueError, match="unknown synthetic motion variant"):
        synthetic_motion.SyntheticMotion("train", 4, variant="hard")
    with pytest.raises(ValueError, match="unknown kind 'count' for variant 'easy'"):
        synthetic_motion.answer_choices("count", "easy")


def test_input_batches_skip_bad_videos(tmp_path):
    """Train batches: shapes, dtypes, 'rand' frames, one answer; a deleted video is skipped and
    counted; eval batches keep the order and use the official test transform."""
    c = _config(tmp_path)
    src = mplug2_input.source(c.input, "train")
    shutil.rmtree(src[3]["video"])
    it = mplug2_input.dataset(src, c.input, num_frames=4, image_size=32, batch_size=4,
                              train=True, num_epochs=1)
    batches = list(it)
    b = batches[0]
    assert b["video"].shape == (4, 4, 32, 32, 3) and b["video"].dtype == np.float32
    assert b["question_ids"].shape == (4, 12) and b["answer_ids"].shape == (4, 4)
    assert (b["answer_ids"][:, 0] == tokenizer.CLS_ID).all()
    assert (b["answer_weights"] == 1).all()
    seen = np.concatenate([x["idx"] for x in batches])
    assert 3 not in seen and len(seen) == 8  # 11 usable, the last 3 dropped (remainder)
    ev = list(mplug2_input.eval_batches(c, src, 5))
    assert np.concatenate([x["idx"] for x in ev]).tolist() == [i for i in range(12) if i != 3]
    from mplug_jax.data.ops import video
    want = video.eval_clip(video.load_frames(src[0]["video"], 4), 32)
    np.testing.assert_array_equal(ev[0]["video"][0], want)
    with pytest.raises(ValueError, match="input.dataset='json' needs"):
        c.input.dataset = "json"
        mplug2_input.source(c.input, "train")


def test_loss_matches_release_math_and_temporal_switch(tmp_path):
    """The task loss equals the release's (docs/fixtures.md#mplug-2-losses: labels -100 on padding,
    summed per answer, weighted, / clips). temporal=False has no lmhra params and cannot tell a
    video from its time reversal; the temporal model can once its LT modules are non-zero."""
    c = _config(tmp_path)
    task = tasks.build(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    it = mplug2_input.dataset(mplug2_input.source(c.input, "train"), c.input, num_frames=4,
                              image_size=32, batch_size=4, train=True)
    b = {k: jnp.asarray(v) for k, v in next(iter(it)).items()}
    b["answer_weights"] = jnp.asarray([1.0, 0.5, 2.0, 1.0])
    loss, (metrics, _) = jax.jit(task.loss)(params, {}, b, jax.random.PRNGKey(1), 0)

    m = task.model
    states, smask = m.apply({"params": params}, b["video"], b["question_ids"],
                            b["question_mask"], method=m2task.video_states)
    logits = m.apply({"params": params}, b["answer_ids"], b["answer_mask"], states, smask,
                     method="decode")
    labels = jnp.where(b["answer_mask"] > 0, b["answer_ids"], -100)
    nll, _ = token_nll(logits, labels)
    want = (b["answer_weights"] * nll.sum(1)).sum() / 4
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert metrics["loss"] == loss

    rev = b["video"][:, ::-1]
    c2 = _config(tmp_path, temporal=False)
    t2 = tasks.build(c2)
    p2 = nn.meta.unbox(jax.jit(t2.init_params)(jax.random.PRNGKey(0)))
    assert "lmhra1" in str(jax.tree.structure(params))
    assert "lmhra1" not in str(jax.tree.structure(p2))
    enc2 = jax.jit(t2.encode_video)
    a, r = enc2(p2, b["video"]), enc2(p2, rev)
    # Same tokens, frames in reverse order: the fused states see an unordered set.
    t, n = 4, (a.shape[1] - 1) // 4
    perm = np.concatenate([[0], 1 + np.arange(t * n).reshape(t, n)[::-1].ravel()])
    np.testing.assert_allclose(a, r[:, perm], atol=1e-5)
    lt = jax.tree.map(lambda x: x, params)
    for i in range(m.vision_layers):
        for name in ("lmhra1", "lmhra2"):
            up = lt["vision"][f"blocks_{i}"][name]["up_proj"]
            up["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(i), up["kernel"].shape)
    enc = jax.jit(task.encode_video)
    a, r = enc(lt, b["video"]), enc(lt, rev)
    assert float(jnp.abs(a - r[:, perm]).max()) > 1e-3


def test_generation_predict_fns(tmp_path):
    """`encode_video` + `vqa_generate_embeds` (the evaluator's path) equals `vqa_generate`;
    ids start with [CLS] and are right-padded."""
    c = _config(tmp_path)
    task = tasks.build(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    src = mplug2_input.source(c.input, "heldout")
    b = next(mplug2_input.eval_batches(c, src, 3))
    fns = task.predict_fns()

    @jax.jit
    def both(p, v, q, m):
        img = fns["encode_video"](p, v)
        return (fns["vqa_generate_embeds"](p, img, q, m, beam_size=3, max_length=4)["ids"],
                fns["vqa_generate"](p, v, q, m, beam_size=3, max_length=4)["ids"])

    x, y = both(params, b["video"], b["question_ids"], b["question_mask"])
    assert x.shape == (3, 3, 5) and (np.asarray(x)[:, :, 0] == tokenizer.CLS_ID).all()
    np.testing.assert_array_equal(x, y)


def test_init_refuses_scratch_and_bad_checkpoint(tmp_path):
    c = _config(tmp_path)
    c.init.allow_scratch = False
    task = tasks.build(c)
    with pytest.raises(ValueError, match="allow_scratch"):
        task.init_from_pretrained(None)
    c.init.checkpoint = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither"):
        tasks.build(c).init_from_pretrained(None)
    # A best / epoch pick needs a training workdir (a file or converted directory has none).
    (tmp_path / "model.pth").write_bytes(b"")
    c.init.checkpoint, c.init.select = str(tmp_path / "model.pth"), "best"
    with pytest.raises(ValueError, match="init.select='best' picks a checkpoint of a training"):
        tasks.build(c).init_from_pretrained(None)


def test_video_qa_evaluator_runs_the_mplug2_task(tmp_path):
    """The shared video QA evaluator uses the task's own `encode_video` (temporal modules,
    universal layers) and the release's nearest-neighbour test resize; its answers are the
    task's generation on `eval_clip` frames, and its result file lists every question."""
    from mplug_jax.evaluators import common as evaluators
    c = _config(tmp_path)
    ann, root = mplug2_input.synthetic_files(c.input, "heldout", 0)
    c.evals = {"val": dict(type="video_qa", dataset="json", annotations=ann, video_root=root,
                           num_frames=4, batch_size=3, beam_size=3,
                           max_question_tokens=c.input.max_question_tokens,
                           min_length=1, max_length=4, workers=1, num_examples_shown=2,
                           resize="nearest")}
    task = tasks.build(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    ev = evaluators.build("val", c.evals["val"], c, task.predict_fns())
    res = ev.run(params)
    rows = res.pop(evaluators.FILES)["video_qa_result.json"]
    assert res["num_questions"] == len(rows) == c.input.eval_size and 0 <= res["acc"] <= 1
    # Its inputs are the task pipeline's eval inputs bit for bit (frames by the release's
    # nearest resize, questions); test_generation_predict_fns covers the generation path.
    src = video_qa_format.read(ann, root)
    b = next(mplug2_input.eval_batches(c, src, 3))
    first = next(iter(ev.input))
    np.testing.assert_array_equal(first["frames"], b["video"])
    np.testing.assert_array_equal(first["question_ids"], b["question_ids"])
    assert sorted(r["question_id"] for r in rows) == [src[i]["question_id"]
                                                      for i in range(len(src))]
