"""VQA task: loss vs a hand computation, official records, the VQA metric, result files, answer
ranking vs brute force, configs, pretrained init at a new resolution (learning run:
tests/learning/test_learn_vqa.py)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vqa as vqa_config
from mplug_jax import optim, tasks, trainer, workdir
from mplug_jax import params as P
from mplug_jax.data.synthetic import shapes as synthetic
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.inputs import vqa as vqa_input
from mplug_jax.evaluators import vqa as vqa_eval
from mplug_jax.scoring import vqa as S
from mplug_jax.tasks.vqa import answer_nll
from helpers import SMALL_MODEL, built_task

V = 128  # small vocabulary for the unit tests


def small_config(vocab_size: int = V):
    c = vqa_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL_MODEL, vocab_size=vocab_size)
    c.input.update(max_question_tokens=8, max_answer_tokens=5)
    c.task.max_answers = 3
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    return c


@pytest.fixture(scope="module")
def small_task():
    return built_task(small_config())


def _batch(seed: int, b: int = 2, a: int = 3):
    r = np.random.default_rng(seed)
    ids = r.integers(tokenizer.MASK_ID + 1, V, (b, a, 5)).astype(np.int32)
    ids[..., 0] = tokenizer.CLS_ID
    lengths = np.array([[3, 5, 0], [4, 0, 0]])[:b, :a]  # 0 = padding slot
    mask = (np.arange(5)[None, None] < lengths[..., None]).astype(np.int32)
    ids = ids * mask
    q = r.integers(tokenizer.MASK_ID + 1, V, (b, 8)).astype(np.int32)
    q[:, 0] = tokenizer.CLS_ID
    qmask = (np.arange(8)[None] < np.array([6, 8])[:b, None]).astype(np.int32)
    return {"image": r.normal(size=(b, 32, 32, 3)).astype(np.float32), "question_ids": q * qmask,
            "question_mask": qmask, "answer_ids": ids, "answer_mask": mask,
            "answer_weights": np.array([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]], np.float32)[:b, :a],
            "answers_dropped": np.array([2, 0], np.int32)[:b], "idx": np.arange(b, dtype=np.int32)}


def test_loss_matches_hand_computation(small_task):
    """loss = sum_j w_j * (summed next-token NLL of answer j) / B images; padding slots and
    padding tokens contribute nothing; dropped answers are counted."""
    task, params = small_task
    batch = _batch(0)
    extra = {"answers_dropped": jnp.int32(5), "targets_dropped": jnp.int32(0)}
    loss, (m, new_extra) = task.loss(params, extra, batch, jax.random.PRNGKey(0), jnp.int32(0))
    states, smask = task.states(params, batch["image"], batch["question_ids"],
                                batch["question_mask"])
    logits = np.asarray(task.answer_logits(params, states, smask, batch["answer_ids"],
                                           batch["answer_mask"]), np.float64)
    want = 0.0
    for i in range(2):
        for j in range(3):
            nll = 0.0
            for t in range(4):
                if batch["answer_mask"][i, j, t + 1]:
                    x = logits[i, j, t]
                    logz = np.log(np.exp(x - x.max()).sum()) + x.max()
                    nll += logz - x[batch["answer_ids"][i, j, t + 1]]
            want += batch["answer_weights"][i, j] * nll
    want /= 2  # B = 2 images, not the 3 real answers
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert int(new_extra["answers_dropped"]) == 7 and float(m["answers_dropped_total"]) == 7
    # A padding slot's content is irrelevant: garbage ids there change nothing.
    junk = dict(batch, answer_ids=batch["answer_ids"].copy())
    junk["answer_ids"][0, 2] = 50
    loss2, _ = task.loss(params, extra, junk, jax.random.PRNGKey(0), jnp.int32(0))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    # Gathering the 2 + 4 + 3 = 9 real targets (capacity 64) gives the same loss; a capacity
    # below 9 drops targets and counts them.
    assert task.target_capacity(2, 3) == 2 * 3 * 4  # small_config: no gather
    task.targets_per_question = 4.0
    try:
        assert task.target_capacity(2, 3) == 24  # min(64, all 24 positions)
        task.target_capacity = lambda b, a: 16
        loss3, (m3, _) = task.loss(params, extra, batch, jax.random.PRNGKey(0), jnp.int32(0))
        assert float(loss3) == pytest.approx(float(loss), rel=1e-5)
        assert float(m3["dropped_targets_total"]) == 0
        task.target_capacity = lambda b, a: 5
        _, (m4, e4) = task.loss(params, extra, batch, jax.random.PRNGKey(0), jnp.int32(0))
        assert float(m4["dropped_targets_total"]) == 4 and int(e4["targets_dropped"]) == 4
    finally:
        del task.target_capacity
        task.targets_per_question = 0.0


def test_distillation_interpolates_with_momentum_targets():
    """task.distill: (1 - alpha) * NLL + alpha * soft CE; momentum = online at init, so the
    loss is between the hard NLL and the entropy-weighted value; alpha 0 = the plain loss."""
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 7))
    ids = jnp.array([[101 % 7, 1, 2, 3], [0, 4, 5, 0]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.int32)
    plain = answer_nll(logits, ids, mask)
    np.testing.assert_allclose(answer_nll(logits, ids, mask, logits, 0.0), plain, rtol=1e-6)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    soft = jnp.sum(ent * mask[:, 1:], -1)
    np.testing.assert_allclose(answer_nll(logits, ids, mask, logits, 0.4),
                               0.6 * plain + 0.4 * soft, rtol=1e-5)


def test_distill_task_matches_plain_loss_while_alpha_is_zero():
    """task.distill with alpha ramped from 0: at step 0 the loss equals the plain loss (what
    the official run always computes, its alpha never reaching the decoder); later it differs
    once the momentum copy has moved."""
    c = small_config()
    c.task.update(distill=True, alpha_warmup_epochs=1.0)
    task = tasks.build(c, steps_per_epoch=4)
    boxed = task.init_params(jax.random.PRNGKey(0))
    params = nn.meta.unbox(boxed)
    extra = nn.meta.unbox(task.init_extra(boxed, jax.random.PRNGKey(1)))
    assert set(extra["params_m"]) == {"vision", "text", "fusion", "decoder"}
    plain = tasks.build(small_config())
    batch = _batch(2)
    key = jax.random.PRNGKey(0)
    want, _ = plain.loss(params, {"answers_dropped": jnp.int32(0),
                                  "targets_dropped": jnp.int32(0)}, batch, key, jnp.int32(0))
    got, (m, _) = task.loss(params, extra, batch, key, jnp.int32(0))
    assert float(m["alpha"]) == 0 and float(got) == pytest.approx(float(want), rel=1e-6)
    moved = dict(extra, params_m=jax.tree.map(lambda x: x * 0.9, extra["params_m"]))
    later, (m, _) = task.loss(params, moved, batch, key, jnp.int32(2))
    assert float(m["alpha"]) == pytest.approx(0.2) and abs(float(later) - float(want)) > 1e-3


def test_official_records_to_batches(tmp_path):
    """write_vqa_files -> official json + PNGs -> formats.vqa.read -> batches: weights count/10,
    answers '[CLS] a [SEP]', heaviest kept, the rest counted; vg answers weigh 0.5."""
    paths = synthetic.write_vqa_files(str(tmp_path), "heldout", 12, image_size=32)
    raw = json.load(open(paths["json"]))
    assert set(raw[0]) == {"question_id", "question", "image", "dataset", "answer",
                           "answer_type"}
    assert len(raw[0]["answer"]) == 10 and raw[0]["dataset"] == "vqa"
    raw.append({"question_id": 7, "question": "what is it?", "image": raw[0]["image"],
                "dataset": "vg", "answer": "red"})
    raw.append({"question_id": 8, "question": "how many?", "image": raw[0]["image"],
                "dataset": "vqa", "answer": ["1", "2", "2", "3", "3", "3", "4", "4", "4", "4"]})
    with open(paths["json"], "w") as f:
        json.dump(raw, f)
    c = small_config()
    c.input.update(dataset="json", annotations=[paths["json"]], roots={"vqa": paths["root"],
                                                                       "vg": paths["root"]},
                   batch_size=14, train_size=0)
    src = vqa_input.source(c.input, "train", 0, 32, 0)
    assert src[12]["weights"] == [0.5] and src[12]["answers"] == ["red"]
    batch = next(iter(vqa_input.dataset(src, c.input, image_size=32, max_answers=3,
                                        batch_size=14, train=True, shuffle=False)))
    row = {int(i): k for k, i in enumerate(batch["idx"])}
    tok = tokenizer.get_tokenizer()
    r = row[13]  # 4 distinct answers, A = 3: "1" (0.1) dropped
    assert batch["answers_dropped"][r] == 1
    np.testing.assert_allclose(batch["answer_weights"][r], [0.2, 0.3, 0.4], rtol=1e-6)
    assert [tok.decode(x) for x in batch["answer_ids"][r]] == ["2", "3", "4"]
    assert list(batch["answer_ids"][r, 0, :3]) == [tokenizer.CLS_ID, tok.token_to_id("2"),
                                                   tokenizer.SEP_ID]
    np.testing.assert_allclose(batch["answer_weights"][row[12]], [0.5, 0, 0])
    assert batch["answer_mask"][row[12], 1:].sum() == 0  # padding slots
    for k in range(12):
        w = batch["answer_weights"][row[k]]
        assert w.sum() == pytest.approx(1.0) and np.allclose(w * 10, np.round(w * 10))
    assert batch["image"].shape == (14, 32, 32, 3) and batch["question_ids"].shape == (14, 8)
    assert vqa_input.select_answers(["a", "b", "c"], [0.1, 0.5, 0.1], 2) == (
        ["a", "b"], [0.1, 0.5], 1)


@pytest.mark.parametrize("pred, gts, want", [
    ("2", ["2"] * 10, 1.0),
    ("two", ["2"] * 10, 1.0),  # number words -> digits in the prediction
    ("two", ["two"] * 10, 0.0),  # official: unanimous human answers are not normalised
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),  # 3 x min(2/3, 1) + 7 x min(3/3, 1), / 10
    ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9),  # lower-cased, period stripped
    ("red", ["red"] + ["blue"] * 9, 0.3),  # red's own subset has 0 matches, 9 others 1/3
    ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # 2 x 1/3 + 8 x 2/3, / 10
    ("a dog", ["dog"] * 4 + ["cat"] * 6, 1.0),  # article dropped
    ("dont", ["don't"] * 5 + ["no"] * 5, 1.0),  # contraction restored
    ("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5, 1.0),  # '-' -> ' ' on both sides
    ("1,000", ["1000"] * 5 + ["many"] * 5, 1.0),  # digit,digit: punctuation deleted
    ("3.5", ["3.5"] * 4 + ["3"] * 6, 1.0),  # a period before a digit stays
    ("  white\n", ["white"] * 10, 1.0),
])
def test_vqa_accuracy_edge_cases(pred, gts, want):
    assert S.vqa_accuracy(pred, gts) == pytest.approx(want)


def test_normalisation_details():
    assert S.normalize_answer("The Cat's toy!") == "cat's toy"
    assert S.process_punctuation("hello , world") == "hello  world"  # ' ,': deleted
    assert S.process_punctuation("a/b") == "a b"
    assert S.normalize_answer("u.s.") == "us"
    assert S.normalize_answer("none") == "0" and S.normalize_answer("an apple") == "apple"
    assert S.type_key("yes/no") == "yes_no"
    with pytest.raises(ValueError, match="at least one"):
        S.vqa_accuracy("x", [])


def test_result_file_round_trip_in_every_annotation_format(tmp_path):
    """score_file(result file) equals `evaluate` for VQA v2 annotations and the official
    10-answer json, per answer type; minival labels score label[answer]; bad files are named."""
    ds = synthetic.SyntheticVQA("heldout", 30, image_size=16)
    recs = [{k: v for k, v in ds[i].items() if k != "image"} for i in range(30)]
    preds = {r["question_id"]: (r["answer"][0] if i % 3 else "purple") for i, r in
             enumerate(recs)}
    res_path = tmp_path / "vqa_result.json"
    res_path.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in preds.items()]))
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps(synthetic.vqa_v2_annotations(recs)))
    off = tmp_path / "official.json"
    off.write_text(json.dumps(recs))
    want = S.evaluate(preds, S.annotations_from_records(recs))
    by_hand = np.mean([S.vqa_accuracy(preds[r["question_id"]], r["answer"]) for r in recs])
    assert want["acc"] == pytest.approx(by_hand) and want["n"] == 30
    for path in (v2, off):
        got = S.score_file(str(res_path), str(path))
        assert got["acc"] == pytest.approx(want["acc"]) and got["unanswered"] == 0
        for t in ("yes_no", "number", "other"):
            assert got[f"acc_{t}"] == pytest.approx(want[f"acc_{t}"])
    labels = tmp_path / "minival.json"
    labels.write_text(json.dumps([{"question_id": recs[0]["question_id"],
                                   "label": {preds[recs[0]["question_id"]]: 0.6}},
                                  {"question_id": 5, "label": {"x": 1.0}}]))
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"question_id": recs[0]["question_id"],
                                "answer": preds[recs[0]["question_id"]]}]))
    got = S.score_file(str(one), str(labels))
    assert got["acc"] == pytest.approx(0.6) and got["unanswered"] == 1
    with pytest.raises(ValueError, match="not in the annotations"):
        S.score_file(str(res_path), str(labels))
    from mplug_jax import scoring
    assert scoring.score_file("vqa", str(res_path), str(v2))["acc"] == pytest.approx(want["acc"])


def test_decode_official_post_processing():
    tok = tokenizer.get_tokenizer()
    ids = [tokenizer.CLS_ID, tok.token_to_id("don"), tok.token_to_id("'"), tok.token_to_id("t"),
           tokenizer.SEP_ID, tok.token_to_id("##s"), tokenizer.PAD_ID]
    # "[CLS] don ' t [SEP]s [PAD]" -> clean-up turns " ' " into "'"; [SEP] glued "##s" kept.
    assert tok.decode_official(ids) == "don't s"
    assert tok.decode_official([tokenizer.CLS_ID, tok.token_to_id("2"), tokenizer.SEP_ID]) == "2"


def test_rank_agrees_with_brute_force_scoring(small_task):
    """ALBEF-style ranking with k = all candidates picks the brute-force best full-answer
    log-likelihood (same values); with k < C, the best of its first-token top-k."""
    task, params = small_task
    b = _batch(1)
    r = np.random.default_rng(3)
    c, lc = 6, 5
    cand = r.integers(tokenizer.MASK_ID + 1, V, (c, lc)).astype(np.int32)
    cand[:, 0] = tokenizer.CLS_ID
    lengths = np.array([3, 4, 5, 3, 4, 5])
    cmask = (np.arange(lc)[None] < lengths[:, None]).astype(np.int32)
    cand = cand * cmask
    cand[np.arange(c), lengths - 1] = tokenizer.SEP_ID
    img, q, qm = b["image"], b["question_ids"], b["question_mask"]
    states, smask = task.states(params, img, q, qm)
    all_ids = np.broadcast_to(cand, (2, c, lc))
    logits = task.answer_logits(params, states, smask, all_ids, np.broadcast_to(cmask, (2, c, lc)))
    brute = -np.asarray(answer_nll(logits.reshape(2 * c, lc, -1), all_ids.reshape(-1, lc),
                                   np.broadcast_to(cmask, (2, c, lc)).reshape(-1, lc))
                        ).reshape(2, c)
    full = task.rank(params, img, q, qm, cand, cmask, k=c)
    np.testing.assert_array_equal(np.asarray(full["best"]), brute.argmax(-1))
    got = np.take_along_axis(brute, np.asarray(full["topk"]), 1)
    np.testing.assert_allclose(np.asarray(full["loglik"]), got, rtol=1e-5, atol=1e-5)
    part = task.rank(params, img, q, qm, cand, cmask, k=3)
    topk = np.asarray(part["topk"])
    first = jax.nn.softmax(task.model.apply(
        {"params": params}, jnp.full((2, 1), tokenizer.CLS_ID), jnp.ones((2, 1), jnp.int32),
        states, smask, method="decode")[:, 0], -1)[:, cand[:, 1]]
    np.testing.assert_array_equal(np.sort(topk, 1),
                                  np.sort(np.argsort(-np.asarray(first), 1)[:, :3], 1))
    for i in range(2):
        assert int(part["best"][i]) == topk[i][np.argmax(brute[i, topk[i]])]


def test_evaluator_ranking_mode_answers_from_the_candidate_list():
    """ecfg.rank_answers: every answer is a candidate of the built-in list, the batch is padded
    (10 questions, batch 8), the result file covers every question and scores as reported."""
    c = small_config(vocab_size=30522)
    c.evals.val.update(num_examples=10, batch_size=8, rank_answers=True, rank_k=4,
                       num_examples_shown=2)
    task = tasks.build(c)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    ev = vqa_eval.Evaluator(task.predict_fns(), c.evals.val, c)
    res = ev.run(params)
    rows = res["files"][vqa_eval.RESULT_FILE]
    assert len(rows) == 10 == res["n"] and len(res["examples"]) == 2
    assert all(r["answer"] in synthetic.vqa_answer_vocabulary() for r in rows)
    preds = {r["question_id"]: r["answer"] for r in rows}
    assert S.evaluate(preds, ev.annotations)["acc"] == pytest.approx(res["acc"])
    assert "VQA accuracy" in ev.report(res)


def test_configs_official_values_and_refusals():
    for variant, res, batch in (("base", 384, 1024), ("large", 336, 2048)):
        c = vqa_config.get_config(variant)
        assert (c.model.image_size, c.input.batch_size, c.total_epochs) == (res, batch, 8.0)
        assert c.optim.lr == 3e-5 and c.optim.lr * c.optim.lr_groups.vision.mult == \
            pytest.approx(5e-6)
        assert (c.optim.wd, c.optim.end_lr, c.optim.warmup_steps, c.optim.clip_norm) == (
            0.02, 1e-6, 400, 1.0)
        assert c.input.add_ocr and c.input.add_object and c.input.max_question_tokens == 80
        assert (c.evals.val.beam_size, c.evals.val.min_length, c.evals.val.max_length) == (
            5, 1, 10)
        with pytest.raises(ValueError, match="allow_synthetic=True"):
            tasks.get_class("vqa").train_input(c)
        with pytest.raises(ValueError, match="allow_scratch=True"):
            tasks.build(c).init_from_pretrained(None)
    decayed = {"vision/blocks_0/ln_1/scale": True, "visn_ln/scale": True,
               "vision/pos_embed": True, "text/embeddings/word/embedding": True,
               "decoder/decoder/layer_0/self_ln/scale": False, "text/embeddings/ln/scale": False,
               "decoder/lm_ln/scale": False, "decoder/lm_bias": False,
               "vision/blocks_0/attn/qkv/bias": False, "fusion/layer_0/text/mlp_ln/scale": False}
    tree = {k: jnp.zeros(()) for k in decayed}
    mask = optim.decay_mask(tree, vqa_config.OFFICIAL_NO_WD)
    assert mask == decayed


def test_frozen_heads_get_no_update():
    c = vqa_config.get_config("tiny").optim
    params = {"itm_head": {"kernel": jnp.ones((2, 2))}, "temp": jnp.float32(0.07),
              "vision": {"w": jnp.ones((2,))}, "decoder": {"w": jnp.ones((2,))}}
    tx, _ = optim.make_optimizer(c, params, 10)
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    for _ in range(3):
        upd, state = tx.update(grads, state, params)
    assert float(jnp.abs(upd["itm_head"]["kernel"]).max()) == 0 and float(upd["temp"]) == 0
    assert float(jnp.abs(upd["decoder"]["w"]).min()) > 0


def test_init_from_pretraining_workdir_at_a_new_resolution(pretrain_workdir):
    """init.checkpoint = a pretraining workdir: every array loads into the VQA task's tree
    (same MPLUG), the position embedding resampled from 2x2 to 3x3 patches."""
    from mplug_jax.models.vit import resample_posemb
    _, src, _ = workdir.restore_params(pretrain_workdir)
    c = small_config(vocab_size=30522)
    c.model.image_size = 48
    c.init.checkpoint = str(pretrain_workdir)
    s = trainer.setup(c, steps_per_epoch=1)
    state = jax.device_get(s.task.init_from_pretrained(trainer.init_state(s, c.seed)))
    got = {k: np.asarray(v) for k, v in P.flatten(state.params).items()}
    want = {k: np.asarray(v) for k, v in P.flatten(jax.device_get(src)).items()}
    assert got.keys() == want.keys()
    np.testing.assert_allclose(got["vision/pos_embed"], resample_posemb(
        want["vision/pos_embed"], 3), rtol=1e-6)
    for k in want:
        if k != "vision/pos_embed":
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def question_prior_accuracy(train_size: int, heldout) -> float:
    """VQA accuracy of answering each question with its most frequent training answer (a
    blind, question-only baseline)."""
    import collections
    counts: dict = collections.defaultdict(collections.Counter)
    tr = synthetic.SyntheticVQA("train", train_size, image_size=16)
    for i in range(train_size):
        r = tr[i]
        counts[r["question"]].update(r["answer"])
    general = collections.Counter()
    for cnt in counts.values():
        general.update(cnt)
    guess = [(counts.get(r["question"]) or general).most_common(1)[0][0] for r in heldout]
    return float(np.mean([S.vqa_accuracy(g, r["answer"]) for g, r in zip(guess, heldout)]))
