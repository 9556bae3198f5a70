"""Captioning: CE loss, CIDEr-D, SCST loss and rewards, result files, Java errors, configs,
zero-shot prompts (learning: tests/learning/test_learn_caption.py)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import caption as caption_config
from mplug_jax import generate, scst, trainer
from mplug_jax.data.inputs import caption as caption_input
from mplug_jax.data.ops.tokenizer import CLS_ID, SEP_ID
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.scoring import caption as scoring
from mplug_jax.tasks import caption as caption_task

SMALL_MODEL = dict(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
                   fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
                   vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16)


def small_config(mode="ce"):
    c = caption_config.get_config(f"tiny,mode={mode}")
    c.model.update(SMALL_MODEL)
    c.input.update(batch_size=8, train_size=64, eval_size=16)
    c.task.generation.update(max_length=8)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.init.allow_scratch = True
    c.evals = {}
    return c


def _logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_targets_and_ce_loss_match_a_hand_computation():
    """Targets are `[CLS] prompt + caption [SEP]` (lowercased, prompt tokens kept in the loss
    as the official); the loss is the mean next-token nll over valid targets, on image-only
    decoder states."""
    assert caption_input.target_text("A Red Circle", "a picture of") == \
        "a picture of a red circle [SEP]"
    ids, mask = caption_input.encode_targets([caption_input.target_text("a red circle")], 8)
    assert ids[0, 0] == CLS_ID and ids[0, 4] == SEP_ID and mask[0].tolist() == [1] * 5 + [0] * 3
    cfg = small_config()
    task = caption_task.Task(cfg)
    params = task.init_params(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    it, n = caption_input.train_batches(cfg, 0, 1)
    assert n == 64 * 5  # one record per reference
    batch = next(it)
    loss, (m, _) = jax.jit(task.loss)(params, {}, batch, jax.random.PRNGKey(1), jnp.int32(0))

    @jax.jit
    def decode(params, image, ids, mask):
        img = task.model.apply({"params": params}, image, method="encode_image")
        return task.model.apply({"params": params}, ids, mask, img,
                                jnp.ones(img.shape[:2], jnp.int32), method="decode")

    logits = np.asarray(decode(params, batch["image"], batch["dec_ids"], batch["dec_mask"]),
                        np.float64)
    lp = _logsoftmax(logits[:, :-1])
    tgt = batch["dec_ids"][:, 1:]
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    valid = batch["dec_mask"][:, 1:] > 0
    np.testing.assert_allclose(float(loss), nll[valid].mean(), rtol=1e-5)
    assert float(m["target_tokens"]) == valid.sum()


def test_cider_d_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    refs = [["a red circle on a white background", "a red circle", "there is a red circle"],
            ["two blue squares", "an image of two blue squares", "two blue squares"],
            ["a green triangle left of a red square", "a green triangle and a red square"],
            ["three yellow circles", "there are three yellow circles on a gray background"]]
    cands = ["a red circle", "blue squares", "a green triangle left of a square",
             "a purple circle"]
    want_mean, want = Cider().compute_score(dict(enumerate(refs)),
                                            {i: [c] for i, c in enumerate(cands)})
    got = scoring.CiderD(refs).scores(cands, refs)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] > got[3] and got.mean() == pytest.approx(want_mean)
    # Fixed (training) document frequencies: a candidate's score does not depend on the batch.
    scorer = scoring.CiderD(refs)
    assert scorer.score(cands[0], refs[0]) == scorer.scores(cands[:1], refs[:1])[0]
    assert scoring.simple_tokenize("A red, circle.") == "a red circle"


def test_scst_loss_and_rewards_match_a_hand_computation():
    """Rewards = CIDEr-D vs the image's references (training document frequencies), baseline
    = mean of the K; loss = mean of -(score / n) * (reward - baseline) with score = the
    length-penalised sum of teacher-forced log-probs of the n generated tokens."""
    cfg = small_config("scst")
    cfg.task.generation.update(beam_size=2)
    task = caption_task.Task(cfg)
    params = task.init_params(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    tok = caption_input.encode_targets
    split = caption_input.load_split(cfg.input, "train", 32, 0)
    ref0 = split.references[0][0]
    # Image 0: hypothesis 0 = one of its references, hypothesis 1 = a wrong caption.
    texts = [ref0, "a purple triangle", "a green circle", "a green circle"]
    ids, mask = tok([caption_input.target_text(t) for t in texts], 16)
    assert mask[:, -1].max() == 0  # nothing truncated
    ids = ids.reshape(2, 2, 16)
    lengths = mask.sum(-1).reshape(2, 2)
    reward, adv = task.rewards(ids, np.array([0, 1]))
    refs = [[scoring.simple_tokenize(r) for r in rr] for rr in split.references]
    scorer = scoring.CiderD(refs)
    want = np.array([[scorer.score(ref0, refs[0]), scorer.score("a purple triangle", refs[0])],
                     [scorer.score("a green circle", refs[1])] * 2])
    np.testing.assert_allclose(reward, want, rtol=1e-6)
    assert reward[0, 0] > reward[0, 1]
    np.testing.assert_allclose(adv, want - want.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)
    # 'sample' mode: the baseline is the reward of the greedy caption.
    greedy = ids[:, 1]  # image 0: the wrong caption; image 1: "a green circle"
    _, adv_g = task.rewards(ids, np.array([0, 1]), greedy)
    np.testing.assert_allclose(adv_g, want - want[:, 1:], rtol=1e-5, atol=1e-6)

    image = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    batch = {"image": image, "scst_ids": ids, "scst_lengths": lengths,
             "scst_advantage": np.array([[1.5, -1.5], [0.25, -0.25]], np.float32),
             "scst_reward": reward}
    loss, (m, _) = jax.jit(task.loss)(params, {}, batch, jax.random.PRNGKey(0), jnp.int32(0))

    @jax.jit
    def decode(params, image, ids, mask):
        img = jnp.repeat(task.model.apply({"params": params}, image, method="encode_image"), 2, 0)
        return task.model.apply({"params": params}, ids, mask, img,
                                jnp.ones(img.shape[:2], jnp.int32), method="decode")

    flat = ids.reshape(4, 16)
    mask = (np.arange(16)[None] < lengths.reshape(4, 1)).astype(np.int32)
    logits = np.asarray(decode(params, image, flat, mask), np.float64)
    lp = np.take_along_axis(_logsoftmax(logits[:, :-1]), flat[:, 1:, None], -1)[..., 0]
    n = lengths.reshape(-1) - 1
    score = np.array([lp[r, :n[r]].sum() for r in range(4)]) / ((5 + n) / 6) ** 0.6
    want_loss = np.mean(-(score / n) * batch["scst_advantage"].reshape(-1))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert float(m["scst_reward"]) == pytest.approx(reward.mean())
    # length_norm='official': the official divides by the generated tokens + 1 ([CLS] counted).
    cfg.task.scst.length_norm = "official"
    official = caption_task.Task(cfg)
    loss_off, _ = jax.jit(official.loss)(params, {}, batch, jax.random.PRNGKey(0), jnp.int32(0))
    want_off = np.mean(-(score / (n + 1)) * batch["scst_advantage"].reshape(-1))
    np.testing.assert_allclose(float(loss_off), want_off, rtol=1e-5)
    assert abs(want_off - want_loss) > 1e-3 * abs(want_loss)
    # cider_df='batch': document frequencies from the batch rows' references only.
    cfg.task.scst.cider_df = "batch"
    reward_b, adv_b = caption_task.Task(cfg).rewards(ids, np.array([0, 1]))
    batch_scorer = scoring.CiderD([refs[0], refs[1]])
    want_b = np.array([[batch_scorer.score(ref0, refs[0]),
                        batch_scorer.score("a purple triangle", refs[0])],
                       [batch_scorer.score("a green circle", refs[1])] * 2])
    np.testing.assert_allclose(reward_b, want_b, rtol=1e-6)
    np.testing.assert_allclose(adv_b, want_b - want_b.mean(1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    assert np.abs(reward_b - reward).max() > 1e-3  # other document frequencies, other rewards


def test_scst_rewards_with_the_ptb_tokenizer(monkeypatch):
    """reward_tokenize='ptb': references and hypotheses go through pycocoevalcap's PTB
    tokenizer (one Java call per batch), rewards = CIDEr-D of those tokens."""
    if shutil.which("java") is None:
        pytest.skip("reward_tokenize='ptb' runs the PTB tokenizer, which needs java on PATH")
    cfg = small_config("scst")
    cfg.task.generation.update(beam_size=2)
    cfg.task.scst.reward_tokenize = "ptb"
    task = caption_task.Task(cfg)
    calls = []

    def spy(texts):
        calls.append(list(texts))
        return ptb(texts)

    ptb = scoring.ptb_tokenize
    monkeypatch.setattr(scoring, "ptb_tokenize", spy)
    split = caption_input.load_split(cfg.input, "train", 32, 0)
    texts = ["A red circle.", "a purple triangle, here", "a green circle", "two blue squares"]
    ids, _ = caption_input.encode_targets([caption_input.target_text(t) for t in texts], 16)
    reward, _ = task.rewards(ids.reshape(2, 2, 16), np.array([0, 1]))
    flat = iter(ptb([r.lower() for rr in split.references for r in rr]))
    refs = [[next(flat) for _ in rr] for rr in split.references]
    assert task.references() == refs
    hyps = [scoring.decode_text(x) for x in ids]
    assert calls[-1] == hyps and len(calls) == 2  # the training references, then the batch
    scorer = scoring.CiderD(refs)
    tok = ptb(hyps)
    want = [[scorer.score(tok[0], refs[0]), scorer.score(tok[1], refs[0])],
            [scorer.score(tok[2], refs[1]), scorer.score(tok[3], refs[1])]]
    np.testing.assert_allclose(reward, want, rtol=1e-6)
    assert ptb(["It isn't a red circle."]) == ["it is n't a red circle"]


def test_scst_search_dropout_depends_on_the_key_and_a_step_runs_with_the_official_options():
    """search_dropout=True (dropout_rate > 0): the beam hypotheses depend on the search key;
    False: the deterministic search, whatever the key. One SCST train step with every
    official option (PTB only where Java is installed)."""
    cfg = small_config("scst")
    cfg.model.dropout_rate = 0.3
    cfg.task.generation.update(beam_size=2)
    cfg.task.scst.search_dropout = True
    task = caption_task.Task(cfg)
    params = task.init_params(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    image = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    search = jax.jit(task.scst_search)
    keys = [jax.random.PRNGKey(i) for i in range(3)]
    outs = [np.asarray(search(params, image, k)["ids"]) for k in keys]
    np.testing.assert_array_equal(outs[0], np.asarray(search(params, image, keys[0])["ids"]))
    assert any((o != outs[0]).any() for o in outs[1:])
    cfg.task.scst.search_dropout = False
    plain = caption_task.Task(cfg)
    det = jax.jit(plain.scst_search)
    a, b = (det(params, image, k) for k in keys[:2])
    np.testing.assert_array_equal(a["ids"], b["ids"])
    states, smask = plain.states(params, image)
    ref = generate.beam_search(plain.model, params, states, smask, beam_size=2,
                               min_length=plain.min_length, max_length=plain.max_length,
                               alpha=plain.alpha)
    np.testing.assert_array_equal(a["ids"], ref["ids"])
    # The decoder's own dropout (generate's `rng` hook), on fixed states.
    dec = jax.jit(lambda k: generate.beam_search(
        task.train_model, params, states, smask, beam_size=2, min_length=plain.min_length,
        max_length=plain.max_length, alpha=plain.alpha, rng=k)["ids"])
    d0 = np.asarray(dec(keys[0]))
    np.testing.assert_array_equal(d0, np.asarray(dec(keys[0])))
    assert any((np.asarray(dec(k)) != d0).any() for k in keys[1:])

    java = shutil.which("java") is not None
    cfg.task.scst.update(length_norm="official", search_dropout=True, cider_df="batch",
                         reward_tokenize="ptb" if java else "simple")
    cfg.total_steps = 1
    host = next(caption_input.train_batches(cfg, 0, 1)[0])
    s = trainer.setup(cfg, 1)
    state = trainer.init_state(s, cfg.seed)
    step = trainer.compile_step(s, cfg, trainer.global_batch_shapes(host))
    batch = s.task.prepare_batch(state.params, make_global_batch(host, s.mesh))
    again = s.task.prepare_batch(state.params, make_global_batch(host, s.mesh))
    for k in ("scst_ids", "scst_reward"):  # deterministic given params and batch
        np.testing.assert_array_equal(jax.device_get(batch[k]), jax.device_get(again[k]))
    state, m = step(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(m["train/loss_scst"]))


def test_scst_options_refuse_bad_values():
    for field, bad in (("length_norm", "n+1"), ("search_dropout", 1),
                       ("reward_tokenize", "nltk"), ("cider_df", "corpus")):
        cfg = small_config("scst")
        cfg.task.scst = {**cfg.task.scst.to_dict(), field: bad}
        with pytest.raises(ValueError, match=rf"^task\.scst\.{field}=.*; valid: ") as e:
            caption_task.Task(cfg)
        assert "\n" not in str(e.value)
    for variant in ("base", "large", "large_paper"):
        block = caption_config.get_config(f"{variant},mode=scst").task.scst
        assert scst.options(block) == dict(
            length_norm="official", search_dropout=True, reward_tokenize="ptb",
            cider_df="batch"), variant
    assert scst.options(small_config("scst").task.scst) == dict(
        length_norm="generated", search_dropout=False, reward_tokenize="simple",
        cider_df="train")
    assert scst.options({}) == scst.options(
        small_config("scst").task.scst)


def test_result_files_round_trip(tmp_path):
    """Official and COCO-server result files score the same as `evaluate` on the same
    captions; a result file missing images is refused."""
    ds = caption_input.SyntheticCaptions("heldout", 6, image_size=16)
    entries = ds.karpathy()
    assert all(len(e["sentences"]) == 5 for e in entries)
    ann = tmp_path / "ann.json"
    caption_input.write_karpathy(entries, str(ann))
    ids = [e["filename"] for e in entries]
    refs = [[s["raw"] for s in e["sentences"]] for e in entries]
    preds = [r[0] for r in refs[:3]] + ["a red circle"] * 3
    kw = dict(metrics=("Bleu_4", "ROUGE_L", "CIDEr"))
    want = scoring.evaluate(preds, refs, **kw)
    for form in ("official", "coco"):
        path = str(tmp_path / f"res_{form}.json")
        scoring.write_results(path, ids, preds, refs, form=form)
        got = scoring.score_file(path, str(ann), **kw)
        assert got["num_images"] == 6
        for k, v in want.items():
            assert got[k] == pytest.approx(v), (form, k)
    assert 0 < want["CIDEr"] < 10
    scoring.write_results(str(tmp_path / "part.json"), ids[:5], preds[:5], form="coco")
    with pytest.raises(ValueError, match="1 annotated images without a result"):
        scoring.score_file(str(tmp_path / "part.json"), str(ann))


def test_java_missing_names_the_metric(monkeypatch):
    monkeypatch.setattr(scoring.shutil, "which", lambda name: None)
    with pytest.raises(scoring.JavaMissingError, match="PTB tokenizer.*install a Java"):
        scoring.evaluate(["a red circle"], [["a red circle"]])
    with pytest.raises(scoring.JavaMissingError, match="METEOR runs on Java"):
        scoring.evaluate(["a red circle"], [["a red circle"]], metrics=("METEOR",),
                         tokenize="simple")
    # Without Java the pure-Python metrics still work.
    out = scoring.evaluate(["a red circle"], [["a red circle"]], metrics=("CIDEr", "ROUGE_L"),
                           tokenize="simple")
    assert out["ROUGE_L"] == pytest.approx(1.0)


def test_meteor_jvm_is_reused_and_restarted_with_the_same_scores():
    """One METEOR JVM serves every evaluation of a process: later requests (another corpus in
    between) reply as a fresh JVM does; a JVM that died is started again."""
    if shutil.which("java") is None:
        pytest.skip("METEOR needs java on PATH")
    from pycocoevalcap.meteor.meteor import Meteor
    a = ({0: ["a red circle on grey"], 1: ["two blue squares"]},
         {0: ["a red circle"], 1: ["blue squares"]})
    b = ({0: ["a green triangle"]}, {0: ["a big green triangle"]})
    fresh = Meteor()
    want_a, want_b = (float(fresh.compute_score(*x)[0]) for x in (a, b))
    del fresh
    first = scoring.meteor_score(*a)
    pid = scoring._METEOR["scorer"].meteor_p.pid
    assert scoring.meteor_score(*b) == want_b
    assert scoring.meteor_score(*a) == first == want_a
    assert scoring._METEOR["scorer"].meteor_p.pid == pid
    scoring._METEOR["scorer"].meteor_p.kill()
    scoring._METEOR["scorer"].meteor_p.wait()
    assert scoring.meteor_score(*a) == want_a
    assert scoring._METEOR["scorer"].meteor_p.pid != pid


@pytest.mark.parametrize("variant", ["base", "large"])
def test_base_and_large_follow_the_official_recipe_and_refuse_shortcuts(variant):
    c = caption_config.get_config(variant)
    assert c.model.image_size == {"base": 384, "large": 336}[variant]
    assert (c.optim.lr, c.optim.lr_groups.vision.mult, c.optim.wd) == (1e-5, 0.5, 0.02)
    assert (c.input.batch_size, c.optim.accum_steps, c.total_epochs) == (1024, 4, 5.0)
    assert dict(c.task.generation) == dict(beam_size=5, min_length=8, max_length=25, alpha=0.6)
    assert c.task.prompt == "" and c.input.max_tokens == 25
    s = caption_config.get_config(f"{variant},mode=scst")
    assert s.task.scst.enabled and s.optim.lr == 1e-6 and s.optim.lr_groups.vision.mult == 1.0
    assert s.optim.end_lr == 8e-8 and s.optim.accum_steps == 1
    assert caption_config.get_config(f"{variant},mode=zeroshot").task.zero_shot_prompt == \
        "a picture of"
    with pytest.raises(ValueError, match="refuses the built-in synthetic"):
        caption_task.Task.train_input(c)
    c.model.update(SMALL_MODEL, dtype="float32", remat_policy="none", scan_layers=False)
    c.input.update(batch_size=8, allow_synthetic=True, train_size=8, eval_size=8)
    c.optim.accum_steps = 1
    c.mesh.shape, c.mesh.sharding, c.evals = dict(data=1, fsdp=1, tensor=1), "dp", {}
    s = trainer.setup(c, steps_per_epoch=1)
    with pytest.raises(ValueError, match="init.checkpoint"):
        s.task.init_from_pretrained(trainer.init_state(s, 0))


# ---- learning -----------------------------------------------------------------------------


def test_zero_shot_prompt_goes_through_the_encoder_as_pretraining_prefixes():
    """Zero-shot states = [fused image; fused '[CLS] a picture of'] (what the prefix-LM decoder
    saw in pretraining); fine-tuned states = the image embeddings alone."""
    cfg = small_config("zeroshot")
    task = caption_task.Task(cfg)
    params = task.init_params(jax.random.PRNGKey(0))
    image = jnp.zeros((2, 32, 32, 3))
    states, smask = jax.jit(task.states)(params, image)
    assert states.shape == (2, 5 + 4, 32) and smask.shape == (2, 9)  # 4 patches + CLS; 4 tokens
    cfg.task.zero_shot_prompt = ""
    states, smask = jax.jit(caption_task.Task(cfg).states)(params, image)
    assert states.shape == (2, 5, 32) and int(smask.sum()) == 10
    assert caption_task.decode_text([CLS_ID, 1037, 2417, 4418, SEP_ID], "a") == "red circle"
    with pytest.raises(ValueError, match="zero_shot_prompt is for evaluating"):
        caption_task.Task(_with(small_config("scst"), zero_shot_prompt="a picture of"))


def _with(c, **task_fields):
    c.task.update(task_fields)
    return c
