"""mPLUG-2 video captioning task: the release's prompt handling (glued vs spaced prompt ids,
prompt_length masking), the caption loss (hand-built and against the official fixture), bad
configs, a smoke fine-tune whose eval writes the result files, and the evaluator on the task's
predict fns."""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import assert_rejected

from configs.mplug2 import video_caption as cfg_lib
from mplug_jax import tasks
from mplug_jax.data.formats import video_caption as video_caption_format
from mplug_jax.mplug2 import input as mplug2_input
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import video
from mplug_jax.evaluators import common as evaluators
from mplug_jax.evaluators import video_caption as ev_lib
from mplug_jax.mplug2.tasks import video_caption as m2cap

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "fixtures-mplug2", "mplug2-videoqa-tiny-b")


def _config(tmp_path, **task):
    c = cfg_lib.get_config("tiny")
    c.input.synthetic_dir = str(tmp_path / "data")
    c.input.update(train_size=4, eval_size=4, batch_size=4)
    c.task.generation.update(beam_size=2, min_length=1, max_length=6)
    c.task.update(task)
    return c


def test_prompt_join_and_prompt_length_token_ids():
    """'release' glues prompt and caption ("ofan" -> of ##an), 'space' does not; the release's
    prompt_length (3) leaves 'of' a target; pre_caption and truncation to max tokens."""
    cap = "An astronaut, in a white suit."
    assert mplug2_input.caption_text(cap, "a video of") == \
        "a video ofan astronaut in a white suit[SEP]"
    assert mplug2_input.caption_text(cap, "a video of", "space") == \
        "a video of an astronaut in a white suit[SEP]"
    assert mplug2_input.caption_text(cap, "", "space") == "an astronaut in a white suit[SEP]"
    rel, m = mplug2_input.encode_captions([cap], "a video of", "release", 12)
    spc, _ = mplug2_input.encode_captions([cap], "a video of", "space", 12)
    # [CLS] a video of ##an astronaut in a white suit [SEP] (official fixture ids)
    assert rel[0].tolist() == [101, 1037, 2678, 1997, 2319, 19748, 1999, 1037, 2317, 4848, 102, 0]
    assert spc[0].tolist() == [101, 1037, 2678, 1997, 2019, 19748, 1999, 1037, 2317, 4848, 102, 0]
    assert m[0].tolist() == [1] * 11 + [0]
    assert mplug2_input.prompt_length("a video of") == 3 and mplug2_input.prompt_length("") == 0
    cut, cm = mplug2_input.encode_captions([cap], "a video of", "release", 6)
    assert cut[0].tolist() == [101, 1037, 2678, 1997, 2319, 19748] and cm.all()  # [SEP] cut
    with pytest.raises(ValueError, match="prompt_join must be one of"):
        mplug2_input.caption_text(cap, "a video of", "glue")
    # The release's post-processing removes the prompt from glued and spaced outputs alike.
    tok = tokenizer.get_tokenizer()
    for join in ("release", "space"):
        ids, _ = mplug2_input.encode_captions(["a red circle moves left"], "a video of", join, 20)
        assert m2cap.decode_caption(ids[0]) == "a red circle moves left"
        assert tok.decode_official(ids[0]).startswith("a video of")
    assert m2cap.decode_caption([101, 2417, 4418, 102]) == "red circle"


@pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="../shared/fixtures-mplug2 absent")
def test_caption_ids_and_loss_match_the_official_fixture(tmp_path):
    """The fixture's caption_input_ids are our 'release' encoding, and the task loss on the
    official weights equals the release's caption_loss (docs/fixtures.md#mplug-2-losses, atol
    9e-6)."""
    from mplug_jax.mplug2 import convert as mplug2_convert
    with open(os.path.join(FIXTURE, "text.json")) as f:
        text = json.load(f)
    inputs = dict(np.load(os.path.join(FIXTURE, "inputs.npz")))
    want_ids = inputs["caption_input_ids"]
    ids, mask = mplug2_input.encode_captions([c["raw"] for c in text["captions"]], "a video of",
                                             "release", 20)
    np.testing.assert_array_equal(ids[:, :want_ids.shape[1]], want_ids)
    np.testing.assert_array_equal(mask[:, :want_ids.shape[1]], inputs["caption_attention_mask"])
    assert (ids[:, want_ids.shape[1]:] == 0).all()
    labels = inputs["caption_labels"]
    assert (labels[:, :3] == -100).all() and (labels[:, 3] == 1997).all()  # 'of' is a target

    conv = mplug2_convert.load_official(os.path.join(FIXTURE, "model.safetensors"),
                                        os.path.join(FIXTURE, "config_bert.json"),
                                        os.path.join(FIXTURE, "config_caption.yaml"))
    task = tasks.build(_config(tmp_path))
    task.model = task.train_model = conv.model
    batch = {"video": jnp.asarray(inputs["video"]).transpose(0, 2, 3, 4, 1),
             "caption_ids": jnp.asarray(ids), "caption_mask": jnp.asarray(mask)}
    with jax.default_matmul_precision("highest"):
        loss, (metrics, _) = task.loss(nn.meta.unbox(conv.params), {}, batch,
                                       jax.random.PRNGKey(0), 0)
    want = float(np.load(os.path.join(FIXTURE, "expected.npz"))["caption_loss"])
    assert abs(float(loss) - want) <= 9e-6, (float(loss), want)
    assert float(metrics["target_tokens"]) == float((labels[:, 1:] != -100).sum())


def test_loss_hand_built_and_bad_configs(tmp_path):
    """Loss = mean NLL over positions >= prompt_length with a token (hand-computed from the
    teacher-forced logits); bad task / input / eval settings are clear ValueErrors."""
    c = _config(tmp_path)
    task = tasks.build(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    src = mplug2_input.caption_source(c.input, "train")
    assert len(src) == 4 * c.input.refs_per_video and "caption" in src[0]
    b = next(iter(mplug2_input.caption_dataset(
        src, c.input, num_frames=4, image_size=32, batch_size=4, prompt="a video of",
        join="release", train=True)))
    assert b["video"].shape == (4, 4, 32, 32, 3) and b["caption_ids"].shape == (4, 20)
    assert (b["caption_ids"][:, :4] == [101, 1037, 2678, 1997]).all()
    b = {k: jnp.asarray(v) for k, v in b.items()}
    loss, (metrics, _) = jax.jit(task.loss)(params, {}, b, jax.random.PRNGKey(1), 0)
    logits = np.asarray(jax.jit(lambda p, *x: task.model.apply(
        {"params": p}, *x, method=m2cap.caption_logits))(params, b["video"], b["caption_ids"],
                                                         b["caption_mask"]), np.float64)
    ids, mask = np.asarray(b["caption_ids"]), np.asarray(b["caption_mask"])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                               keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    total = n = 0
    for i in range(4):
        for t in range(3, 20):  # target positions 3.. ('of' onwards), real tokens only
            if mask[i, t]:
                total -= logp[i, t - 1, ids[i, t]]
                n += 1
    np.testing.assert_allclose(float(loss), total / n, rtol=2e-5)
    assert float(metrics["target_tokens"]) == n
    # prompt_loss='all': 'a' and 'video' are targets too (only [CLS] is not).
    all_c = _config(tmp_path, prompt_loss="all")
    assert tasks.build(all_c).prompt_len == 1 and task.prompt_len == 3
    got, valid = m2cap.caption_loss(jnp.asarray(logits, jnp.float32), b["caption_ids"],
                                    b["caption_mask"], 1)
    extra = -sum(logp[i, t - 1, ids[i, t]] for i in range(4) for t in (1, 2))
    np.testing.assert_allclose(float(got), (total + extra) / (n + 8), rtol=2e-5)
    assert int(valid.sum()) == n + 8

    assert_rejected(lambda: _config(tmp_path), tasks.build, (
        ("task.prompt_join", "glue", "prompt_join='glue'"),
        ("task.prompt_loss", "none", "prompt_loss='none'"),
        ("task.generation", dict(beam_size=2, min_length=6, max_length=6),
         "min_length < max_length"),
        ("input.max_caption_tokens", 4, "max_caption_tokens=4 leaves no caption token")))
    bad = _config(tmp_path)
    bad.input.dataset = "json"
    with pytest.raises(ValueError, match="input.dataset='json' needs input.annotations"):
        mplug2_input.caption_source(bad.input, "train")
    bad = _config(tmp_path)
    bad.init.allow_scratch = False
    with pytest.raises(ValueError, match="allow_scratch"):
        tasks.build(bad).init_from_pretrained(None)
    for k, v, match in (("prompt_strip", "cut", "prompt_strip must be one of"),
                        ("prompt", "", "needs the prompt")):
        e = dict(c.evals.val)
        e.update(synthetic_size=2, synthetic_dir=str(tmp_path / "ev"), **{k: v})
        with pytest.raises(ValueError, match=match):
            evaluators.build("val", type(c.evals.val)(e), c, task.predict_fns())


@pytest.fixture(scope="module")
def caption_workdir(tmp_path_factory):
    """A 3-step smoke fine-tune of tiny (trainer.run) whose final eval writes the results."""
    from mplug_jax import trainer
    tmp = tmp_path_factory.mktemp("m2cap")
    c = cfg_lib.get_config("tiny,mode=smoke")
    c.total_steps, c.ckpt_every_steps = 2, 2
    c.peak_flops = 1e11  # skip the CPU matmul measurement
    # One layer per stack (two universal layers, as the release): a quicker compile.
    c.model.update(vision_layers=1, text_layers=2, fusion_layers=1, decoder_layers=1)
    c.input.synthetic_dir = str(tmp / "data")
    c.input.update(train_size=8, batch_size=8)
    c.task.generation.update(beam_size=2, min_length=1, max_length=6)
    c.evals.val.update(synthetic_size=6, batch_size=8, synthetic_dir=str(tmp / "eval"),
                       metrics=("Bleu_1", "ROUGE_L", "CIDEr"), tokenize="simple")
    path = tmp / "run"
    out = trainer.run(c, str(path))
    return path, out, c


def test_smoke_finetune_writes_result_files_and_metrics(caption_workdir):
    path, out, c = caption_workdir
    res = path / "results" / "val_step2"
    rows = json.loads((res / ev_lib.MPLUG2_RESULT_FILE).read_text())
    assert len(rows) == 6 and set(rows[0]) == {"video_id", "pred_caption", "gold_caption"}
    assert all(len(r["gold_caption"]) == 5 and isinstance(r["pred_caption"], str) for r in rows)
    assert not any(r["pred_caption"].startswith("a video of") for r in rows)
    ours = json.loads((res / "caption_results.json").read_text())
    assert [r["pred_caption"] for r in ours] == [r["pred_caption"] for r in rows]
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "val/CIDEr" in x]
    assert evals and 0 <= evals[-1]["val/CIDEr"] and evals[-1]["val/num_videos"] == 6
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert losses and all(np.isfinite(losses)) and losses[0] > 5  # ~ln(30522) at init
    assert (path / "best" / "best.json").exists()


def test_eval_captions_are_the_task_predict_fns(caption_workdir):
    """The trainer's video_caption eval ran the task's predict fns: its captions are the task's
    `caption_beam` on the release's test frames (eval_clip of the segment-middle frames),
    decoded as the release (prompt split off), for every held-out video, in order."""
    from mplug_jax import workdir
    path, _, c = caption_workdir
    _, params, _ = workdir.restore_params(path)
    rows = json.loads((path / "results" / "val_step2" / ev_lib.MPLUG2_RESULT_FILE).read_text())
    root = c.evals.val.synthetic_dir
    src = video_caption_format.read(os.path.join(root, "video_caption.jsonl"),
                                    os.path.join(root, "frames"), train=False)
    assert [r["video_id"] for r in rows] == [src[i]["video_id"] for i in range(len(src))]
    assert [r["gold_caption"] for r in rows] == [src[i]["gold_captions"] for i in range(len(src))]
    clips = np.stack([video.eval_clip(video.load_frames(src[i]["video"], 4), 32)
                      for i in range(len(src))])
    task = tasks.build(c)
    assert task.model.decoder_layers == 1
    ids = np.asarray(jax.jit(task.caption_beam)(params, clips)["ids"])
    assert [m2cap.decode_caption(r) for r in ids] == [r["pred_caption"] for r in rows]


def test_evaluate_and_video_qa_load_the_caption_workdir(caption_workdir):
    """`mplug-jax evaluate` (evaluate.load_params) puts the workdir's params in through the
    task; a video QA config starts from the caption workdir (same backbone names); another
    task's workdir is refused by name."""
    from configs.mplug2 import video_qa as qa_cfg
    from mplug_jax import evaluate, workdir
    from mplug_jax.mplug2 import checkpoint as m2checkpoint
    path, _, c = caption_workdir
    _, want, _ = workdir.restore_params(path)
    want = flax.traverse_util.flatten_dict(nn.meta.unbox(want), sep="/")
    cfg = c.copy_and_resolve_references()
    cfg.evals = {"val": cfg.evals.val}
    _, got = evaluate.load_params(cfg, str(path))
    got = flax.traverse_util.flatten_dict(nn.meta.unbox(got), sep="/")
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    q = qa_cfg.get_config("tiny,mode=smoke")
    q.model = c.model
    flat, what = m2checkpoint.load(tasks.build(q).model, ml_collections.ConfigDict(
        {"checkpoint": str(path), "step": 0}), "mplug2.video_qa")
    assert set(flat) == set(want) and "mplug2.video_caption workdir" in what
    original = (path / "config.json").read_text()
    other = json.loads(original)
    other["task"]["name"] = "vqa"
    (path / "config.json").write_text(json.dumps(other))
    try:
        with pytest.raises(ValueError, match="is a 'vqa' workdir"):
            m2checkpoint.load(tasks.build(q).model, ml_collections.ConfigDict(
                {"checkpoint": str(path), "step": 0}), "mplug2.video_qa")
    finally:
        (path / "config.json").write_text(original)


# ---- SCST (mode=scst; mplug_jax/scst.py, shared with the image caption task) ----------------

def _scst_config(tmp_path):
    c = cfg_lib.get_config("tiny,mode=scst")
    c.model.update(vision_layers=1, text_layers=2, fusion_layers=1, decoder_layers=1)
    c.input.synthetic_dir = str(tmp_path / "data")
    c.input.update(train_size=4, batch_size=4)
    c.task.generation.update(beam_size=2, min_length=1, max_length=6)
    c.mesh.shape = dict(data=1, fsdp=1, tensor=1)
    c.init.allow_scratch = True
    c.evals = {}
    return c


def test_scst_rewards_and_a_train_step_match_a_hand_computation(tmp_path):
    """References = every training caption of the record's video; reward = CIDEr-D of the
    decoded hypothesis (prompt split off) vs them, baseline = mean of the video's K. One
    trainer step of the SCST stage: prepare_batch fills the search's K = 2 hypotheses and
    rewards, and the step's loss (on the initial params, with fixed advantages) equals
    mean -(score / n) * advantage, score = summed log-probs of the n generated tokens over
    the beam length penalty ((5 + n) / 6) ** 0.6, from the teacher-forced logits."""
    from mplug_jax import trainer
    from mplug_jax.data.pipeline import make_global_batch
    from mplug_jax.scoring import caption as scoring
    c = _scst_config(tmp_path)
    task = tasks.build(c)
    src = mplug2_input.caption_source(c.input, "train")
    refs = task.references()
    groups = task.groups(np.arange(len(src)))
    assert len(refs) == 4 and len(src) == 4 * c.input.refs_per_video
    for i in range(len(src)):
        same = [src[j]["caption"] for j in range(len(src))
                if src[j]["video_id"] == src[i]["video_id"]]
        assert refs[groups[i]] == [scoring.simple_tokenize(x.lower()) for x in same]
    j = next(j for j in range(len(src)) if groups[j] != groups[0])
    own, other = src[0]["caption"], src[j]["caption"]
    # Row 0: video 0's own caption (glued to the release's prompt, as the search may emit it:
    # decode_caption splits it off) and another video's; row 1: that video's, twice.
    texts = ["a video of" + own, other, other, other]
    ids, _ = mplug2_input.encode_captions(texts, "", "space", 20)
    g = np.array([groups[0], groups[j]])
    reward, adv = task.rewards(ids.reshape(2, 2, 20), g)
    scorer = scoring.CiderD(refs)
    tok = [scoring.simple_tokenize(t.lower()) for t in (own, other)]
    want = np.array([[scorer.score(tok[0], refs[g[0]]), scorer.score(tok[1], refs[g[0]])],
                     [scorer.score(tok[1], refs[g[1]])] * 2])
    np.testing.assert_allclose(reward, want, rtol=1e-6)
    assert reward[0, 0] > reward[0, 1] and np.all(adv[1] == 0)
    np.testing.assert_allclose(adv, want - want.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)

    c.total_steps = 1
    host = next(mplug2_input.caption_train_batches(c, 0, 1)[0])
    assert host["scst_ids"].shape == (4, 2, 7) and not host["scst_ids"].any()
    s = trainer.setup(c, 1)
    state = trainer.init_state(s, c.seed)
    params = jax.device_get(nn.meta.unbox(state.params))  # the step donates the state
    step = trainer.compile_step(s, c, trainer.global_batch_shapes(host))
    batch = s.task.prepare_batch(state.params, make_global_batch(host, s.mesh))
    got = {k: np.asarray(jax.device_get(batch[k])) for k in batch}
    again = s.task.prepare_batch(state.params, make_global_batch(host, s.mesh))
    np.testing.assert_array_equal(got["scst_ids"], np.asarray(again["scst_ids"]))
    assert (got["scst_ids"][..., 0] == tokenizer.CLS_ID).all()
    r, a = s.task.rewards(got["scst_ids"], s.task.groups(got["idx"]))
    np.testing.assert_array_equal(got["scst_reward"], r)
    np.testing.assert_array_equal(got["scst_advantage"], a)
    fixed = np.array([[1.5, -1.5], [0.25, -0.25], [1.0, -1.0], [-0.5, 0.5]], np.float32)
    batch = {**batch, "scst_advantage": make_global_batch({"a": fixed}, s.mesh)["a"]}
    state, m = step(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(m["train/loss_scst"]))

    flat = got["scst_ids"].reshape(8, 7)
    lengths = got["scst_lengths"].reshape(8)
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
    video = np.repeat(got["video"], 2, 0)
    logits = np.asarray(task.model.apply({"params": params}, video, flat, mask,
                                         method=m2cap.caption_logits), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    n = lengths - 1
    score = np.array([sum(logp[r, t, flat[r, t + 1]] for t in range(n[r])) for r in range(8)])
    score /= ((5 + n) / 6) ** 0.6
    want_loss = np.mean(-(score / n) * fixed.reshape(-1))
    np.testing.assert_allclose(float(m["train/loss_scst"]), want_loss, rtol=1e-5)


def test_scst_presets_and_config_errors(tmp_path):
    """The paper presets' SCST stage (B.2.3: 5 epochs, lr 1e-6, batch 16; the mPLUG
    release's SCST options), and one-line ValueErrors: SCST on a release preset, an unknown
    mode, bad task.scst values, and SCST without the cross-entropy stage's checkpoint."""
    from mplug_jax import config_checks, scst
    for variant in ("base_paper", "large_paper"):
        p = cfg_lib.get_config(f"{variant},mode=scst")
        config_checks.check(p, training=True, files=False)
        assert (p.total_epochs, p.total_steps, p.input.batch_size, p.optim.accum_steps) == \
            (5.0, 0, 16, 1)
        assert p.optim.lr == p.optim.end_lr == 1e-6 and p.optim.warmup_steps == 0
        assert p.optim.lr_groups.vision.mult == 1.0 and p.init.select == "best"
        assert not p.init.allow_scratch and p.task.scst.enabled and p.task.scst.mode == "beam"
        assert p.task.prompt == "what does the video describe?"
        assert p.task.generation.max_length == 25 and p.task.generation.beam_size == 5
        assert scst.options(p.task.scst) == dict(length_norm="official", search_dropout=True,
                                                 reward_tokenize="ptb", cider_df="batch")
        ce = cfg_lib.get_config(variant)
        assert not ce.task.scst.enabled and ce.optim.lr == 2e-5 and ce.input.batch_size == 128
    for arg, match in (("large,mode=scst", "the mPLUG-2 release has no SCST"),
                       ("base,mode=scst", "the mPLUG-2 release has no SCST"),
                       ("tiny,mode=rl", "unknown mode 'rl'")):
        with pytest.raises(ValueError, match=match) as e:
            cfg_lib.get_config(arg)
        assert "\n" not in str(e.value)
    for field, bad, match in (("cider_df", "corpus", r"^task\.scst\.cider_df='corpus'"),
                              ("search_dropout", 1, r"^task\.scst\.search_dropout=1"),
                              ("mode", "greedy", r"^task\.scst\.mode='greedy'"),
                              ("num_samples", 3, r"^task\.scst\.num_samples=3 must equal")):
        c = _scst_config(tmp_path)
        c.task.scst = {**c.task.scst.to_dict(), field: bad}
        with pytest.raises(ValueError, match=match) as e:
            tasks.build(c)
        assert "\n" not in str(e.value)
    c = _scst_config(tmp_path)
    c.init.allow_scratch = False
    with pytest.raises(ValueError, match="SCST stage starts from the cross-entropy stage: set "
                       r"--config.init.checkpoint=") as e:
        tasks.build(c).init_from_pretrained(None)
    assert "\n" not in str(e.value)
