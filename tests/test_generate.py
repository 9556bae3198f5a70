"""Generation engine: the key/value-cached decoder equals full recomputation (logits at every
position, greedy tokens), in both layer layouts, and the cache adds nothing to the params."""
import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from configs.common import model_config
from mplug_jax import generate
from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
from mplug_jax.models.mplug import MPLUG

# `tiny` shrunk as tests/test_trainer.py's loop_config, with 2 decoder layers (stacked cache).
SMALL = dict(hidden_size=32, num_heads=2, mlp_dim=64, text_layers=1, fusion_layers=2,
             fusion_stride=1, decoder_layers=2, image_size=32, patch_size=16,
             vision_width=32, vision_layers=1, vision_heads=2, embed_dim=16)
B, S, D = 3, 5, 32


class Setup:
    """A float32 model, its params, random encoder states (row 1 padded) and jitted searches."""

    def __init__(self, scan: bool, remat: str = "none"):
        self.model = model = MPLUG.from_config(model_config("tiny"), **SMALL, scan_layers=scan,
                                               remat_policy=remat)
        image = np.zeros((1, 32, 32, 3), np.float32)
        ids, mask = np.full((1, 4), 1000, np.int32), np.ones((1, 4), np.int32)
        self.params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), image, ids, mask,
                                                        ids, mask)["params"])
        r = np.random.default_rng(1)
        self.states = jnp.asarray(r.normal(size=(B, S, D)), jnp.float32)
        self.smask = jnp.ones((B, S), jnp.int32).at[1, 3:].set(0)

        def full_logits(params, ids):
            """Uncached: the whole sequence through `MPLUG.decode` (causal mask only)."""
            return model.apply({"params": params}, ids, jnp.ones_like(ids), self.states,
                               self.smask, method="decode")

        def uncached_greedy(params, prefix, max_len, min_length):
            """Reference: re-run the decoder on the whole buffer at every step, as the
            official code and `Task.greedy_decode` do."""
            b, p = prefix.shape
            ids = jnp.full((b, max_len), PAD_ID, jnp.int32).at[:, :p].set(prefix)

            def body(t, carry):
                ids, done = carry
                logits = full_logits(params, ids)[:, t]
                logits = logits.at[:, SEP_ID].set(
                    jnp.where(t + 1 - p < min_length, -jnp.inf, logits[:, SEP_ID]))
                nxt = jnp.where(done, PAD_ID, jnp.argmax(logits, -1)).astype(jnp.int32)
                ids = jax.lax.dynamic_update_index_in_dim(ids, nxt, t + 1, 1)
                return ids, done | (nxt == SEP_ID)

            return jax.lax.fori_loop(p - 1, max_len - 1, body, (ids, jnp.zeros((b,), bool)))[0]

        def cached_greedy(params, prefix, max_len, min_length):
            return generate.greedy(model, params, self.states, self.smask, max_len,
                                   prefix=prefix, min_length=min_length)

        self.full_logits = jax.jit(full_logits)
        self.uncached_greedy = jax.jit(uncached_greedy, static_argnums=(2, 3))
        self.cached_greedy = jax.jit(cached_greedy, static_argnums=(2, 3))
        self.prefill = jax.jit(lambda p, x, length: generate.prefill(
            model, p, x, self.states, self.smask, length), static_argnums=2)
        self.step = jax.jit(lambda p, x, pos, c: generate.decode_step(
            model, p, x, pos, c, self.smask))


@functools.lru_cache(maxsize=None)
def _setup(scan: bool, remat: str = "none") -> Setup:
    return Setup(scan, remat)


def _prefix(p=1):
    """int32[B, p]: [CLS] then random words."""
    extra = np.random.default_rng(2).integers(1000, 2000, size=(B, p - 1))
    return jnp.asarray(np.concatenate([np.full((B, 1), CLS_ID), extra], 1), jnp.int32)


@pytest.mark.parametrize("scan,remat,prefix_len,chunk", [
    (False, "none", 1, 1), (True, "none", 1, 1), (False, "none", 3, 2), (True, "full", 1, 2),
    (False, "dots", 2, 1)])
def test_cached_logits_equal_full_recomputation(scan, remat, prefix_len, chunk):
    """Teacher-forced: prefill `prefix_len` tokens, then feed `chunk` tokens per call; the
    logits at every position match the uncached decoder on the whole sequence (both layer
    layouts, with and without remat)."""
    s = _setup(scan, remat)
    length = 9
    r = np.random.default_rng(3)
    ids = jnp.asarray(r.integers(1000, 30000, size=(B, length)), jnp.int32).at[:, 0].set(CLS_ID)
    full = s.full_logits(s.params, ids)

    logits, cache = s.prefill(s.params, ids[:, :prefix_len], length)
    assert cache["self"]["k"].shape == (2, B, length, 2, 16)
    assert cache["cross"]["k"].shape == (2, B, S, 2, 16)
    got = [logits]
    for pos in range(prefix_len, length, chunk):
        logits, cache = s.step(s.params, ids[:, pos:pos + chunk], jnp.int32(pos), cache)
        got.append(logits)
    got = jnp.concatenate(got, 1)
    assert got.shape == full.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5, rtol=1e-5)


def _sep_biased(s: Setup, max_len: int) -> dict:
    """Params whose [SEP] bias is raised so that [SEP] would win ~15% of the plain greedy
    steps: rows then end at different steps (the plain random model never emits it)."""
    ids = s.uncached_greedy(s.params, _prefix(), max_len, 0)
    logits = s.full_logits(s.params, ids)[:, :-1]
    gap = np.asarray(logits.max(-1) - logits[..., SEP_ID])
    dec = s.params["decoder"]
    bias = dec["lm_bias"].at[SEP_ID].add(np.float32(np.quantile(gap, 0.15)))
    return {**s.params, "decoder": {**dec, "lm_bias": bias}}


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_uncached(scan):
    s = _setup(scan)
    max_len = 10
    got = s.cached_greedy(s.params, _prefix(), max_len, 0)
    assert got.dtype == jnp.int32 and got.shape == (B, max_len)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(s.uncached_greedy(s.params, _prefix(), max_len, 0)))
    assert (np.asarray(got)[:, 0] == CLS_ID).all()

    biased = _sep_biased(s, max_len)
    got = np.asarray(s.cached_greedy(biased, _prefix(), max_len, 0))
    np.testing.assert_array_equal(got, np.asarray(s.uncached_greedy(biased, _prefix(),
                                                                    max_len, 0)))
    ends = [np.flatnonzero(row == SEP_ID) for row in got]
    assert any(len(e) for e in ends), got  # the bias makes at least one row finish early
    for row, e in zip(got, ends):
        if len(e):  # [SEP] once, then padding
            assert len(e) == 1 and (row[e[0] + 1:] == PAD_ID).all(), row

    # min_length bans [SEP] for the first generated tokens, in both implementations.
    got = np.asarray(s.cached_greedy(biased, _prefix(), max_len, 4))
    np.testing.assert_array_equal(got, np.asarray(s.uncached_greedy(biased, _prefix(),
                                                                    max_len, 4)))
    assert not (got[:, 1:5] == SEP_ID).any()


def test_cached_greedy_from_a_longer_prefix():
    s = _setup(False)
    prefix = _prefix(3)
    got = np.asarray(s.cached_greedy(s.params, prefix, 8, 0))
    np.testing.assert_array_equal(got, np.asarray(s.uncached_greedy(s.params, prefix, 8, 0)))
    np.testing.assert_array_equal(got[:, :3], np.asarray(prefix))


def test_greedy_rejects_bad_shapes():
    s = _setup(False)
    with pytest.raises(ValueError, match="max_len"):
        generate.greedy(s.model, s.params, s.states, s.smask, 1)
    with pytest.raises(ValueError, match="states_mask"):
        generate.greedy(s.model, s.params, s.states, s.smask[:, :2], 5)


def test_parameter_tree_matches_the_golden_table():
    """The cache lives outside the params: names and shapes are those of the golden sharding
    table (which official checkpoint import and the sharding presets rely on)."""
    golden = pathlib.Path(__file__).parent / "golden" / "shardings_dp.txt"
    want = {}
    for line in golden.read_text().splitlines():
        m = re.match(r"params/(\S+)\s+(\([^)]*\))", line)
        if m:
            want[m[1]] = m[2].replace(" ", "")
    model = MPLUG.from_config(pretrain_config.get_config("tiny,mode=smoke").model)
    r = model.image_size
    ids = jnp.zeros((2, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.PRNGKey(0), jnp.zeros((2, r, r, 3)), ids, ids, ids, ids)["params"]))
    got = {"/".join(str(k.key) for k in path): str(tuple(x.shape)).replace(" ", "")
           for path, x in jax.tree_util.tree_leaves_with_path(shapes)}
    assert want and got == want


# ---- beam search ---------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_cached_beam_search_equals_uncached(scan):
    """The official beam search with the cache equals the official-style full recomputation:
    every trace token / parent, stored hypothesis and n-best entry, on a model whose [SEP] is
    competitive (slots finish early, keep being extended, examples end at different steps)."""
    s = _setup(scan)
    biased = _sep_biased(s, 10)
    kw = dict(beam_size=3, min_length=2, max_length=8, return_trace=True)
    run = {c: jax.jit(lambda p, c=c: generate.beam_search(s.model, p, s.states, s.smask,
                                                          use_cache=c, **kw))(biased)
           for c in (True, False)}
    got, ref = ({n: np.asarray(v) for n, v in run[c].items()} for c in (True, False))
    for name in ("ids", "lengths", "end_step", "hyp_ids", "hyp_lengths", "hyp_count",
                 "trace_token", "trace_parent"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    for name in ("scores", "hyp_scores", "trace_score", "trace_cum_logprob"):
        np.testing.assert_allclose(got[name], ref[name], atol=2e-5, rtol=1e-6, err_msg=name)
    assert got["ids"].shape == (B, 3, 9) and (got["ids"][:, :, 0] == CLS_ID).all()
    assert (np.diff(got["scores"], axis=1) <= 0).all()  # best first
    # The quirks are exercised: [SEP] banned before min_length; an example ends before the
    # last step; a finished slot is stored before its example ends (more than K hypotheses).
    assert not (got["trace_token"][:2] == SEP_ID).any()
    assert (got["trace_token"][2:] == SEP_ID).any()
    assert (got["end_step"] < 7).any() and (got["hyp_count"] > 3).any(), got["end_step"]


FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _generation_fixtures() -> list[pathlib.Path]:
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "generation.npz").is_file())


def _official_search(fx: pathlib.Path, run: str):
    """Our beam search on the fixture's official decoder states, with the run's [SEP] bias."""
    import json

    from mplug_jax.interop.convert import load_official
    meta = json.loads((fx / "meta.json").read_text())
    gen = dict(np.load(fx / "generation.npz"))
    expected, inputs = dict(np.load(fx / "expected.npz")), dict(np.load(fx / "inputs.npz"))
    yaml = fx / "config.yaml"
    conv = load_official(str(fx / "model.safetensors"), str(fx / "config_bert.json"),
                         str(yaml) if yaml.is_file() else None)
    params = nn.meta.unbox(conv.params)
    dec = params["decoder"]
    bias = dec["lm_bias"].at[SEP_ID].set(jnp.float32(gen[f"{run}_bias_sep"]))
    params = {**params, "decoder": {**dec, "lm_bias": bias}}
    if meta.get("task", "vqa") == "vqa":  # FORMAT.md 10.3: [fusion image; fusion question]
        f_img = expected["fusion_image"]
        states = np.concatenate([f_img, expected["fusion_text"]], 1)
        smask = np.concatenate([np.ones(f_img.shape[:2], np.int32),
                                inputs["text_attention_mask"].astype(np.int32)], 1)
    else:  # caption: image states only
        states = expected["image_embeds"]
        smask = np.ones(states.shape[:2], np.int32)
    st = meta["generation"]["settings"]
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda p: generate.beam_search(
            conv.model, p, jnp.asarray(states, jnp.float32), jnp.asarray(smask),
            beam_size=st["beam_size"], min_length=st["min_length"],
            max_length=st["max_length"], alpha=st.get("alpha", 0.6),
            return_trace=True))(params)
    tol = meta["generation"]["runs"][run]["suggested_atol"]
    return ({n: np.asarray(v) for n, v in out.items()},
            {n[len(run) + 1:]: v for n, v in gen.items() if n.startswith(run + "_")}, tol)


@pytest.mark.parametrize("run", ["plain", "eosbias"])
def test_beam_search_matches_the_official_fixtures(run):
    """FORMAT.md section 10.6: ids, lengths, trace tokens / parents, end steps and stored
    hypotheses exactly; scores within the fixture's suggested tolerance."""
    fixtures = _generation_fixtures()
    if not fixtures:
        pytest.skip(f"no fixture with generation.npz under {FIXTURES}")
    for fx in fixtures:
        got, want, tol = _official_search(fx, run)
        where = f"{fx.name}/{run}"
        np.testing.assert_array_equal(got["end_step"], want["end_step"], err_msg=where)
        live = want["trace_token"] >= 0
        np.testing.assert_array_equal(got["trace_token"], want["trace_token"], err_msg=where)
        np.testing.assert_array_equal(got["trace_parent"][live], want["trace_parent"][live],
                                      err_msg=where)
        np.testing.assert_allclose(got["trace_score"][live], want["trace_score"][live],
                                   rtol=0, atol=tol["score"], err_msg=where)
        np.testing.assert_allclose(got["trace_cum_logprob"][live],
                                   want["trace_cum_logprob"][live], rtol=0,
                                   atol=tol["cum_logprob"], err_msg=where)
        np.testing.assert_array_equal(got["hyp_count"], want["hyp_count"], err_msg=where)
        for b, count in enumerate(want["hyp_count"]):
            n = want["hyp_len"][b, :count]
            np.testing.assert_array_equal(got["hyp_lengths"][b, :count], n, err_msg=where)
            for h in range(count):
                np.testing.assert_array_equal(got["hyp_ids"][b, h, :n[h]],
                                              want["hyp_ids"][b, h, :n[h]], err_msg=where)
            np.testing.assert_allclose(got["hyp_scores"][b, :count], want["hyp_score"][b, :count],
                                       rtol=0, atol=tol["score"], err_msg=where)
        np.testing.assert_array_equal(got["lengths"], want["nbest_len"], err_msg=where)
        for b, k in np.ndindex(*want["nbest_len"].shape):
            n = want["nbest_len"][b, k]
            np.testing.assert_array_equal(got["ids"][b, k, :n], want["nbest_ids"][b, k, :n],
                                          err_msg=where)
        np.testing.assert_allclose(got["scores"], want["nbest_score"], rtol=0,
                                   atol=tol["score"], err_msg=where)
        np.testing.assert_allclose(got["scores"][:, 0], want["top1_score"], rtol=0,
                                   atol=tol["score"], err_msg=where)


def test_cached_greedy_equals_the_pretrain_task_greedy_decode():
    """Same captions as the existing uncached `Task.greedy_decode` (states built the same way:
    fused image + fused [CLS] prefix), so that path can switch to the cache."""
    from mplug_jax.tasks.pretrain import Task
    c = pretrain_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL)
    c.input.update(batch_size=8, max_tokens=16)
    c.task.itc.queue_size = 32
    task = Task(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    image = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 32, 32, 3)), jnp.float32)

    def cached(params, image):
        b = image.shape[0]
        img = task._apply(params, "encode_image", image)
        prefix, pmask = jnp.full((b, 1), CLS_ID, jnp.int32), jnp.ones((b, 1), jnp.int32)
        txt = task._apply(params, "encode_text", prefix, pmask)
        f_img, f_txt = task._apply(params, "fuse", img, txt, pmask)
        states = jnp.concatenate([f_img, f_txt], 1)
        return generate.greedy(task.model, params, states, jnp.ones(states.shape[:2], jnp.int32),
                               12)

    want = jax.jit(task.greedy_decode, static_argnums=2)(params, image, 12)
    np.testing.assert_array_equal(np.asarray(jax.jit(cached)(params, image)), np.asarray(want))
