"""Grounding task: box arithmetic and the loss by hand, the flip rule, official split files
(json and .pth) -> batches, the coordinate-restricted decode, result-file re-scoring, the
predict CLI's PNG, and a fine-tuning run from the pretraining workdir."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import grounding as grounding_config
from mplug_jax import cli, generate, tasks
from mplug_jax.data.inputs import grounding as GI
from mplug_jax.data.formats import grounding as grounding_format
from mplug_jax.data.synthetic import grounding as synthetic_grounding
from mplug_jax.evaluators import grounding as grounding_eval
from mplug_jax.scoring import grounding as G
from mplug_jax.tasks.grounding import coordinate_loss, paired_giou
from helpers import SMALL_MODEL


def eval_config(inp, image_size: int) -> ml_collections.ConfigDict:
    """The run config `grounding_input.eval_batches` reads: `inp` at `image_size`."""
    return ml_collections.ConfigDict({"input": inp, "model": {"image_size": image_size}})


def small_config(tmp_path, vocab_size: int = 1024):
    c = grounding_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL_MODEL, vocab_size=vocab_size)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.input.synthetic_dir = str(tmp_path / "shapes")
    return c


def test_iou_quantisation_and_loss_by_hand():
    # Quantisation: floor(c * 336) + 345; the bin's lower edge comes back.
    tok = G.coords_to_tokens(np.array([0.0, 0.5, 1.0, 1.3, 0.2]))
    assert tok.tolist() == [345, 513, 681, 681, 345 + 67]
    assert G.tokens_to_coords(tok).tolist() == pytest.approx([0, 0.5, 1, 1, 67 / 336])
    # IoU: [0.25, 0.75]^2 vs [0.375, 0.875] x [0.25, 0.75]: 0.1875 / 0.3125.
    iou = G.bbox_iou(np.array([[0.5, 0.5, 0.5, 0.5]]), np.array([[0.625, 0.5, 0.5, 0.5]]))
    assert float(iou[0]) == pytest.approx(0.6)
    # The jnp GIoU of the loss = the diagonal of the official numpy one.
    a = np.array([[0.1, 0.1, 0.4, 0.5], [0.2, 0.3, 0.9, 0.6]], np.float32)
    b = np.array([[0.3, 0.2, 0.6, 0.7], [0.0, 0.0, 0.1, 0.1]], np.float32)
    np.testing.assert_allclose(paired_giou(a, b), np.diag(G.generalized_box_iou(a, b)),
                               rtol=1e-6)
    # Loss on 3 bins (res 2): nll, argmax weights, official broadcast vs per sample.
    lg = np.log(np.array([[[.7, .2, .1], [.1, .8, .1], [.2, .2, .6], [.5, .25, .25]],
                          [[.1, .1, .8], [.3, .4, .3], [.6, .3, .1], [.1, .6, .3]]], np.float32))
    gt = np.array([[0.2, 0.6, 0.9, 0.4], [0.8, 0.5, 0.3, 0.7]], np.float32)
    t = np.floor(gt * 2).astype(int)
    nll = -np.take_along_axis(lg, t[..., None], -1)[..., 0]
    pred = lg.argmax(-1) / 2
    wb = np.abs(pred - gt)
    wg = 1 - np.diag(G.generalized_box_iou(G.cxcywh_to_xyxy(pred), G.cxcywh_to_xyxy(gt)))
    terms = nll[:, None, :] * wb[None] * wg[None, :, None]
    loss, aux = coordinate_loss(jnp.asarray(lg), jnp.asarray(gt))
    assert float(loss) == pytest.approx(terms.mean(), rel=1e-5)
    np.testing.assert_allclose(aux["nll"], nll, rtol=1e-5)
    loss_ps, _ = coordinate_loss(jnp.asarray(lg), jnp.asarray(gt), weighting="per_sample")
    assert float(loss_ps) == pytest.approx((nll * wb * wg[:, None]).mean(), rel=1e-5)
    loss_ce, _ = coordinate_loss(jnp.asarray(lg), jnp.asarray(gt), weighting="none")
    assert float(loss_ce) == pytest.approx(nll.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        coordinate_loss(jnp.asarray(lg), jnp.asarray(gt), weighting="mean")


def test_flip_swaps_left_right_and_mirrors_box():
    assert GI.swap_left_right("the left man right of the car") == \
        "the right man left of the car"
    img = np.zeros((20, 40, 3), np.uint8)
    img[5:10, 2:8] = 255
    flipped, box, phrase = GI.flip(Image.fromarray(img), np.array([2, 5, 8, 10], np.float32),
                                   "leftmost dog")
    assert phrase == "rightmost dog" and box.tolist() == [32, 5, 38, 10]
    arr = np.asarray(flipped)
    assert arr[5:10, 32:38].min() == 255 and arr.sum() == img.sum()
    # Through the train transform (flip only, no resize: long side = R = 40): the flipped
    # draws mirror the normalised box and swap the words; the others leave them.
    aug = dict(scale=False, crop=False, color_jitter=0.0, hflip=True, translate=False)
    seen = set()
    for seed in range(8):
        x, gt, ph = GI.train_transform(Image.fromarray(img), np.array([2, 5, 8, 10]), "left",
                                       40, np.random.default_rng(seed), aug)
        # Centred padding: 10 rows above; the box is the white block.
        cx = 35 if ph == "right" else 5
        np.testing.assert_allclose(gt, np.array([cx, 17.5, 6, 5]) / 40, atol=1e-6)
        assert x[17, cx].mean() > x[17, 40 - cx].mean()
        seen.add(ph)
    assert seen == {"left", "right"}
    # The crop branch is never taken for a phrase naming a position: with a crop that would
    # always change the box, only the non-spatial phrase sees different boxes.
    aug = dict(scale=False, crop=True, crop_short_sides=(40,), crop_range=(20, 30),
               color_jitter=0.0, hflip=False, translate=False)
    boxes = {p: {tuple(GI.train_transform(Image.fromarray(img), np.array([2, 5, 8, 10]), p, 40,
                                          np.random.default_rng(s), aug)[1].round(4))
                 for s in range(10)} for p in ("the top dog", "the dog")}
    assert len(boxes["the top dog"]) == 1 and len(boxes["the dog"]) > 1


def test_split_tuples_to_batches(tmp_path):
    """Synthetic writer -> official json tuples (and the same as a torch .pth) -> records ->
    eval batches: ids [CLS] .. [SEP], box in the padded frame; an empty phrase is skipped and
    counted; the eval transform with ImageNet stats is the parity code's official one."""
    root = str(tmp_path)
    path = synthetic_grounding.write_split(root, "heldout", 6, image_size=32)
    rows = json.load(open(path))
    rows.append(["heldout_000000.png", 6, [1, 1, 5, 5], "  ", []])  # empty expression
    with open(path, "w") as f:
        json.dump(rows, f)
    src = grounding_format.read(path, os.path.join(root, "images"), max_skip_rate=0.5)
    assert len(src) == 6 and src.skipped["bad_record"] == 1
    assert [r["id"] for r in src] == list(range(6))
    torch = pytest.importorskip("torch")
    torch.save([tuple(r) for r in rows], str(tmp_path / "split.pth"))
    src_pth = grounding_format.read(str(tmp_path / "split.pth"), os.path.join(root, "images"),
                                    max_skip_rate=0.5)
    assert src_pth.records == src.records
    inp = grounding_config.get_config("tiny").input
    batches = list(GI.eval_batches(eval_config(inp, 48), src, 4))
    assert [len(b["idx"]) for b in batches] == [4, 2]
    b = batches[0]
    assert b["image"].shape == (4, 48, 48, 3) and b["text_ids"].shape == (4, 20)
    r = src[0]
    w, h = Image.open(r["image"]).size
    ratio = 48 / max(w, h)
    x, y, bw, bh = r["bbox"]
    left, top = int(b["left"][0]), int(b["top"][0])
    want = np.array([x * ratio + left + bw * ratio / 2, y * ratio + top + bh * ratio / 2,
                     bw * ratio, bh * ratio]) / 48
    np.testing.assert_allclose(b["gt_box"][0], want, atol=1e-5)
    n = int(b["text_mask"][0].sum())
    assert b["text_ids"][0, 0] == 101 and b["text_ids"][0, n - 1] == 102
    from mplug_jax.parity.grounding import grounding_eval_image
    ours, ratio2, l2, t2 = GI.eval_transform(Image.open(r["image"]), 48, imagenet=True)
    theirs, _, ratio3, l3, t3 = grounding_eval_image(r["image"], 48)
    np.testing.assert_allclose(ours, theirs.transpose(1, 2, 0), atol=1e-6)
    assert (ratio2, l2, t2) == (ratio3, l3, t3)
    with pytest.raises(ValueError, match="empty"):
        GI.encode_phrases(["the dog", ""], 20)


def test_synthetic_layout_options(tmp_path):
    """`input.synthetic` layouts: the tiny one (2x2 grid, square canvas) puts every box inside
    the cell of its shape; the default one keeps the wide / tall canvases; bad options are
    refused; a changed layout rewrites the split."""
    tiny = dict(grounding_config.get_config("tiny").input.synthetic)
    for i in range(40):
        img, (x, y, w, h), phrase, scene, obj = synthetic_grounding.sample_with_scene(
            "train", i, 32, 0, tiny)
        assert img.shape == (32, 32, 3) and phrase and w == h
        row, col = scene.shapes[obj].cell
        assert 0.75 * 16 - 0.02 <= w <= 0.9 * 16 + 0.02
        assert col * 16 <= x and x + w <= (col + 1) * 16 and row * 16 <= y and \
            y + h <= (row + 1) * 16
    solid = dict(tiny, styles="solid")
    for i in range(10):  # one style only: the same scenes otherwise (same random draws)
        scene, plain = (synthetic_grounding.sample_with_scene("train", i, 32, 0, o)[3]
                        for o in (tiny, solid))
        assert plain.style == "solid" and plain.shapes == scene.shapes
    shapes = {synthetic_grounding.sample("train", i, 32)[0].shape for i in range(20)}
    assert any(s != (32, 32, 3) for s in shapes)  # default: widened or heightened canvases
    for bad, match in ((dict(grid=0), "grid"), (dict(grid=1, max_objects=2), "max_objects"),
                       (dict(fill=(0.9, 0.8)), "fill"), (dict(fill=(0.9, 0.9), jitter=0.1),
                                                        "jitter"),
                       (dict(max_extra=-1), "max_extra"), (dict(cells=2), "unknown"),
                       (dict(styles="solid,plaid"), "styles"), (dict(styles=" , "), "styles")):
        with pytest.raises(ValueError, match=match):
            synthetic_grounding.layout(bad)
    root = str(tmp_path)
    path = synthetic_grounding.write_split(root, "heldout", 3, image_size=32, options=tiny)
    square = json.load(open(path))
    synthetic_grounding.write_split(root, "heldout", 3, image_size=32)
    assert json.load(open(path)) != square


def test_decode_uses_only_coordinate_tokens(tmp_path):
    """With the LM bias pushing a non-coordinate token far ahead, the restricted greedy still
    returns coordinate ids (the argmax over the coordinate columns), with and without cache."""
    task = tasks.build(small_config(tmp_path))
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    params["decoder"]["lm_bias"] = params["decoder"]["lm_bias"].at[7].set(100.0)
    b = task.dummy_batch(3)
    b["image"] = np.random.default_rng(0).normal(size=b["image"].shape).astype(np.float32)
    states, smask = jax.jit(task.states)(params, b["image"], b["text_ids"], b["text_mask"])
    kw = dict(first_id=G.FIRST_COORD_ID, num_bins=G.NUM_BINS, prefix_id=G.PREFIX_ID)

    @functools.partial(jax.jit, static_argnames=("use_cache", "return_scores"))
    def greedy(params, states, smask, use_cache=True, return_scores=False):
        return generate.coordinate_greedy(task.model, params, states, smask,
                                          use_cache=use_cache, return_scores=return_scores,
                                          **kw)

    tok, raw = greedy(params, states, smask, return_scores=True)
    tok = np.asarray(tok)
    assert tok.shape == (3, 4) and tok.min() >= G.FIRST_COORD_ID and \
        tok.max() <= G.LAST_COORD_ID
    assert (np.asarray(raw).argmax(-1) == 7).all()  # unrestricted would pick token 7
    np.testing.assert_array_equal(
        tok, np.asarray(raw)[..., G.FIRST_COORD_ID:G.LAST_COORD_ID + 1].argmax(-1)
        + G.FIRST_COORD_ID)
    np.testing.assert_array_equal(tok, np.asarray(greedy(params, states, smask,
                                                         use_cache=False)))


def test_evaluator_result_file_rescores(tmp_path, capsys):
    """Evaluator (batched, a short last batch) -> grounding_result.json -> score_file and
    `mplug-jax score` give its pixel-frame numbers; ids out of the split are refused."""
    c = small_config(tmp_path)
    task = tasks.build(c)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(1)))
    c.evals.val.update(num_examples=10, batch_size=4)
    ev = grounding_eval.Evaluator(task.predict_fns(), c.evals.val, c, None)
    res = ev.run(params)
    assert res["num"] == 10 and 0 <= res["accu"] <= 1 and res["num_clipped"] >= 0
    rows = res["files"]["grounding_result.json"]
    assert [r["id"] for r in rows] == list(range(10))
    out = tmp_path / "r.json"
    out.write_text(json.dumps(rows))
    split = synthetic_grounding.split_file(c.input.synthetic_dir, "heldout")
    got = G.score_file(str(out), split)
    assert got["accu"] == pytest.approx(res["pixel_accu"])
    assert got["miou"] == pytest.approx(res["pixel_miou"], rel=1e-9)
    assert got["num"] == 10 and got["num_missing"] == 0
    assert cli.main(["score", "--task", "grounding", "--results", str(out),
                     "--annotations", split]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(got["miou"])
    out.write_text(json.dumps(rows + [dict(rows[0], id=99)]))
    with pytest.raises(ValueError, match="not a position"):
        G.score_file(str(out), split)
    # Boxes leaving the image are clipped to it and counted.
    px, clipped = grounding_eval.to_pixels(np.array([[0.5, 0.5, 1.0, 0.2], [0.5, 0.5, .2, .2]]),
                                           10, np.array([1.0, 1.0]), np.array([0, 0]),
                                           np.array([2, 2]), np.array([6, 6]),
                                           np.array([10, 10]))
    np.testing.assert_allclose(px, [[0, 2, 6, 4], [4, 2, 6, 4]], atol=1e-9)
    assert clipped.tolist() == [True, False]


def test_configs():
    for v in ("refcoco_base", "refcocop_large", "refcocog_large", "vg_uni_base"):
        c = grounding_config.get_config(v)
        assert c.input.max_query_len == 20 and c.model.image_size == 336
    assert set(grounding_config.get_config("refcoco_large").evals) == {"val", "testA", "testB"}
    assert set(grounding_config.get_config("refcocog_base").evals) == {"val", "test"}
    assert grounding_config.get_config("refcocop_base").input.dataset == "unc+"
    with pytest.raises(ValueError, match="unknown variant"):
        grounding_config.get_config("refclef_base")
