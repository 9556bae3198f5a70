"""mPLUG-2 text-to-video retrieval: input, heads, ITC positives by video id, hard negatives,
momentum / queue updates, the video_retrieval evaluator on the task's own video path (1 device
vs 8), config errors (learning run:
tests/learning/test_learn_mplug2_retrieval.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rejected

from configs.mplug2 import retrieval as cfg_lib
from mplug_jax import losses, tasks
from mplug_jax.mplug2 import pretrain_input as m2in
from mplug_jax.data.ops import video
from mplug_jax.tasks import retrieval


def _config(tmp_path, **task_itc):
    c = cfg_lib.get_config("tiny")
    c.input.synthetic_dir = str(tmp_path / "videos")
    c.input.update(train_size=6, batch_size=4, captions_per_video=2)
    c.task.itc.update(task_itc)
    return c


def _batch(c):
    it, n = m2in.retrieval_train_batches(c, 0, 1)
    return {k: jnp.asarray(v) for k, v in next(it).items()}, n


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("m2ret")
    c = _config(tmp, queue_size=8)
    task = tasks.build(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    extra = nn.meta.unbox(task.init_extra(params, jax.random.PRNGKey(1)))
    return c, task, params, extra


def test_input_pairs_captions_with_video_ids(tmp_path):
    """Synthetic train set = real files read by the MSRVTT retrieval reader: 2 captions per
    clip on separate lines, same video_index, frames by the release's clip transform."""
    c = _config(tmp_path)
    src, index = m2in.video_text_source(c.input)
    assert len(src) == 12 and index.tolist() == [i // 2 for i in range(12)]
    assert src[0]["video_id"] == src[1]["video_id"] == "train_video0"
    b, n = _batch(c)
    assert n == 12 and b["video"].shape == (4, 4, 32, 32, 3) and b["text_ids"].shape == (4, 16)
    assert all(index[int(i)] == int(v) for i, v in zip(b["idx"], b["video_index"]))
    assert float(jnp.abs(b["video"][0]).max()) > 0.5  # CLIP-normalised frames
    with pytest.raises(ValueError, match="input.dataset='json' needs"):
        c.input.dataset = "json"
        m2in.video_text_source(c.input)


def test_heads_shapes_and_loss(built, tmp_path):
    """Param tree = MPLUG2's + heads; the pooled video token is token 0 of the universal-layer
    outputs; ITC / ITM losses finite and ITC near log(B) at init."""
    c, task, params, extra = built
    assert {"vision_proj", "text_proj", "itm_head", "temp", "visn_emb_norm"} <= set(params)
    assert "lmhra1" in str(jax.tree.structure(params["vision"]))
    b, _ = _batch(_config(tmp_path))
    fns = task.predict_fns()
    feat, toks = jax.jit(fns["video_embed"])(params, b["video"])
    n_tok = 1 + 4 * (32 // 8) ** 2
    assert feat.shape == (4, 32) and toks.shape == (4, n_tok, 64)
    np.testing.assert_allclose(jnp.linalg.norm(feat, axis=-1), 1.0, atol=1e-5)
    img_feat, img_toks = jax.jit(fns["image_embed"])(params, b["video"][:, 0])
    assert img_toks.shape == (4, 1 + 16, 64)
    loss, (m, new_extra) = jax.jit(task.loss)(params, extra, b, jax.random.PRNGKey(2),
                                              jnp.int32(0))
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(
        float(m["loss_itc"] + m["loss_itm"]), rel=1e-6)
    assert 0.3 < float(m["loss_itm"]) < 1.5 and float(m["loss_itc"]) < 2 * np.log(4 + 8)


def test_itc_positives_by_video_id_and_queue_update():
    """Rows with the same video id share the ITC target, also against queue entries carrying
    that id; the momentum features and ids are enqueued at the pointer."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    f = [unit(jax.random.normal(kk, (4, 8))) for kk in k]
    extra = nn.meta.unbox(retrieval.queue_state(jax.random.PRNGKey(5), 8, 8, True))
    extra["idx_queue"] = extra["idx_queue"].at[3].set(7)
    ids = jnp.asarray([7, 7, 3, 5], jnp.int32)
    temp = jnp.float32(0.1)
    loss, sims, upd = retrieval.contrastive(extra, *f, temp, 0.0, ids)
    # Reference: soft CE with targets uniform over [batch ids; queue ids] == own id.
    allid = np.concatenate([np.asarray(ids), np.asarray(extra["idx_queue"])])
    tgt = (np.asarray(ids)[:, None] == allid[None]).astype(np.float64)
    tgt /= tgt.sum(1, keepdims=True)
    assert tgt[0, 1] == tgt[0, 0] == tgt[0, 4 + 3] == 1 / 3 and tgt[2, 2] == 1
    def ce(q, keys):
        logits = np.asarray(q, np.float64) @ np.asarray(keys, np.float64).T / 0.1
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -(tgt * logp).sum(1).mean()
    want = (ce(f[0], np.concatenate([f[3], extra["text_queue"]]))
            + ce(f[1], np.concatenate([f[2], extra["image_queue"]]))) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert sims["sim_i2t"].shape == (4, 4)
    assert int(upd["queue_ptr"]) == 4
    np.testing.assert_array_equal(upd["idx_queue"][:4], ids)
    np.testing.assert_array_equal(upd["idx_queue"][4:], extra["idx_queue"][4:])
    np.testing.assert_allclose(upd["image_queue"][:4], f[2], rtol=1e-6)
    np.testing.assert_allclose(upd["text_queue"][:4], f[3], rtol=1e-6)


def test_hard_negatives_never_the_same_video():
    """The ITM matches of the task (same video id or identical caption) are never drawn, even
    when they are by far the most similar."""
    vidx = jnp.asarray([0, 0, 1, 2, 2, 3], jnp.int32)
    ids = jnp.asarray([[1, 5], [1, 6], [1, 7], [1, 8], [1, 9], [1, 8]], jnp.int32)
    same = (vidx[:, None] == vidx[None, :]) | jnp.all(ids[:, None] == ids[None], -1)
    sim = jnp.where(same, 50.0, 0.0)
    for s in range(40):
        neg_t, neg_v = losses.sample_hard_negatives(jax.random.PRNGKey(s), sim, sim.T, same)
        assert not bool(same[jnp.arange(6), neg_t].any())
        assert not bool(same[neg_v, jnp.arange(6)].any())


def test_momentum_and_queue_update_in_a_train_step(built, tmp_path):
    """begin_step moves params_m toward the params by (1 - momentum); the loss enqueues B
    momentum features with their video ids and advances the pointer."""
    c, task, params, extra = built
    b, _ = _batch(_config(tmp_path))
    moved = jax.tree.map(lambda x: x + 1.0, params)
    ex = task.begin_step(moved, extra)
    k = "vision_proj"
    np.testing.assert_allclose(ex["params_m"][k]["kernel"],
                               extra["params_m"][k]["kernel"] + (1 - task.momentum),
                               rtol=1e-5, atol=1e-6)
    assert "fusion" not in ex["params_m"] and "decoder" not in ex["params_m"]
    _, (_, new) = jax.jit(task.loss)(moved, ex, b, jax.random.PRNGKey(0), jnp.int32(3))
    assert int(new["queue_ptr"]) == 4
    np.testing.assert_array_equal(new["idx_queue"][:4], b["video_index"])
    assert float(jnp.abs(new["image_queue"][:4] - extra["image_queue"][:4]).max()) > 1e-3


def test_evaluator_uses_the_video_path_and_sharding_matches_one_device(built, tmp_path, mesh8):
    """video_retrieval on an mPLUG-2 task embeds each clip with the task's `video_embed` on
    the release's nearest-resize frames; the 8-device evaluation equals the 1-device one."""
    from mplug_jax.evaluators import common as evaluators
    from mplug_jax.evaluators import video_retrieval
    c, task, params, _ = built
    c = c.copy_and_resolve_references()
    c.evals.val.update(synthetic_size=8, synthetic_dir=str(tmp_path / "ev"), batch_size=8,
                       sim_chunk=8, itm_batch_size=8, k_test=4, workers=1)
    ev = evaluators.build("val", c.evals.val, c, task.predict_fns())
    res = ev.run(params)
    assert res["num_videos"] == 8 and res["k_test_t2v"] == 4
    assert res["vid_r10"] == 100.0 and 0 <= res["vid_r1"] <= 100
    first = next(iter(ev.input))
    want = video.eval_clip(video.load_frames(ev.source[0]["video"], 4), 32)
    np.testing.assert_array_equal(first["frames"][0], want)
    feats = ev.embed(params)[0]
    np.testing.assert_allclose(feats[:2], task.predict_fns()["video_embed"](
        params, jnp.asarray(first["frames"][:2]))[0], atol=1e-5)
    ev8 = video_retrieval.Evaluator(task.predict_fns(), c.evals.val, c, mesh=mesh8)
    res8 = ev8.run(params)
    for key in ("vid_r1", "vid_r5", "txt_r1", "txt_r5", "vid_mdR"):
        assert res8[key] == res[key], key
    np.testing.assert_allclose(ev8.scores(params)["t2i"], ev.scores(params)["t2i"], atol=1e-4)
    with pytest.raises(ValueError, match="video_embed' or 'image_embed"):
        video_retrieval.Evaluator({k: v for k, v in task.predict_fns().items()
                                   if k not in ("video_embed", "image_embed")}, c.evals.val, c)


def test_bad_configs_and_init(tmp_path):
    c = _config(tmp_path, queue_size=6)
    with pytest.raises(ValueError, match="queue_size=6 must be a multiple"):
        tasks.build(c)
    assert_rejected(lambda: _config(tmp_path), tasks.build, (
        ("task.loss_weights", dict(itc=0.0, itm=0.0), "not both 0"),
        ("task.itc.temp_min", 0.0, "temp_min"),
        ("model.embed_dim", 0, "embed_dim"),
        ("model.bogus", 1, "unknown mPLUG-2 config keys"),
        ("input.batch_size", 1, "at least 2 clips")))
    c = _config(tmp_path)
    c.init.allow_scratch = False
    with pytest.raises(ValueError, match="allow_scratch"):
        tasks.build(c).init_from_pretrained(None)
    c.init.checkpoint = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither"):
        tasks.build(c).init_from_pretrained(None)
    for variant in ("base", "large"):
        big = cfg_lib.get_config(variant)
        assert big.model.num_frames == 12 and big.input.batch_size == 192
        assert big.task.itc.queue_size % big.input.batch_size == 0
        with pytest.raises(ValueError, match="refuses the built-in synthetic"):
            tasks.get_class("mplug2.retrieval").train_input(big)
