"""Grounding's two stages (configs/grounding.py: `vg_uni_*` then `refcoco*_finetune`; `tiny`
then `tiny_finetune`): a tiny two-stage run where stage 2 starts from stage 1's best checkpoint
at the second-stage lr and tests on its own best; the official colour-jitter probability
(0.8) and the int cast of the split file's box before the corner conversion."""
import json

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from configs import grounding as grounding_config
from mplug_jax import metrics, tasks, trainer, workdir
from mplug_jax.data.formats import grounding as grounding_format
from mplug_jax.data.inputs import grounding as GI
from test_grounding import SMALL_MODEL, eval_config


# ---- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["refcoco_large", "refcocop_base", "refcocog_large",
                                  "refcoco_large_paper", "tiny"])
def test_finetune_preset_is_the_stage1_preset_at_2e6_from_best(name):
    """`X_finetune` = `X` with lr1 = lr2 = 2e-6 (tiny: a tenth of its lr) and init.select
    'best'; nothing else moves (official `--finetune` changes only the two lrs)."""
    paper = name.endswith("_paper")
    stage2 = name[:-len("_paper")] + "_finetune_paper" if paper else name + "_finetune"
    one, two = grounding_config.get_config(name), grounding_config.get_config(stage2)
    want = 1e-4 if name == "tiny" else 2e-6
    assert two.optim.lr == pytest.approx(want)
    assert two.optim.lr * two.optim.lr_groups.vision.mult == pytest.approx(want)
    assert two.init.select == "best" and one.init.select == "latest"
    f1, f2 = (flax.traverse_util.flatten_dict(c.to_dict(), sep=".") for c in (one, two))
    changed = {k for k in f1.keys() | f2.keys() if f1.get(k) != f2.get(k)}
    extra = {"evals.val.every_epochs", "evals.test.batch_size", "evals.test.every_epochs",
             "evals.test.dataset", "evals.test.every_steps", "evals.test.num_examples",
             "evals.test.num_examples_shown", "evals.test.split", "evals.test.type",
             "test_on_best"} if name == "tiny" else {"optim.lr_groups.vision.mult"}
    assert changed == {"variant", "optim.lr", "init.select"} | extra, changed
    if name != "tiny":
        assert two.test_on_best == one.test_on_best and two.evals.val.every_epochs == 1.0


def test_official_presets_default_to_jitter_p08_and_int_boxes():
    assert GI.DEFAULT_AUGMENT["color_jitter_p"] == 0.8
    for name in ("vg_uni_large", "refcoco_base", "refcocog_large_finetune",
                 "refcocop_large_finetune_paper"):
        c = grounding_config.get_config(name)
        assert c.input.int_box and c.input.augment.color_jitter_p == 0.8, name
        assert c.input.augment.enabled, name
    tiny = grounding_config.get_config("tiny")
    assert not tiny.input.int_box and not tiny.input.augment.enabled
    with pytest.raises(ValueError, match="unknown variant"):
        grounding_config.get_config("vg_uni_large_finetune")  # no second stage of the union


# ---- colour jitter probability ------------------------------------------------------------

def test_jitter_probability_over_many_draws():
    rng = np.random.default_rng(0)
    n = 20000
    hits = sum(GI.jitter_drawn(0.8, rng) for _ in range(n))
    assert abs(hits / n - 0.8) < 0.012, hits / n  # sd 0.0028: > 4 sd
    assert not any(GI.jitter_drawn(0.0, rng) for _ in range(200))
    before = rng.bit_generator.state
    assert all(GI.jitter_drawn(1.0, rng) for _ in range(200))
    assert rng.bit_generator.state == before  # p = 1: no draw, the old random stream


def test_train_transform_jitters_the_official_share_of_images():
    """Jitter only (no resize, crop, flip, translation): with p 0.8 about 80% of the draws
    change the pixels, with p 1.0 every draw, with jitter 0 none."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), np.uint8))
    box = np.array([2, 2, 10, 10], np.float32)
    aug = dict(scale=False, crop=False, hflip=False, translate=False, color_jitter=0.4)
    plain, _, _ = GI.train_transform(img, box, "a dog", 16, np.random.default_rng(0),
                                     dict(aug, color_jitter=0.0))

    def changed(p, n=400):
        outs = [GI.train_transform(img, box, "a dog", 16, np.random.default_rng(s),
                                   dict(aug, color_jitter_p=p))[0] for s in range(n)]
        return np.mean([not np.allclose(x, plain) for x in outs])

    assert 0.74 <= changed(0.8) <= 0.86  # binomial(400, 0.8): sd 0.02
    assert changed(1.0) == 1.0 and changed(0.0) == 0.0


# ---- int cast of the split box ------------------------------------------------------------

def _split_files(tmp_path):
    """A one-image official layout: unc (x, y, w, h boxes) and referit (corner boxes)."""
    data, split = tmp_path / "ln_data", tmp_path / "data"
    coco = data / "other" / "images" / "mscoco" / "images" / "train2014"
    ref = data / "referit" / "images"
    for d in (coco, ref, split / "unc", split / "referit"):
        d.mkdir(parents=True)
    for d in (coco, ref):
        Image.new("RGB", (64, 48), (90, 120, 30)).save(d / "a.jpg")
    rows = {"unc": [["a.jpg", 0, [10.7, 5.9, 20.6, 30.2], "the dog", []]],
            "referit": [["a.jpg", 0, [10.7, 5.9, 31.3, 36.1], "the dog", []]]}
    for name, r in rows.items():
        (split / name / f"{name}_val.json").write_text(json.dumps(r))
    return str(data), str(split)


def test_int_cast_before_the_corner_conversion(tmp_path):
    """Official pull_item: np.array(box, int), then x2 = x + w; corner boxes (referit,
    flickr) cast as they are. So x2 = int(10.7) + int(20.6) = 30, not int(31.3) = 31."""
    data, split = _split_files(tmp_path)
    c = grounding_config.get_config("refcoco_large")
    c.input.update(data_root=data, split_root=split)
    got = {}
    for int_box in (True, False):
        c.input.int_box = int_box
        for name in ("unc", "referit"):
            got[name, int_box] = GI.source(c.input, "val", dataset=name)[0]["bbox"]
    assert got["unc", True] == [10, 5, 20, 30]  # corners (10, 5, 30, 35)
    assert got["unc", False] == pytest.approx([10.7, 5.9, 20.6, 30.2])
    assert got["referit", True] == [10, 5, 21, 31]  # corners (10, 5, 31, 36) as given
    assert got["referit", False] == pytest.approx([10.7, 5.9, 20.6, 30.2])
    # The eval target follows: the int box in the padded frame (long side 64 -> 32, ratio 0.5,
    # 8 rows of padding on top).
    c.input.int_box = True
    b = next(GI.eval_batches(eval_config(c.input, 32), GI.source(c.input, "val", dataset="unc"),
                             1))
    np.testing.assert_allclose(b["gt_box"][0], np.array([20, 8 + 20, 20, 30]) / 2 / 32,
                               atol=1e-6)
    # flickr rows (file, corners, phrase) through the source directly.
    path = tmp_path / "flickr_val.json"
    path.write_text(json.dumps([["a.jpg", [3.9, 4.2, 9.99, 8.5], "a cat"]]))
    src = grounding_format.read(str(path), data, flickr=True, int_box=True)
    assert src[0]["bbox"] == [3, 4, 6, 4]
    # A box without area once cast is skipped and counted, not a zero-area target.
    path.write_text(json.dumps([["a.jpg", 0, [3.2, 4.0, 0.7, 5.0], "a cat", []],
                                ["a.jpg", 1, [3.2, 4.0, 2.7, 5.0], "a dog", []]]))
    src = grounding_format.read(str(path), data, int_box=True, max_skip_rate=0.5)
    assert len(src) == 1 and src.skipped["bad_record"] == 1 and src[0]["bbox"] == [3, 4, 2, 5]


# ---- two stages ---------------------------------------------------------------------------

STEPS, SPE = 9, 3  # 3 epochs of 3 updates (48 records / batch 16)


def _stage(variant: str, tmp_path):
    c = grounding_config.get_config(variant)
    c.model.update(SMALL_MODEL)  # the full vocabulary: the phrases use ids beyond 1024
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.input.update(synthetic_dir=str(tmp_path / "shapes"), train_size=SPE * 16, batch_size=16)
    c.total_steps, c.log_every_steps, c.ckpt_every_steps = STEPS, 1, 100
    c.optim.warmup_steps = 2
    for e in c.evals.values():
        e.update(num_examples=32, batch_size=16)
    return c


def _same(a, b) -> bool:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(a, b))


def test_two_stage_tiny_run(tmp_path, monkeypatch, capsys):
    """Stage 1 (`tiny`, the vg_uni role): val every epoch selects the best checkpoint. Stage 2
    (`tiny_finetune`, init.select='best' from stage 1's workdir): starts from exactly stage 1's
    best params, trains both lr groups at the second-stage lr, selects its own best by val
    every epoch and writes the test split's results at that step."""
    s1 = _stage("tiny", tmp_path)
    s1.evals.val.every_epochs = 1.0  # the official cadence (vg_uni_*); tiny: once, at the end
    s1.init.allow_scratch = True  # no pretraining run needed for this test
    wd1 = tmp_path / "uni"
    out1 = trainer.run(s1, str(wd1))
    best1 = json.loads((wd1 / "best" / "best.json").read_text())
    assert best1["step"] in (SPE, 2 * SPE, 3 * SPE)
    _, best_params, _ = workdir.restore_params(wd1 / "best")

    cls = tasks.get_class("grounding")
    seen = []
    original = cls.init_from_pretrained

    def spy(self, state):
        state = original(self, state)
        seen.append(jax.tree.map(np.asarray, state.params))
        return state

    monkeypatch.setattr(cls, "init_from_pretrained", spy)
    s2 = _stage("tiny_finetune", tmp_path)
    assert s2.init.select == "best"
    s2.init.checkpoint = str(wd1)
    wd2 = tmp_path / "refcoco"
    out2 = trainer.run(s2, str(wd2))
    monkeypatch.undo()

    assert len(seen) == 1 and _same(seen[0], best_params)  # stage 2 starts at stage 1's best
    if best1["step"] != STEPS:  # then the final stage-1 params are not what stage 2 loaded
        assert not _same(seen[0], out1["state"].params)
    rows = metrics.read_jsonl(str(wd2 / "metrics.jsonl"))
    lrs = [(r["train/lr"], r["train/lr_vision"]) for r in rows if "train/lr" in r]
    assert len(lrs) == STEPS and all(a == b for a, b in lrs)  # one lr for both groups
    assert max(a for a, _ in lrs) == pytest.approx(grounding_config.TINY_LR * 2e-6 / 2e-5)
    rows1 = metrics.read_jsonl(str(wd1 / "metrics.jsonl"))
    assert max(r["train/lr"] for r in rows1 if "train/lr" in r) == \
        pytest.approx(grounding_config.TINY_LR)

    best2 = json.loads((wd2 / "best" / "best.json").read_text())
    with capsys.disabled():
        print(f"stage 1 best val accu {best1['value']:.3f} at step {best1['step']} of {STEPS}; "
              f"stage 2 best {best2['value']:.3f} at step {best2['step']}")
    assert out2["selected_step"] == best2["step"]
    vals = [r["step"] for r in rows if "val/accu" in r]
    assert vals == [SPE, 2 * SPE, 3 * SPE]  # val after every epoch
    result = wd2 / "results" / f"test_step{best2['step']}" / "grounding_result.json"
    assert result.is_file() and len(json.loads(result.read_text())) == 32
    tested = [r for r in rows if "test/accu" in r]
    assert len(tested) == 1 and tested[0]["test/selected_step"] == best2["step"]
    assert "test" not in out2["evals"] or out2["evals"]["test"]["num"] == 32
    assert sorted(p.name for p in (wd2 / "results").iterdir() if p.name.startswith("test")) \
        == [f"test_step{best2['step']}"]  # the test split ran once, on the selected params
