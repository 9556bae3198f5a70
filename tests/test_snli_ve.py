"""SNLI-VE: synthetic data, official reader, encoder-only task, shared `classify` evaluator,
scoring round trip, configs (learning runs:
tests/learning/test_learn_snli_ve.py)."""
import hashlib
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from configs import snli_ve as snli_config
from mplug_jax import cli, scoring, tasks
from mplug_jax.data import pipeline
from mplug_jax.data.formats import snli_ve_jsonl
from mplug_jax.data.inputs import snli_ve as snli_ve_input
from mplug_jax.data.synthetic import snli_ve as S
from mplug_jax.data.synthetic.shapes import COLORS, SHAPES
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops.image import DataError
from mplug_jax.evaluators import classify as classify_eval
from mplug_jax.evaluators.common import FILES, write_files
from mplug_jax.scoring import classify as C
from mplug_jax.scoring import snli_ve as score_snli_ve
from helpers import SMALL_MODEL


def small_config(tmp_path, **input_kw):
    c = snli_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL_MODEL)
    c.input.update(train_size=32, eval_size=20, batch_size=8,
                   synthetic_dir=str(tmp_path / "synth"), **input_kw)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.init.allow_scratch = True
    return c


def init(task, seed: int = 0):
    """Unboxed params of `task`, created under jit (one compile instead of op by op)."""
    return jax.jit(lambda k: nn.meta.unbox(task.init_params(k)))(jax.random.PRNGKey(seed))


def test_accuracy_and_result_rows_by_hand():
    labels = ("contradiction", "neutral", "entailment")
    pred, gold = [0, 1, 2, 2, 1, 0, 2], [0, 2, 2, 2, 1, 1, 0]
    got = C.accuracy(pred, gold, labels)
    assert got["acc"] == pytest.approx(4 / 7) and got["n"] == 7
    assert (got["n_contradiction"], got["n_neutral"], got["n_entailment"]) == (2, 2, 3)
    assert (got["pred_contradiction"], got["pred_neutral"], got["pred_entailment"]) == (2, 2, 3)
    assert got["acc_contradiction"] == pytest.approx(1 / 2)
    assert got["acc_neutral"] == pytest.approx(1 / 2)
    assert got["acc_entailment"] == pytest.approx(2 / 3)
    assert "acc_neutral" not in C.accuracy([0], [0], labels)  # no gold neutral: no recall
    with pytest.raises(ValueError, match="out of range"):
        C.accuracy([3], [0], labels)

    rows = C.result_rows([5, 1, 3], [2, 0, 1], [2, 1, 1], labels)
    assert rows == [{"id": 1, "pred": "contradiction", "label": "neutral"},
                    {"id": 3, "pred": "neutral", "label": "neutral"},
                    {"id": 5, "pred": "entailment", "label": "entailment"}]
    gold_map = {1: "neutral", 3: "neutral", 5: "entailment", 9: "contradiction"}
    scored = C.score_rows(rows + [{"id": 12, "pred": "neutral"}], gold_map, labels)
    assert scored["acc"] == pytest.approx(2 / 3) and scored["n"] == 3
    assert (scored["unanswered"], scored["unscored"]) == (1, 1)
    with pytest.raises(ValueError, match="disagrees"):
        C.score_rows([{"id": 1, "pred": "neutral", "label": "entailment"}], gold_map, labels)
    with pytest.raises(ValueError, match="twice"):
        C.score_rows([rows[0], rows[0]], gold_map, labels)
    with pytest.raises(ValueError, match="not in"):
        C.score_rows([{"id": 1, "pred": "maybe"}], gold_map, labels)


def test_synthetic_triples_are_three_way_and_need_the_image():
    # The label table (module docstring): the same sentence form takes every label.
    table = {(f, v, c): S.label_of(f, v, c) for f in S.FORMS for v in (0, 1) for c in (0, 1)}
    assert {table[("positive", v, c)] for v in (0, 1) for c in (0, 1)} == set(S.LABELS)
    assert {table[("negative", v, c)] for v in (0, 1) for c in (0, 1)} == set(S.LABELS)
    assert table[("unknowable", 1, 0)] == "neutral" and table[("unknowable", 0, 0)] == \
        "contradiction"
    train = [S.example("train", i, image_size=32) for i in range(1500)]
    held = [S.example("val", i, image_size=32) for i in range(400)]
    for r in train[:300]:
        assert S.label_of(r["form"], r["visible"], r["cover"]) == r["label"]
        mentioned = any(w in r["sentence"] for w in ("there is", "shows", "picture", "the "))
        assert mentioned and r["image"].shape == (32, 32, 3)
    counts = np.bincount([S.LABELS.index(r["label"]) for r in train], minlength=3) / len(train)
    assert counts.min() > 0.28 and counts.max() < 0.39  # balanced (drawn uniformly)
    blind = S.hypothesis_only_accuracy(train, held)
    assert 0.4 < blind < 0.55, blind  # the text alone gets about half right
    assert S.example("train", 7) ["sentence"] == S.example("train", 7)["sentence"]  # pure
    assert S.example("train", 7)["sentence"] != S.example("test", 7)["sentence"] or \
        not np.array_equal(S.example("train", 7)["image"], S.example("test", 7)["image"])
    # The cover stripes sit inside its cell only.
    img = np.full((48, 48, 3), 128, np.uint8)
    covered = S.draw_cover(img, (1, 2))
    changed = np.any(covered != img, -1)
    ys, xs = np.nonzero(changed)
    assert ys.min() >= 16 and ys.max() < 32 and xs.min() >= 32
    assert set(np.unique(covered[changed][:, 0])) == {15, 245}


# sha256 of json.dumps([(sentence, label)]) of train and val records 0-49 at 32 px, as generated
# before premises existed: the hypothesis-only synthetic data must not change.
HYPOTHESIS_ONLY_SHA = "bd46618c4125adbd27e24cceb3a9686d7eb7784ac20bc46b14342e44717296af"


def test_synthetic_premise_tells_what_the_image_cannot(tmp_path):
    recs = [S.example(sp, i, image_size=32) for sp in ("train", "val") for i in range(50)]
    digest = hashlib.sha256(json.dumps([(r["sentence"], r["label"]) for r in recs]).encode())
    assert digest.hexdigest() == HYPOTHESIS_ONLY_SHA
    train = [S.example("train", i, image_size=8) for i in range(3000)]
    held = [S.example("val", i, image_size=8) for i in range(500)]
    for r in train[:500]:
        assert r["premise_label"] == S.label_of(r["form"], r["visible"] or r["hidden"], False)
        assert (r["premise_label"] != r["label"]) <= (r["cover"] and not r["visible"])
        assert r["hidden"] <= (r["cover"] and not r["visible"])
        obj = [w for w in r["sentence"].split() if w in COLORS or w in SHAPES]
        assert " ".join(obj) in r["premise"]  # the premise speaks of the hypothesis's object
    differ = np.mean([r["premise_label"] != r["label"] for r in held])
    assert 0.15 < differ < 0.3, differ
    # A perfect image reader without the premise (hypothesis form, cover, object visible) is
    # exact on the json labels but not on the labels given the premise; with it, exact.
    f_img = ("sentence", "cover", "visible")
    assert S.best_guess_accuracy(train, held, f_img, "label") == 1.0
    ceiling = S.best_guess_accuracy(train, held, f_img, "premise_label")
    assert 0.8 < ceiling < 0.92, ceiling
    assert S.best_guess_accuracy(train, held, ("sentence", "premise"), "premise_label") == 1.0
    # Both files of a split: the json as before, the jsonl read back by the original reader.
    paths = S.write_files(str(tmp_path), "val", 12, image_size=32)
    albef = json.loads(open(paths["annotation"]).read())
    orig = snli_ve_jsonl.read(paths["original"], paths["image_root"])
    for i, (a, o) in enumerate(zip(albef, orig)):
        ex = S.example("val", i, image_size=32)
        assert (a["sentence"], a["label"]) == (ex["sentence"], ex["label"])
        assert (o["sentence"], o["premise"]) == (ex["sentence"], ex["premise"])
        assert o["label"] == snli_ve_input.LABELS.index(ex["premise_label"])
        assert o["image"] == os.path.join(paths["image_root"], f"{a['image']}.jpg")
        assert os.path.isfile(o["image"])


JSONL = [  # original SNLI-VE lines (fields abridged), ids with and without ".jpg"
    {"sentence1": "Two women are embracing while holding to go packages.",
     "sentence2": "The sisters are hugging goodbye.", "Flikr30kID": "4705552913.jpg",
     "gold_label": "neutral", "pairID": "4705552913.jpg#2r1n"},
    {"sentence1": "A man, in a blue shirt, plays guitar.", "sentence2": "Nobody plays.",
     "Flikr30kID": "1000092795", "gold_label": "contradiction", "pairID": "x"},
    {"sentence1": "Kids play soccer.", "sentence2": "Children are outside.",
     "Flikr30kID": "3416050480.jpg", "gold_label": "entailment", "pairID": "y"},
]


def _write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_original_jsonl_reader_premise_and_refusals(tmp_path):
    ann = _write_jsonl(tmp_path / "snli_ve_dev.jsonl", JSONL, blank_after=1)
    src = snli_ve_jsonl.read(ann, "/img")
    assert len(src) == 3 and snli_ve_jsonl.is_original(ann)
    assert [r["label"] for r in src] == [1, 0, 2]  # neutral 1, contradiction 0, entailment 2
    assert src[0] == {"image": "/img/4705552913.jpg",
                      "premise": "two women are embracing while holding to go packages",
                      "sentence": "the sisters are hugging goodbye", "label": 1}
    assert src[1]["image"] == "/img/1000092795.jpg" and src[1]["premise"] == \
        "a man in a blue shirt plays guitar"
    assert score_snli_ve.load_gold(ann) == {0: "neutral", 1: "contradiction", 2: "entailment"}
    # Refusals: one line naming file and line (blank lines count).
    bad = [("-", r"line 3: gold_label '-' is not one of contradiction, entailment, neutral"),
           ("Entailment", r"line 3: gold_label 'Entailment' is not")]
    for label, msg in bad:
        rows = [JSONL[0], {**JSONL[1], "gold_label": label}]
        path = _write_jsonl(tmp_path / "bad.jsonl", rows, blank_after=1)
        with pytest.raises(DataError, match=re.escape(path) + " " + msg) as e:
            snli_ve_jsonl.read(path, "")
        assert "\n" not in str(e.value)
    rows = [JSONL[0], {k: v for k, v in JSONL[2].items() if k != "sentence1"}]
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'sentence1' missing"):
        snli_ve_jsonl.read(_write_jsonl(tmp_path / "bad.jsonl", rows), "")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: not valid JSON"):
        snli_ve_jsonl.read(_write_jsonl(tmp_path / "bad.jsonl", ["{oops"]), "")
    with pytest.raises(DataError, match="neither the original"):
        snli_ve_jsonl.is_original(_write_jsonl(tmp_path / "x.txt", ["hello"]))
    albef = tmp_path / "ve_dev.json"
    albef.write_text(json.dumps([{"image": "1", "sentence": "a", "label": "neutral"}]))
    assert not snli_ve_jsonl.is_original(str(albef))

    # Text: [CLS] premise [SEP] hypothesis, longest part cut first; premise=False: hypothesis.
    tok = tokenizer.get_tokenizer()
    p_ids = tok.encode(["a red circle under a box"])[0][0, 1:].tolist()  # 6 word pieces
    h_ids = tok.encode(["a dog"])[0][0, 1:].tolist()
    ids, mask = snli_ve_input.encode_pair(["a red circle under a box"], ["a dog"], 12)
    assert ids[0].tolist() == [101, *p_ids, 102, *h_ids] + [0] * 2
    assert mask[0].tolist() == [1] * 10 + [0] * 2
    ids, _ = snli_ve_input.encode_pair(["a red circle under a box"], ["a dog"], 7)
    assert ids[0].tolist() == [101, *p_ids[:3], 102, *h_ids]  # the hypothesis kept whole
    box = tok.encode(["a box"])[0][0, 1:].tolist()
    ids, _ = snli_ve_input.encode_pair(["a box"], ["a red circle under a box"], 6)
    assert ids[0].tolist() == [101, *box, 102, *p_ids[:2]]  # now the hypothesis is the longer
    ids_h, _ = snli_ve_input.encode([{"premise": "x", "sentence": "a dog"}], 5, premise=False)
    assert ids_h[0].tolist() == [101, *h_ids, 0, 0]

    # The pipeline: jsonl with or without the premise; ALBEF json only without.
    c = small_config(tmp_path, dataset="json", val_file=ann, image_root=str(tmp_path))
    assert c.task.premise is True and snli_ve_input.premise_on(c)
    old = c.copy_and_resolve_references()
    del old.task["premise"]  # a config saved before the option: its runs were hypothesis only
    assert not snli_ve_input.premise_on(old)
    recs = snli_ve_input.source(c, "val")
    want, _ = snli_ve_input.encode_pair([r["premise"] for r in recs],
                                        [r["sentence"] for r in recs], 20)
    ecfg = {**c.evals.val, "batch_size": 4}
    for i in range(3):
        Image.new("RGB", (40, 40)).save(recs[i]["image"])
    erecs = snli_ve_input.eval_records(c, ecfg)
    b = next(snli_ve_input.eval_batches(c, erecs, 4, 0, 1))
    np.testing.assert_array_equal(b["text_ids"][:3], want)
    c.task.premise = False
    b = next(snli_ve_input.eval_batches(c, erecs, 4, 0, 1))
    np.testing.assert_array_equal(b["text_ids"][:3], snli_ve_input.encode_text(
        [r["sentence"] for r in recs], 20)[0])
    c.task.premise = True
    c.input.val_file = str(albef)
    with pytest.raises(ValueError, match="set --config.task.premise=False"):
        snli_ve_input.source(c, "val")
    c.input.max_text_tokens = 3
    with pytest.raises(ValueError, match=r"max_text_tokens must be >= 4 \(\[CLS\] premise"):
        tasks.build(c)


def _official_files(tmp_path):
    """An official-format SNLI-VE json with 6 good records (one image missing) and 3 bad ones."""
    root = tmp_path / "flickr"
    root.mkdir()
    recs = []
    for i in range(6):
        ex = S.example("val", i, image_size=40)
        if i != 4:
            Image.fromarray(ex["image"]).save(root / f"{1000 + i}.jpg")
        recs.append({"image": str(1000 + i), "sentence": ex["sentence"].capitalize() + ".",
                     "label": ex["label"]})
    recs.insert(2, {"image": "1100", "sentence": "A dog runs.", "label": "maybe"})
    recs.insert(5, {"image": "1101", "sentence": "   ", "label": "neutral"})
    recs.append({"sentence": "no image field", "label": "entailment"})
    ann = tmp_path / "ve_dev.json"
    ann.write_text(json.dumps(recs))
    return str(ann), str(root), recs


def test_reader_and_eval_batches_on_official_records(tmp_path, caplog):
    ann, root, raw = _official_files(tmp_path)
    c = small_config(tmp_path, dataset="json", val_file=ann, train_file=ann, image_root=root,
                     max_skip_rate=0.5)
    with pytest.raises(ValueError, match=r"has none: pass the original SNLI-VE jsonl "
                       r"\(snli_ve_dev.jsonl.*input.val_file, or set --config.task.premise=False"):
        snli_ve_input.source(c, "val")
    c.task.premise = False  # ALBEF's json: hypothesis only
    src = snli_ve_input.source(c, "val")
    assert len(src) == 6 and sum(src.skipped.values()) == 3
    good = [r for r in raw if r.get("label") != "maybe" and r.get("sentence", "").strip()
            and "image" in r]
    assert [r["label"] for r in src] == [snli_ve_input.LABELS.index(r["label"]) for r in good]
    assert src[0]["sentence"] == good[0]["sentence"].lower().rstrip(".")  # pre_caption
    assert src[0]["image"] == os.path.join(root, "1000.jpg")

    ecfg = c.evals.val
    ecfg.batch_size = 4
    recs = snli_ve_input.eval_records(c, ecfg)
    assert [r["idx"] for r in recs] == [0, 1, 2, 3, 5]  # record 4's image is missing
    assert "image file missing" in caplog.text
    whole = list(snli_ve_input.eval_batches(c, recs, ecfg.batch_size, 0, 1))
    assert [b["valid"].tolist() for b in whole] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert whole[1]["idx"].tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(whole[0]["label"], [src[i]["label"] for i in range(4)])
    assert whole[0]["image"].shape == (4, 32, 32, 3) and whole[0]["text_ids"].shape == (4, 20)
    assert whole[0]["text_ids"][0, 0] == 101 and whole[0]["text_ids"].dtype == np.int32
    # Two processes: each gets its half of every global batch, same number of batches.
    halves = [list(snli_ve_input.eval_batches(c, recs, 4, p, 2)) for p in (0, 1)]
    assert [len(h) for h in halves] == [2, 2]
    for j in range(2):
        for k in ("idx", "valid", "label", "text_ids", "image"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][j][k], halves[1][j][k]]), whole[j][k])

    c.input.batch_size = 4
    it, n = snli_ve_input.train_batches(c, 0, 1)
    assert n == 6
    batch = next(it)  # record 4 (missing image) is skipped and counted
    batch = next(it)
    assert 4 not in batch["idx"].tolist() and batch["label"].shape == (4,)
    assert pipeline.skip_stats(it).skipped["missing_file"] == 1
    np.testing.assert_array_equal(batch["label"], [src[int(i)]["label"] for i in batch["idx"]])

    with pytest.raises(ValueError, match="input.test_file"):
        snli_ve_input.eval_records(c, {**ecfg, "split": "test"})
    with pytest.raises(ValueError, match="split must be one of"):
        snli_ve_input.eval_records(c, {**ecfg, "split": "train"})
    os.remove(os.path.join(root, "1001.jpg"))
    with open(os.path.join(root, "1002.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DataError, match="1002.jpg"):
        list(snli_ve_input.eval_batches(c, snli_ve_input.eval_records(c, ecfg), 4, 0, 1))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(config, task, params) of the 32-wide model on synthetic files (eval: 20 records)."""
    c = small_config(tmp_path_factory.mktemp("snli"))
    task = tasks.build(c)
    return c, task, init(task, 3)


def test_encoder_only_params_and_loss(small):
    _, task, params = small
    assert set(params) == {"vision", "text", "fusion", "mlm_bias", "temp", "cls_head"}
    assert params["cls_head"]["dense"]["kernel"].shape == (32, 32)
    assert params["cls_head"]["out"]["kernel"].shape == (32, 3)
    b = task.dummy_batch(4)
    b["text_ids"][:, :3] = [101, 2045, 2003]
    b["label"][:] = [0, 1, 2, 1]
    logits = jax.jit(task.classify)(params, b)
    assert logits.shape == (4, 3) and logits.dtype == np.float32
    loss, (m, extra) = jax.jit(task.loss)(params, {}, b, jax.random.PRNGKey(1), 0)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
    want = -np.mean(np.asarray(logp)[np.arange(4), b["label"]])
    assert float(loss) == pytest.approx(want, rel=1e-5) and extra == {}
    assert float(m["acc"]) == pytest.approx(np.mean(np.argmax(logits, -1) == b["label"]))


def test_evaluator_end_to_end_and_score_round_trip(small, tmp_path, mesh8, capsys):
    c, task, params = small
    c = c.copy_and_resolve_references()
    c.evals.val.update(num_examples=0, batch_size=16, num_examples_shown=2,
                       log_every_batches=1)
    ev = classify_eval.Evaluator(task.predict_fns(), c.evals.val, c, mesh=mesh8)
    res = ev.run(params)
    assert "snli_ve eval step 2/2" in capsys.readouterr().out
    # By hand: the same predict fn on every record, one batch, no mesh.
    recs = snli_ve_input.eval_records(c, c.evals.val)
    assert len(recs) == 20 == res["n"]
    b = next(snli_ve_input.eval_batches(c, recs, 32, 0, 1))
    pred = np.argmax(np.asarray(jax.jit(task.classify)(params, b)), -1)[:20]
    gold = b["label"][:20]
    assert res["acc"] == pytest.approx(np.mean(pred == gold))
    for k, name in enumerate(snli_ve_input.LABELS):
        assert res[f"n_{name}"] == int(np.sum(gold == k))
        assert res[f"pred_{name}"] == int(np.sum(pred == k))
    assert len(res["examples"]) == 2 and "accuracy" in ev.report(res)
    paths = write_files(res, tmp_path / "results")
    assert FILES not in res and paths == [str(tmp_path / "results" / "snli_ve_result.json")]
    rows = json.loads(open(paths[0]).read())
    assert [r["id"] for r in rows] == list(range(20))
    assert [r["pred"] for r in rows] == [snli_ve_input.LABELS[p] for p in pred]
    ann, _ = snli_ve_input.files(c, "val")
    scored = scoring.score_file("snli_ve", paths[0], ann)
    for k in ("acc", "n", "acc_neutral", "n_entailment", "pred_contradiction"):
        assert scored[k] == pytest.approx(res[k]), k
    assert cli.main(["score", "--task", "snli_ve", "--results", paths[0], "--annotations",
                     ann]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(res["acc"])


def test_configs_official_values_and_refusals(tmp_path):
    for variant, patch in (("base", 16), ("large", 14)):
        c = snli_config.get_config(variant)
        assert (c.input.batch_size, c.optim.lr, c.total_epochs, c.total_steps) == \
            (64, 2e-5, 5.0, 0)
        assert (c.model.image_size, c.model.patch_size, c.optim.wd) == (336, patch, 0.05)
        assert c.evals.val.type == "classify" and c.task.name == "snli_ve"
        assert c.input.augment.enabled and c.model.dtype == "bfloat16"
        with pytest.raises(ValueError, match="refuses the built-in synthetic"):
            tasks.get_class("snli_ve").train_input(c)
        # Encoder-only tree at 336 px: no decoder, no ITC/ITM/MLM dense heads; a 3-way head.
        task = tasks.build(c)
        shapes = jax.eval_shape(lambda k: nn.meta.unbox(task.init_params(k)),
                                jax.random.PRNGKey(0))
        want = {"vision", "text", "fusion", "mlm_bias", "temp", "cls_head"}
        assert set(shapes) == want | ({"visn_fc", "visn_ln"} if variant == "large" else set())
        assert shapes["vision"]["pos_embed"].shape[0] == (336 // patch) ** 2 + 1
        assert shapes["cls_head"]["out"]["kernel"].shape == (768, 3)
    tiny = snli_config.get_config("tiny")
    assert (tiny.total_steps, tiny.model.image_size, tiny.input.allow_synthetic) == \
        (400, 64, True)
    smoke = snli_config.get_config("tiny,mode=smoke")
    assert (smoke.total_steps, smoke.evals.val.num_examples) == (20, 64)
    with pytest.raises(ValueError, match="unknown variant"):
        snli_config.get_config("huge")
    c = small_config(tmp_path)
    c.init.allow_scratch = False
    with pytest.raises(ValueError, match="init.checkpoint=PRETRAINING_WORKDIR"):
        tasks.build(c).init_from_pretrained(None)
    with pytest.raises(ValueError, match="max_text_tokens"):
        c.input.max_text_tokens = 1
        tasks.build(c)
