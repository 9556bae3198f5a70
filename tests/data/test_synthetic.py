import re

import numpy as np
import pytest
from skimage import measure

from mplug_jax.data.synthetic import shapes as synthetic
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.synthetic.shapes import COLORS, NUMBERS, PLURALS, SyntheticShapes

_SINGULAR = {v: k for k, v in PLURALS.items()}
_PHRASE = re.compile(r"\b(an?|one|two|three) (\w+) (circles?|squares?|triangles?)\b")


def _components(img, color):
    mask = np.all(img == np.array(COLORS[color], np.uint8), axis=-1)
    return [r for r in measure.regionprops(measure.label(mask, connectivity=1))]


def _shape_of(region):
    # Fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2.
    ratio = region.extent
    return "square" if ratio > 0.9 else "circle" if ratio > 0.66 else "triangle"


def test_record_format_and_sizes():
    ds = SyntheticShapes("train", 20, image_size=48)
    assert len(ds) == 20
    r = ds[3]
    assert set(r) == {"image", "caption", "question", "answer", "id"}
    assert r["image"].dtype == np.uint8 and r["image"].shape == (48, 48, 3)
    assert r["id"] == 3 and ds[-1]["id"] == 19
    assert all(isinstance(r[k], str) and r[k] for k in ("caption", "question", "answer"))
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("val", 5)


def test_deterministic_by_seed_split_index():
    a, b = SyntheticShapes("train", 50, seed=1), SyntheticShapes("train", 50, seed=1)
    for i in (0, 7, 49):
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        assert (ra["caption"], ra["question"], ra["answer"]) == (rb["caption"], rb["question"],
                                                                   rb["answer"])
    # Access order does not matter (random access) and other seeds differ.
    np.testing.assert_array_equal(a[7]["image"], SyntheticShapes("train", 8, seed=1)[7]["image"])
    c = SyntheticShapes("train", 50, seed=2)
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(5))


def test_splits_are_disjoint():
    train = SyntheticShapes("train", 300)
    held = SyntheticShapes("heldout", 300)
    train_imgs = {train[i]["image"].tobytes() for i in range(len(train))}
    assert not any(held[i]["image"].tobytes() in train_imgs for i in range(len(held)))
    assert len(train_imgs) == len(train)


def test_vocabulary_is_small_and_single_bert_tokens():
    tok = tokenizer.get_tokenizer()
    vocab = synthetic.vocabulary()
    assert len(vocab) < 60
    ids, _ = tok.encode(vocab)
    assert (ids[:, 1] != tokenizer.UNK_ID).all() and (ids[:, 2:] == 0).all()
    ds = SyntheticShapes("train", 200)
    words = set()
    for i in range(len(ds)):
        r = ds[i]
        words |= set(f"{r['caption']} {r['question']} {r['answer']}".split())
        assert text.pre_caption(r["caption"]) == r["caption"]  # survives official normalisation
    assert words <= set(vocab)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_pixels(split):
    ds = SyntheticShapes(split, 150, image_size=64)
    n_rel = 0
    for i in range(len(ds)):
        r = ds[i]
        img, cap = r["image"], r["caption"]
        named: dict[str, int] = {}
        for count, color, shape in _PHRASE.findall(cap):
            n = 1 if count in ("a", "an") else NUMBERS.index(count)
            named[color] = named.get(color, 0) + n
            regions = _components(img, color)
            assert sum(_shape_of(g) == _SINGULAR.get(shape, shape) for g in regions) >= n, cap
        for color in COLORS:  # every drawn colour is named with the right multiplicity
            assert len(_components(img, color)) == named.get(color, 0), (i, cap)
        m = re.search(r"an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)", cap)
        if m:
            n_rel += 1
            (ya, xa), (yb, xb) = (
                next(g for g in _components(img, m[k]) if _shape_of(g) == m[k + 1]).centroid
                for k in (1, 4))
            expect = {"left of": xa < xb, "right of": xa > xb, "above": ya < yb,
                      "below": ya > yb}[m[3]]
            assert expect, (i, cap)
        bg = re.search(r"on an? (\w+) background", cap)
        if bg:
            corner_luma = float(np.median(img[:4, :4]))
            assert abs(corner_luma - synthetic.BACKGROUNDS[bg[1]]) < 60, (cap, corner_luma)
    assert n_rel > 10


def test_answers_match_pixels():
    ds = SyntheticShapes("train", 200)
    kinds = set()
    for i in range(len(ds)):
        r = ds[i]
        img, q, a = r["image"], r["question"], r["answer"]
        if m := re.fullmatch(r"what color is the (\w+)", q):
            kinds.add("color")
            assert any(_shape_of(g) == m[1] for g in _components(img, a)), (q, a)
        elif m := re.fullmatch(r"what shape is the (\w+) object", q):
            kinds.add("shape")
            assert {_shape_of(g) for g in _components(img, m[1])} == {a}, (q, a)
        elif m := re.fullmatch(r"how many (\w+) are there", q):
            kinds.add("count")
            shape = _SINGULAR[m[1]]
            got = sum(_shape_of(g) == shape for c in COLORS for g in _components(img, c))
            assert NUMBERS[got] == a, (q, a)
        elif m := re.fullmatch(r"is there an? (\w+) (\w+)", q):
            kinds.add("exists")
            got = any(_shape_of(g) == m[2] for g in _components(img, m[1]))
            assert a == ("yes" if got else "no"), (q, a)
        else:
            raise AssertionError(f"unexpected question {q!r}")
    assert kinds == {"color", "shape", "count", "exists"}


# ---- VQA records --------------------------------------------------------------------------

def test_vqa_records_are_official_format_with_realistic_disagreement():
    ds = synthetic.SyntheticVQA("train", 300, image_size=32, seed=0)
    recs = [ds[i] for i in range(300)]
    r = recs[0]
    assert set(r) == {"question_id", "question", "image", "dataset", "answer", "answer_type",
                      "kind"}
    assert r["dataset"] == "vqa" and r["image"].shape == (32, 32, 3)
    assert [x["question_id"] for x in recs] == list(range(300))
    assert synthetic.SyntheticVQA("heldout", 3)[2]["question_id"] == 10**7 + 2
    assert {x["kind"] for x in recs} == set(synthetic.VQA_KINDS)
    vocab = set(synthetic.vqa_answer_vocabulary())
    n_split = 0
    for x in recs:
        assert len(x["answer"]) == 10 and set(x["answer"]) <= vocab
        assert x["answer_type"] == synthetic.ANSWER_TYPES[x["kind"]]
        top, n = max(((a, x["answer"].count(a)) for a in set(x["answer"])), key=lambda t: t[1])
        assert n >= 6
        n_split += len(set(x["answer"])) > 1
        if x["kind"] == "count":
            others = [int(a) for a in x["answer"] if a != top]
            assert all(abs(o - int(top)) == 1 for o in others)  # neighbouring counts
    assert 0.2 < n_split / len(recs) < 0.7  # VQA v2: about 40% of questions disagree


def test_vqa_majority_answers_match_the_scene():
    ds = synthetic.SyntheticVQA("heldout", 200, image_size=32, seed=1)
    for i in range(200):
        scene, r = ds.shapes.scene(i), ds[i]
        top = max(set(r["answer"]), key=r["answer"].count)
        words = r["question"].rstrip("?").split()
        objs = [(s.color, s.shape) for s in scene.shapes]
        if r["kind"] == "count":
            assert int(top) == sum(sh == _SINGULAR[words[2]] for _, sh in objs)
        elif r["kind"] == "color":
            assert (top, words[-1]) in objs
        elif r["kind"] == "shape":
            assert (words[-2], top) in objs
        elif r["kind"] == "position":
            s = next(s for s in scene.shapes if (s.color, s.shape) == (words[-2], words[-1]))
            assert top == synthetic.COLUMNS[s.cell[1]]
        else:
            assert top == ("yes" if (words[-2], words[-1]) in objs else "no")


def test_write_vqa_files_reads_back_through_the_official_reader(tmp_path):
    from PIL import Image

    from mplug_jax.data.formats import vqa as vqa_format
    from mplug_jax.scoring import vqa as scoring
    paths = synthetic.write_vqa_files(str(tmp_path), "train", 5, image_size=24, seed=2)
    src = vqa_format.read(paths["json"], {"vqa": paths["root"]}, train=True)
    ds = synthetic.SyntheticVQA("train", 5, image_size=24, seed=2)
    ann = scoring.load_annotations(paths["annotations"])
    for i in range(5):
        want = ds[i]
        got = src[i]
        assert got["question"] == want["question"] and got["question_id"] == want["question_id"]
        np.testing.assert_array_equal(np.asarray(Image.open(got["image"])), want["image"])
        assert sum(got["weights"]) == pytest.approx(1.0)
        assert ann[want["question_id"]] == {"answers": want["answer"],
                                            "answer_type": want["answer_type"]}
