"""NLVR2 task: the two-image fusion against the single-image one, pretrained init of both
branches, the official reader, the training-only swap, eval batches, accuracy and score_file,
configs (learning run: tests/learning/test_learn_nlvr2.py)."""
import functools
import json
import os

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import nlvr2 as nlvr2_config
from mplug_jax import tasks, trainer
from mplug_jax.data import pipeline
from mplug_jax.data.formats import nlvr2 as nlvr2_format
from mplug_jax.data.inputs import nlvr2 as nlvr2_input
from mplug_jax.data.synthetic import nlvr2 as synthetic_nlvr2
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import DataError
from mplug_jax.models.mplug import MPLUG
from mplug_jax.models.nlvr2 import NLVR2Model
from mplug_jax.scoring import classify as classify_scoring
from mplug_jax.scoring import nlvr2 as S
from mplug_jax.tasks.nlvr2 import twin_cross_attention
from helpers import SMALL_MODEL  # the model of `test_trainer.loop_config` (pretrain_workdir)


def small_config(**model):
    c = nlvr2_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL_MODEL, **model)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    return c


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


@pytest.mark.parametrize("layout", ["skip", "coattn", "connected"])
def test_two_image_fusion_reduces_to_single_image_fusion(layout):
    """Branches holding the same (pretrained) cross-attention and two identical images give
    exactly the single-image fused text, for every layer kind ('a' + 'c', 's', 'm'); with
    different images the pair is symmetric (swapping them leaves the text unchanged) but
    differs from either single image."""
    cfg = dict(SMALL_MODEL, vocab_size=64, fusion_layers=3, fusion_layout=layout)
    single, pair = MPLUG.from_config(cfg), NLVR2Model.from_config(cfg)
    r = np.random.default_rng(0)
    img, img2 = r.normal(size=(2, 2, 32, 32, 3)).astype(np.float32)
    ids = r.integers(5, 64, (2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    p1 = _flat(single.init(jax.random.PRNGKey(0), img, ids, mask, ids, mask)["params"])
    p2 = _flat(pair.init(jax.random.PRNGKey(1), np.stack([img, img], 1), ids, mask)["params"])
    shared = twin_cross_attention({k: v for k, v in p1.items() if k in p2})
    assert set(p2) - set(shared) == {k for k in p2 if k.startswith("cls_head/")}
    params = flax.traverse_util.unflatten_dict({**p2, **shared}, sep="/")
    want = single.apply({"params": flax.traverse_util.unflatten_dict(p1, sep="/")}, img, ids,
                        mask, ids, mask)["fusion_text"]

    def fused(model, images):
        b = images.shape[0]
        imgs = model.encode_image(images.reshape((2 * b,) + images.shape[2:]))
        return model.fuse_pair(imgs.reshape((b, 2) + imgs.shape[1:]),
                               model.encode_text(ids, mask), mask)

    def run(a, b):
        return np.asarray(pair.apply({"params": params}, np.stack([a, b], 1), method=fused))

    np.testing.assert_allclose(run(img, img), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(run(img, img2), run(img2, img), atol=1e-5)
    assert np.abs(run(img, img2) - np.asarray(want)).max() > 1e-3


def test_init_loads_pretrained_cross_attention_into_both_branches(pretrain_workdir):
    """From a pretraining workdir: encoders and fusion equal the checkpoint, both branches
    equal its cross-attention, the classifier is new, the decoder / heads are not in the tree;
    `mplug-jax evaluate` loads the same; random initialisation is refused unless allowed."""
    from mplug_jax import workdir
    c = small_config()
    c.init.checkpoint = str(pretrain_workdir)
    s = trainer.setup(c, 1)
    state = s.task.init_from_pretrained(trainer.init_state(s, 0))
    got = _flat(state.params)
    _, src, _ = workdir.restore_params(pretrain_workdir)
    src = _flat(src)
    assert not any(k.startswith(("decoder/", "itm_head/", "mlm_", "temp")) for k in got)
    for k, v in got.items():
        if k.startswith("cls_head/"):
            continue
        np.testing.assert_array_equal(np.asarray(v), np.asarray(src[k.replace("cross_attn_1",
                                                                               "cross_attn")]))
    assert any("text/cross_attn_1/" in k for k in got)
    # `mplug-jax evaluate` of the pretraining workdir with this config loads it the same way.
    from mplug_jax import evaluate
    _, params = evaluate.load_params(c, str(pretrain_workdir))
    for k, v in _flat(params).items():
        if not k.startswith("cls_head/"):
            np.testing.assert_array_equal(np.asarray(v), np.asarray(got[k]), err_msg=k)

    c.init.checkpoint = ""
    s = trainer.setup(c, 1)
    with pytest.raises(ValueError, match="allow_scratch"):
        s.task.init_from_pretrained(trainer.init_state(s, 0))


def _write_official(tmp_path, records):
    """Image files for every path of `records` (train paths flattened as the reader does)."""
    for r in records:
        for k, p in enumerate(r.get("images", [])):
            path = tmp_path / (f"train/{os.path.basename(p)}" if "train" in r["images"][0]
                               else p)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((20, 20, 3), 40 + 100 * k, np.uint8)).save(path)
    ann = tmp_path / "nlvr.json"
    ann.write_text(json.dumps(records))
    return ann


def test_reader_on_official_records(tmp_path):
    """Official records: label "True" -> 1, anything else 0; train sub-folders flattened; a
    record with one image is skipped and counted (an error above max_skip_rate)."""
    records = [
        {"images": ["train/14/train-10171-0-img0.png", "train/14/train-10171-0-img1.png"],
         "sentence": "The LEFT image has two dogs.", "label": "True"},
        {"images": ["dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png"],
         "sentence": "There are birds.", "label": "False"},
        {"images": ["dev/dev-2-0-img0.png"], "sentence": "One image only.", "label": "True"},
    ]
    ann = _write_official(tmp_path, records[:2])
    ann.write_text(json.dumps(records))
    src = nlvr2_format.read([str(ann)], str(tmp_path), max_skip_rate=0.5)
    assert len(src) == 2 and src.skipped["bad_record"] == 1
    assert src[0]["images"] == [str(tmp_path / "train/train-10171-0-img0.png"),
                                str(tmp_path / "train/train-10171-0-img1.png")]
    assert [r["label"] for r in src] == [1, 0]
    assert src[0]["sentence"] == "the left image has two dogs"
    with pytest.raises(DataError, match="malformed"):
        nlvr2_format.read([str(ann)], str(tmp_path))

    c = small_config()
    c.input.update(dataset="json", val_files=[str(ann)], image_root=str(tmp_path),
                   max_skip_rate=0.5)
    ecfg = c.evals.val
    ecfg.update(batch_size=4, num_examples=0)
    assert [r["label"] for r in nlvr2_input.eval_records(c, ecfg)] == [1, 0]
    recs = nlvr2_input.eval_records(c, ecfg)
    (batch,) = list(nlvr2_input.eval_batches(c, recs, 4))
    assert batch["images"].shape == (4, 2, 32, 32, 3)
    np.testing.assert_array_equal(batch["valid"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["idx"], [0, 1, 1, 1])
    np.testing.assert_array_equal(batch["label"][:2], [1, 0])
    # Two processes: each gets its half of the global batch.
    halves = [next(nlvr2_input.eval_batches(c, recs, 4, p, 2)) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["valid"] for h in halves]), [1, 1, 0, 0])
    # A missing image file is an error in evaluation, a counted skip in training.
    os.remove(tmp_path / "dev/dev-1-0-img1.png")
    with pytest.raises(DataError, match="dev-1-0-img1"):
        list(nlvr2_input.eval_batches(c, recs, 4))
    rec = pipeline.Examples(src, functools.partial(
        nlvr2_input.to_example, image_size=32, max_tokens=8, augment=None, train=True))
    assert rec(0, 1) == pipeline.skip("missing_file")
    assert rec(0, 0)["label"] == 1


def test_swap_only_in_training(tmp_path):
    """Train records swap images and left/right words together with p=0.5 (seeded by epoch and
    index; label kept); eval records never do."""
    assert nlvr2_input.swap_left_right("the left image is right of the bright left") == \
        "the right image is left of the bright right"
    paths = synthetic_nlvr2.write_nlvr2_files(str(tmp_path), "train", 24, image_size=32)
    src = nlvr2_format.read(paths["json"], paths["root"])
    kw = dict(image_size=32, max_tokens=16, augment=None)
    train = functools.partial(nlvr2_input.to_example, train=True, **kw)
    evals = functools.partial(nlvr2_input.to_example, train=False, **kw)
    swapped = 0
    for i in range(len(src)):
        e = evals(src[i], pipeline.RecordRng(0, 0, i))
        want = [transforms.eval_transform(transforms.decode_image(p), 32)
                for p in src[i]["images"]]
        np.testing.assert_array_equal(e["images"], np.stack(want))
        for epoch in (0, 1):
            t = train(src[i], pipeline.RecordRng(0, epoch, i))
            assert t["label"] == e["label"]
            if np.array_equal(t["images"], e["images"][::-1]) and not np.array_equal(
                    e["images"][0], e["images"][1]):
                swapped += 1
                flipped = nlvr2_input.swap_left_right(src[i]["sentence"])
                assert (t["text_ids"] != e["text_ids"]).any() == (flipped != src[i]["sentence"])
            else:
                np.testing.assert_array_equal(t["images"], e["images"])
                np.testing.assert_array_equal(t["text_ids"], e["text_ids"])
    assert 12 <= swapped <= 36, swapped  # 48 draws at p = 0.5


def test_synthetic_statements_are_true_of_their_scenes():
    """Each kind's statements are evaluated against the scenes; labels are balanced."""
    from mplug_jax.data.synthetic.shapes import Scene, Shape
    red = Shape("red", "circle", 0.5, 0.5, 0.1, (1, 1))
    blue = Shape("blue", "square", 0.2, 0.2, 0.1, (0, 0))
    left, right = Scene("white", "solid", (red, red)), Scene("black", "solid", (red, blue))
    truth = {k: dict(synthetic_nlvr2.statements(k, left, right))
             for k in synthetic_nlvr2.KINDS}
    assert truth["more"]["the left image has more circles than the right image"]
    assert not truth["more"]["the left image has fewer circles than the right image"]
    assert truth["more"]["the left image has fewer squares than the right image"]
    assert truth["both"]["both images contain a red circle"]
    assert not truth["both"]["both images contain a blue square"]
    assert truth["side"]["the right image contains a blue square"]
    assert truth["background"]["the right image has a black background"]
    assert not any(truth["same_bg"].values())
    ds = synthetic_nlvr2.SyntheticNLVR2("heldout", 200, image_size=16)
    labels = [ds[i]["label"] for i in range(200)]
    assert 80 <= labels.count("True") <= 120


def test_accuracy_and_score_file(tmp_path):
    """Accuracy and per-class accuracy by hand; score_file re-scores a result file against the
    annotation json (ids = valid records in file order)."""
    records = [{"images": [f"dev/{i}-img0.png", f"dev/{i}-img1.png"], "sentence": f"s {i}",
                "label": lab} for i, lab in enumerate(["True", "False", "True", "True"])]
    records.insert(2, {"images": ["dev/x.png"], "sentence": "bad", "label": "True"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    # Gold (valid records): T F T T; predictions: T T F T -> 2 of 4; True 2/3, False 0/1.
    rows = [{"id": 0, "pred": "True", "label": "True"}, {"id": 1, "pred": "True"},
            {"id": 2, "pred": "False", "label": "True"}, {"id": 3, "pred": "True"}]
    res = tmp_path / "nlvr2_result.json"
    res.write_text(json.dumps(rows))
    out = S.score_file(str(res), str(ann))
    assert out["acc"] == 0.5 and out["n"] == 4
    assert out["acc_True"] == pytest.approx(2 / 3) and out["acc_False"] == 0.0
    assert (out["pred_True"], out["unanswered"], out["unscored"]) == (3, 0, 0)
    from mplug_jax import scoring
    assert scoring.score_file("nlvr2", str(res), str(ann)) == out
    res.write_text(json.dumps([{"id": 1, "pred": "True", "label": "True"}]))
    with pytest.raises(ValueError, match="disagrees"):
        S.score_file(str(res), str(ann))
    assert classify_scoring.accuracy([1, 0], [1, 1], nlvr2_input.LABELS)["acc"] == 0.5


def test_configs():
    """Every variant builds its task; the paper's values; base refuses synthetic data and
    random weights; bad variants / inputs are clear errors."""
    for variant in ("tiny", "base", "large"):
        c = nlvr2_config.get_config(variant)
        assert c.task.name == "nlvr2" and c.evals.val.type == "classify"
        NLVR2Model.from_config(c.model)
    base = nlvr2_config.get_config("base")
    assert (base.optim.lr, base.optim.lr_groups.vision.mult * base.optim.lr) == (5e-5, 5e-6)
    assert (base.input.batch_size, base.total_epochs, base.model.image_size) == (256, 15.0, 336)
    with pytest.raises(ValueError, match="synthetic"):
        tasks.get_class("nlvr2").train_input(base)
    with pytest.raises(ValueError, match="unknown variant"):
        nlvr2_config.get_config("huge")
    c = small_config()
    c.input.dataset = "json"
    with pytest.raises(ValueError, match="train_files"):
        nlvr2_input.source(c, "train")
    with pytest.raises(ValueError, match="unknown NLVR2 split"):
        nlvr2_input.source(c, "dev")
    task = tasks.build(small_config())
    with pytest.raises(ValueError, match=r"float\[B, 2, R, R, 3\]"):
        task.model.init(jax.random.PRNGKey(0), np.zeros((2, 32, 32, 3), np.float32),
                        np.zeros((2, 4), np.int32), np.ones((2, 4), np.int32))
