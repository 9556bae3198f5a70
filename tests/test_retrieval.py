"""Retrieval task: ITC/queue update vs the official forward (parity reference), hard negatives,
ITM re-ranking vs brute force (8 devices), sharded similarity top-k, recalls by hand, the
official json readers, result-file round trip through the CLI, configs (learning run:
tests/learning/test_learn_retrieval.py)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import retrieval as retrieval_config
from mplug_jax import cli, losses, tasks
from mplug_jax.data.inputs import retrieval as retrieval_input
from mplug_jax.data.synthetic import retrieval as synthetic_retrieval
from mplug_jax.evaluators import retrieval as ev
from mplug_jax.parity import retrieval as retrieval_parity
from mplug_jax.scoring import retrieval as R
from mplug_jax.sharding import make_mesh
from helpers import SMALL_MODEL, built_task


def small_config(**task):
    c = retrieval_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL_MODEL, vocab_size=2048)  # token ids of the unit tests < 2048
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.input.batch_size = 4
    c.task.itc.update(queue_size=8, alpha_warmup_epochs=0.0, momentum=0.995, **task)
    return c


@pytest.fixture(scope="module")
def small_task():
    return built_task(small_config())


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth") / "set"
    return synthetic_retrieval.write_files(str(d), train_images=8, eval_images=6,
                                           captions_per_image=2, image_size=32)


def test_itc_and_queue_match_official_forward(small_task):
    """Task.loss's ITC (image-id positives in batch and queue, distillation) and its queue
    update == the official forward (parity.retrieval reference, checked against the fixture)."""
    task, params = small_task
    r = np.random.default_rng(0)
    b, q, e = 4, 8, SMALL_MODEL["embed_dim"]
    ids = r.integers(1000, 2000, (b, 30)).astype(np.int32)
    ids[:, 0] = 101
    mask = (np.arange(30)[None] < np.array([[5], [9], [30], [7]])).astype(np.int32)
    image = r.normal(size=(b, 32, 32, 3)).astype(np.float32)
    idx = np.array([0, 0, 1, 2], np.int32)  # rows 0 and 1: two captions of one image
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    queues = dict(image_queue=unit(r.normal(size=(q, e))), text_queue=unit(r.normal(size=(q, e))),
                  idx_queue=np.array([2, -100, 0, 7, -100, 3, 1, 5], np.int32),
                  queue_ptr=np.int32(4))
    params_m = {k: v for k, v in params.items() if task.momentum_filter()(k)}
    # Momentum copy differs from the online params (as after some training).
    params_m = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), params_m)
    extra = task.begin_step(params, {"params_m": params_m, **{k: jnp.asarray(v) for k, v
                                                              in queues.items()}})
    batch = {"image": image, "text_ids": ids, "text_mask": mask, "image_index": idx,
             "idx": np.arange(b, dtype=np.int32)}
    _, (m, new) = jax.jit(task.loss)(params, extra, batch, jax.random.PRNGKey(1),
                                     jnp.asarray(10))
    ref = retrieval_parity.retrieval_train_forward(
        task.model, params, {**params, **params_m}, queues, image.transpose(0, 3, 1, 2), ids,
        mask, idx, 0.4, np.zeros(b, np.int64), np.zeros(b, np.int64))
    np.testing.assert_allclose(float(m["loss_itc"]), float(ref["loss_ita"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["image_queue"]).T, ref["image_queue_after"],
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["idx_queue"]), ref["idx_queue_after"][0])
    assert int(new["queue_ptr"]) == int(ref["queue_ptr_after"][0]) == 0
    assert float(m["alpha"]) == pytest.approx(0.4) and np.isfinite(float(m["loss_itm"]))


def test_hard_negatives_never_same_image():
    """The task's exclusion mask (same image or identical caption) keeps every drawn
    negative off the row's own image, even when it has the highest similarity."""
    idx = jnp.array([0, 0, 1, 1, 2, 3])
    ids = jnp.arange(6)[:, None] * jnp.ones((1, 4), jnp.int32)
    same = (idx[:, None] == idx[None, :]) | jnp.all(ids[:, None] == ids[None, :], -1)
    sim = jnp.where(same, 50.0, 0.0)  # the same-image pairs would dominate the softmax
    for s in range(20):
        neg_t, neg_i = losses.sample_hard_negatives(jax.random.PRNGKey(s), sim, sim, same)
        assert not np.any(np.asarray(idx)[np.asarray(neg_t)] == np.asarray(idx))
        assert not np.any(np.asarray(idx)[np.asarray(neg_i)] == np.asarray(idx))


def test_sharded_topk_equals_one_device_and_full_matrix(mesh8):
    r = np.random.default_rng(1)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    qf, items = unit(r.normal(size=(37, 16))), unit(r.normal(size=(23, 16)))
    one = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    v8, i8 = ev.topk_candidates_sharded(qf, items, 5, 16, mesh8)
    v1, i1 = ev.topk_candidates_sharded(qf, items, 5, 8, one)
    vf, idf = R.topk_candidates(qf @ items.T, 5)
    np.testing.assert_array_equal(i8, i1)
    np.testing.assert_array_equal(i8, idf)
    np.testing.assert_allclose(v8, vf, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the 8 batch shards"):
        ev.topk_candidates_sharded(qf, items, 5, 12, mesh8)


def test_rerank_equals_bruteforce_and_result_file_round_trip(synth_dir, mesh8, tmp_path):
    """k_test = all items: the evaluator's score matrices (8 devices, padded ITM batches) ==
    the ITM logit of every (image, text) pair; the pretraining task provides the predict fns
    (zero-shot). The result file re-scores to the same recalls through `mplug-jax score`."""
    from test_trainer import loop_config
    cfg = loop_config()
    task = tasks.build(cfg)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(3)))
    rcfg = small_config()
    rcfg.input.update(dataset="json", eval_annotations=[synth_dir["val"]],
                      image_root=synth_dir["image_root"])
    ecfg = dict(rcfg.evals.val)
    ecfg.update(k_test=1000, batch_size=8, sim_chunk=8, itm_batch_size=16)
    import ml_collections
    e = ev.Evaluator(task.predict_fns(), ml_collections.ConfigDict(ecfg), rcfg, mesh=mesh8)
    got = e.scores(params)
    sp = e.split
    fns = {k: jax.jit(f) for k, f in task.predict_fns().items()}
    img = retrieval_input.load_images(sp.images, 32)
    _, img_s = fns["image_embed"](params, img)
    _, txt_s = fns["text_embed"](params, e.ids, e.mask)
    ni, nt = len(sp.images), len(sp.texts)
    assert (ni, nt) == (6, 12) and got["k_test"] == {"i2t": 12, "t2i": 6}
    ii, tt = np.meshgrid(np.arange(ni), np.arange(nt), indexing="ij")
    full = np.asarray(fns["itm_score"](params, img_s[ii.ravel()], txt_s[tt.ravel()],
                                       e.mask[tt.ravel()])).reshape(ni, nt)
    np.testing.assert_allclose(got["i2t"], full, atol=2e-5)
    np.testing.assert_allclose(got["t2i"], full.T, atol=2e-5)

    res = e.finish(got)
    content = res.pop("files")[ev.RESULT_FILE]
    path = tmp_path / ev.RESULT_FILE
    path.write_text(json.dumps(content))
    out = tmp_path / "scored.json"
    assert cli.main(["score", "--task", "retrieval", "--results", str(path), "--annotations",
                     synth_dir["val"], "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    for k in R.METRIC_NAMES:
        assert scored[k] == pytest.approx(res[k]), k
    assert scored["missing_queries"] == 0 and scored["num_texts"] == 12


def test_recalls_with_several_captions_by_hand(tmp_path):
    """3 images x 2 captions; i2t counts an image's best-ranked caption."""
    s_i2t = np.array([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],    # image 0: caption 1 first -> rank 0
                      [0.9, 0.1, 0.2, 0.8, 0.3, 0.4],    # image 1: captions 2,3 at ranks 4, 1
                      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])   # image 2: captions 4,5 at 4 and 5
    s_t2i = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.2], [0.3, 0.2, 0.1], [0.1, 0.5, 0.2],
                      [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txt = [[0, 1], [2, 3], [4, 5]]
    i2t, t2i = R.retrieval_ranks(s_i2t, s_t2i, txt2img, img2txt)
    assert i2t.tolist() == [0, 1, 4] and t2i.tolist() == [0, 2, 1, 0, 0, 2]
    m = R.itm_eval(s_i2t, s_t2i, txt2img, img2txt)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100.0
    assert m["img_r1"] == pytest.approx(50.0) and m["img_r5"] == 100.0
    # The same through a result file (top-10 lists cover everything here).
    keys = ["a.jpg", "b.jpg", "c.jpg"]
    tkeys = [R.text_key(k, j) for k in keys for j in range(2)]
    content = R.result_file(s_i2t, s_t2i, keys, tkeys, ["x"] * 6, {"i2t": 6, "t2i": 3})
    (tmp_path / "r.json").write_text(json.dumps(content))
    (tmp_path / "a.json").write_text(json.dumps([{"image": k, "caption": ["x", "y"]}
                                                 for k in keys]))
    scored = R.score_file(str(tmp_path / "r.json"), str(tmp_path / "a.json"))
    assert {k: scored[k] for k in R.METRIC_NAMES} == pytest.approx(m)


def test_official_json_readers_skip_and_count_missing_images(tmp_path):
    img = np.full((8, 8, 3), 128, np.uint8)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(img).save(tmp_path / name)
    train = [{"image": "a.jpg", "caption": "A dog, running!", "image_id": "17"},
             {"image": "gone.jpg", "caption": "lost", "image_id": "5"},
             {"image": "a.jpg", "caption": "a dog", "image_id": "17"},
             {"image": "b.jpg", "caption": "a cat", "image_id": 3}]
    evals = [{"image": "b.jpg", "caption": ["c1", "c2"]},
             {"image": "gone.jpg", "caption": ["lost 1", "lost 2"]},
             {"image": "c.jpg", "caption": ["c3", "", "c4."]}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(evals))
    cfg = small_config()
    cfg.input.update(dataset="json", train_annotations=[str(tmp_path / "train.json")],
                     image_root=str(tmp_path), max_skip_rate=0.5)
    src = retrieval_input.train_source(cfg.input, 32, 0)
    assert [(os.path.basename(r["image"]), r["caption"], r["image_index"]) for r in src] == [
        ("a.jpg", "a dog running", 0), ("a.jpg", "a dog", 0), ("b.jpg", "a cat", 2)]
    assert src.skipped["missing_file"] == 1
    sp = retrieval_input.read_eval([str(tmp_path / "test.json")], str(tmp_path), 0.5)
    assert sp.keys == ["b.jpg", "c.jpg"] and sp.texts == ["c1", "c2", "c3", "c4"]
    assert sp.txt2img.tolist() == [0, 0, 1, 1] and sp.img2txt == [[0, 1], [2, 3]]
    assert sp.skipped["missing_file"] == 1
    with pytest.raises(retrieval_input.DataError, match="missing_file=1"):
        retrieval_input.read_eval([str(tmp_path / "test.json")], str(tmp_path), 0.1)
    # Train batches carry the image index of each record.
    cfg.input.batch_size = 3
    it, n = retrieval_input.train_batches(cfg, 0, 1)
    b = next(it)
    assert n == 3 and b["text_ids"].shape == (3, 30) and b["image"].shape == (3, 32, 32, 3)
    assert sorted(b["image_index"].tolist()) == [0, 0, 2]


def test_config_official_values():
    c = retrieval_config.get_config("coco_large")
    assert (c.model.image_size, c.model.vision_width, c.model.fusion_stride) == (336, 1024, 6)
    assert (c.input.batch_size, c.total_epochs, c.optim.lr, c.optim.wd) == (1024, 8.0, 1e-5, 0.02)
    assert c.optim.lr * c.optim.lr_groups.vision.mult == pytest.approx(2e-6)
    assert (c.optim.warmup_steps, c.optim.end_lr, c.evals.val.k_test) == (100, 1e-6, 256)
    assert (c.task.itc.queue_size, c.task.itc.momentum, c.task.itc.distill_alpha) == \
        (65536, 0.995, 0.4)
    assert c.input.max_tokens == 30 and c.input.augment.crop_scale == (0.5, 1.0)
    # Both release yamls re-rank 256; the paper (section 5.2.3) 128 for Flickr30K.
    assert retrieval_config.get_config("flickr_large").evals.val.k_test == 256
    assert retrieval_config.get_config("flickr_large_paper").evals.val.k_test == 128
    assert retrieval_config.get_config("coco_base").model.vision_width == 768
    z = retrieval_config.get_config("flickr_base,mode=zeroshot")
    assert (z.total_steps, z.total_epochs) == (0, 0.0)
    with pytest.raises(ValueError, match="mode=zeroshot evaluates"):
        tasks.get_class("retrieval").train_input(z)
    with pytest.raises(ValueError, match="allow_synthetic"):
        tasks.get_class("retrieval").train_input(retrieval_config.get_config("coco_base"))
    with pytest.raises(ValueError, match="unknown mode"):
        retrieval_config.get_config("tiny,mode=fast")
    bad = small_config()
    bad.task.itc.queue_size = 6
    with pytest.raises(ValueError, match="multiple of the batch"):
        tasks.build(bad)


def test_zeroshot_evaluate_cli_on_pretraining_workdir(pretrain_workdir, tmp_path):
    """`mode=zeroshot` (no train steps) through `mplug-jax evaluate` on a pretraining workdir:
    metrics and a result file that re-scores to the same recalls."""
    out = tmp_path / "eval"
    args = ["evaluate", "--config", "configs/retrieval.py:tiny,mode=zeroshot", "--checkpoint",
            str(pretrain_workdir), "--out", str(out)]
    args += [f"--config.model.{k}={v}" for k, v in SMALL_MODEL.items()]
    args += ["--config.input.eval_size=8", "--config.input.train_size=8",
             f"--config.input.synthetic_dir={tmp_path / 'data'}",
             "--config.evals.val.batch_size=8", "--config.evals.val.sim_chunk=8",
             "--config.evals.val.itm_batch_size=32"]
    assert cli.main(args) == 0
    got = json.loads((out / "metrics.json").read_text())["val"]
    assert got["num_images"] == 8 and got["num_texts"] == 16
    scored = R.score_file(str(out / "val" / ev.RESULT_FILE),
                          str(tmp_path / "data" / "retrieval_val.json"))
    assert {k: scored[k] for k in R.METRIC_NAMES} == pytest.approx(
        {k: got[k] for k in R.METRIC_NAMES})
