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

def _cached_equals_uncached(scan: bool, official: bool) -> dict:
    """Beam search (beam 3, min 2, max 8, traced) on a [SEP]-biased model with and without the
    cache: every id / trace / hypothesis equal, every score close; returns the cached output."""
    s = _setup(scan)
    biased = _sep_biased(s, 10)
    kw = dict(beam_size=3, min_length=2, max_length=8, return_trace=True, official=official)
    run = {c: jax.jit(lambda p, c=c: generate.beam_search(s.model, p, s.states, s.smask,
                                                          use_cache=c, **kw))(biased)
           for c in (True, False)}
    got, ref = ({n: np.asarray(v) for n, v in run[c].items()} for c in (True, False))
    for name in ("ids", "lengths", "end_step", "hyp_ids", "hyp_lengths", "hyp_count",
                 "trace_token", "trace_parent"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    for name in ("scores", "hyp_scores", "trace_score", "trace_cum_logprob"):
        np.testing.assert_allclose(got[name], ref[name], atol=2e-5, rtol=1e-6, err_msg=name)
    return got


@pytest.mark.parametrize("scan", [False, True])
def test_cached_beam_search_equals_uncached(scan):
    """The official beam search with the cache equals the official-style full recomputation:
    every trace token / parent, stored hypothesis and n-best entry, on a model whose [SEP] is
    competitive (slots finish early, keep being extended, examples end at different steps)."""
    got = _cached_equals_uncached(scan, official=True)
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
    if meta.get("task", "vqa") == "vqa":  # docs/fixtures.md#generation-settings
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
    """docs/fixtures.md#comparing-generation: ids, lengths, trace tokens / parents, end steps and
    stored hypotheses exactly; scores within the fixture's suggested tolerance."""
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


def test_pretrain_task_greedy_decode_equals_full_recomputation():
    """`Task.greedy_decode` (now the cached `generate.greedy`) gives the captions of the
    official-style loop that re-runs the decoder on the whole buffer at every step, on states
    built as the task does (fused image + fused [CLS] prefix)."""
    from mplug_jax.tasks.pretrain import Task
    c = pretrain_config.get_config("tiny,mode=smoke")
    c.model.update(SMALL)
    c.input.update(batch_size=8, max_tokens=16)
    c.task.itc.queue_size = 32
    task = Task(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    image = jnp.asarray(np.random.default_rng(4).uniform(size=(4, 32, 32, 3)), jnp.float32)

    def recomputed(params, image, max_len, return_logits=False):
        b = image.shape[0]
        img = task._apply(params, "encode_image", image)
        prefix, pmask = jnp.full((b, 1), CLS_ID, jnp.int32), jnp.ones((b, 1), jnp.int32)
        txt = task._apply(params, "encode_text", prefix, pmask)
        f_img, f_txt = task._apply(params, "fuse", img, txt, pmask)
        states = jnp.concatenate([f_img, f_txt], 1)
        smask = jnp.ones(states.shape[:2], jnp.int32)
        ids = jnp.zeros((b, max_len), jnp.int32).at[:, 0].set(CLS_ID)

        def body(t, carry):
            ids, done = carry
            logits = task._apply(params, "decode", ids, jnp.ones_like(ids), states, smask)[:, t]
            nxt = jnp.where(done, PAD_ID, jnp.argmax(logits, -1)).astype(jnp.int32)
            return ids.at[:, t + 1].set(nxt), done | (nxt == SEP_ID)

        ids = jax.lax.fori_loop(0, max_len - 1, body, (ids, jnp.zeros((b,), bool)))[0]
        if return_logits:
            return task._apply(params, "decode", ids, jnp.ones_like(ids), states, smask)
        return ids

    # A competitive [SEP] (it would win ~15% of the plain steps): captions end at different
    # steps.
    logits = jax.jit(recomputed, static_argnums=(2, 3))(params, image, 12, True)[:, :-1]
    gap = np.asarray(logits.max(-1) - logits[..., SEP_ID])
    dec = params["decoder"]
    params = {**params, "decoder": {**dec, "lm_bias": dec["lm_bias"].at[SEP_ID].add(
        np.float32(np.quantile(gap, 0.15)))}}
    want = np.asarray(jax.jit(recomputed, static_argnums=(2, 3))(params, image, 12))
    got = np.asarray(jax.jit(task.greedy_decode, static_argnums=2)(params, image, 12))
    np.testing.assert_array_equal(got, want)
    lengths = [(row == SEP_ID).argmax() if (row == SEP_ID).any() else 12 for row in got]
    assert len(set(lengths)) > 1, got  # rows end at different steps


# ---- standard beam search ------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_cached_standard_beam_search_equals_uncached(scan):
    """official=False: cached == recomputed (traces, stored hypotheses, n-best), and the
    standard invariants: live slots never hold [SEP], no n-best entry has an inner [SEP], an
    entry without [SEP] has the full length (only the last step stores live slots)."""
    got = _cached_equals_uncached(scan, official=False)
    assert not (got["trace_token"] == SEP_ID).any()
    assert (np.diff(got["scores"], axis=1) <= 0).all()
    n_sep = 0
    for ids, n in zip(got["ids"].reshape(-1, 9), got["lengths"].reshape(-1)):
        seps = np.flatnonzero(ids[:n] == SEP_ID)
        assert (len(seps) == 0 and n == 9) or list(seps) == [n - 1], ids
        n_sep += len(seps)
    assert n_sep > 0  # some hypotheses did finish


class TableDecoder(nn.Module):
    """A Markov 'decoder' for hand-computed searches: the logits after token x fed at
    position t are table[t, x]; the encoder states are ignored."""
    vocab: int
    length: int

    def setup(self):
        self.table = self.param("table", nn.initializers.zeros,
                                (self.length, self.vocab, self.vocab))

    def init_cache(self, batch, length):
        return {"self": {"k": jnp.zeros((1, batch, length))}}

    def decode_step(self, ids, pos, cache, states_mask, states=None, key_mask=None):
        return self.table[(pos + jnp.arange(ids.shape[1]))[None], ids], cache

    def __call__(self, ids, mask, states, states_mask):
        return self.table[jnp.arange(ids.shape[1])[None], ids]


PAD, BOS, EOS, A, Bt, C, Dt = range(7)


def _table(rows: dict, length: int, vocab: int = 7) -> np.ndarray:
    """float32[length, V, V] logits = log(p): (pos, prev) -> {token: p}; every other token
    (and every unlisted row) gets p ~ 1e-6 resp. uniform over a, b, c, d."""
    table = np.full((length, vocab, vocab), np.log(1e-6), np.float32)
    table[:, :, A:] = np.log(0.25)
    for (pos, prev), probs in rows.items():
        table[pos, prev] = np.log(1e-6)
        for tok, p in probs.items():
            table[pos, prev, tok] = np.log(p)
    return table


def test_official_and_standard_beam_differ_on_a_hand_made_case():
    """K = 2, alpha = 0 (scores = summed log-probs), min_length 1, 4 steps, tokens a b c d.
    step 0: a .6, b .4.  step 1 after a: c .55 [SEP] .45; after b: d .6 [SEP] .4.
    step 2 after c: a .7 [SEP] .3; after d: [SEP] .99 c .01; after [SEP]: a .6 b .4.
    step 3 after a: [SEP] .9 b .1.
    Official: step 1 keeps {ac .33, a[SEP] .27} (a[SEP] stored, and extended); step 2 keeps
    {aca .231, a[SEP]a .162}; step 3 {aca[SEP] .2079, a[SEP]a[SEP] .1458}, its best slot ends
    the example -> n-best [a[SEP] .27, aca[SEP] .2079], end step 3.
    Standard: step 1 stores a[SEP] (rank 1 < K) and continues {ac .33, bd .24}; step 2 stores
    bd[SEP] .2376 (rank 0) and keeps {aca .231, bdc}; two stored and .231 < .2376 can never
    win -> ends at step 2 with n-best [a[SEP] .27, bd[SEP] .2376]."""
    table = _table({(0, BOS): {A: .6, Bt: .4},
                    (1, A): {C: .55, EOS: .45}, (1, Bt): {Dt: .6, EOS: .4},
                    (2, C): {A: .7, EOS: .3}, (2, Dt): {EOS: .99, C: .01},
                    (2, EOS): {A: .6, Bt: .4}, (3, A): {EOS: .9, Bt: .1}}, 5)
    model, params = TableDecoder(7, 5), {"table": jnp.asarray(table)}
    states, smask = jnp.zeros((1, 1, 4)), jnp.ones((1, 1), jnp.int32)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(table), -1), np.float64)

    def score(seq):  # summed log-probs of the generated tokens of [BOS] + seq
        full = [BOS] + seq
        return sum(logp[t, full[t], full[t + 1]] for t in range(len(seq)))

    want = {True: ([[A, EOS], [A, C, A, EOS]], 3), False: ([[A, EOS], [Bt, Dt, EOS]], 2)}
    for official, (seqs, end) in want.items():
        for cache in (True, False):
            out = jax.jit(lambda p: generate.beam_search(
                model, p, states, smask, beam_size=2, min_length=1, max_length=4, alpha=0.0,
                bos_id=BOS, eos_id=EOS, pad_id=PAD, official=official, use_cache=cache))(params)
            out = {n: np.asarray(v) for n, v in out.items()}
            assert out["end_step"].tolist() == [end], (official, cache)
            for j, seq in enumerate(seqs):
                n = len(seq) + 1
                assert out["lengths"][0, j] == n
                assert out["ids"][0, j, :n].tolist() == [BOS] + seq, (official, out["ids"])
                assert (out["ids"][0, j, n:] == PAD).all()
                np.testing.assert_allclose(out["scores"][0, j], score(seq), rtol=1e-5)


# ---- sampling ------------------------------------------------------------------------------

def _teacher_forced_logp(s: Setup, params, ids):
    """float32[R, T-1, V] log-softmax of the uncached decoder on sampled rows int32[R, T]
    (states repeated to the rows)."""
    reps = ids.shape[0] // B
    logits = s.model.apply({"params": params}, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                           jnp.repeat(s.states, reps, 0), jnp.repeat(s.smask, reps, 0),
                           method="decode")
    return np.asarray(jax.nn.log_softmax(logits[:, :-1], -1))


def test_sample_degenerate_settings_equal_greedy_and_logprobs_are_the_models():
    s = _setup(False)
    biased = _sep_biased(s, 10)
    want = np.asarray(s.cached_greedy(biased, _prefix(), 10, 2))
    run = jax.jit(lambda p, key, **kw: generate.sample(s.model, p, s.states, s.smask, key,
                                                       max_len=10, num_samples=2, min_length=2,
                                                       **kw), static_argnames=("temperature",
                                                                               "top_k"))
    for kw in (dict(temperature=0.0), dict(top_k=1, temperature=1.0)):
        out = {n: np.asarray(v) for n, v in run(biased, jax.random.PRNGKey(3), **kw).items()}
        assert out["ids"].shape == (B, 2, 10) and out["ids"].dtype == np.int32
        for n in range(2):
            np.testing.assert_array_equal(out["ids"][:, n], want, err_msg=str(kw))
    # Sampled rows at T = 1.3 with [SEP] at p ~ 1/2 of the plain model (rows end at various
    # steps): lengths and log-probs (of the plain model) are those of the ids.
    logits = s.full_logits(s.params, jnp.asarray(want))
    gap = np.median(np.asarray(jax.nn.logsumexp(logits, -1) - logits[..., SEP_ID]))
    dec = s.params["decoder"]
    biased = {**s.params, "decoder": {**dec, "lm_bias": dec["lm_bias"].at[SEP_ID].add(
        np.float32(gap))}}
    out = {n: np.asarray(v) for n, v in run(biased, jax.random.PRNGKey(5), temperature=1.3,
                                            top_k=0).items()}
    ids = out["ids"].reshape(2 * B, 10)
    logp = _teacher_forced_logp(s, biased, ids)
    for r, row in enumerate(ids):
        n = out["lengths"].reshape(-1)[r]
        assert row[0] == CLS_ID and (row[n:] == PAD_ID).all() and (row[1:n] != PAD_ID).all()
        assert n == 10 or row[n - 1] == SEP_ID
        assert not (row[1:3] == SEP_ID).any()  # min_length
        want_lp = sum(logp[r, t, row[t + 1]] for t in range(n - 1))
        np.testing.assert_allclose(out["logprobs"].reshape(-1)[r], want_lp, rtol=1e-4, atol=1e-3)
    assert len(set(out["lengths"].reshape(-1).tolist())) > 1 and len({tuple(r) for r in ids}) > B
    again = run(biased, jax.random.PRNGKey(5), temperature=1.3, top_k=0)
    np.testing.assert_array_equal(np.asarray(again["ids"]), out["ids"])  # deterministic


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.3), (50, 0.2)])
def test_sample_filters_only_emit_allowed_tokens(top_k, top_p):
    """Every sampled token is inside the top-k / nucleus of the tempered distribution,
    recomputed from the full logits of the sampled prefix."""
    s = _setup(False)
    temp = 1.5
    out = jax.jit(lambda p, key: generate.sample(
        s.model, p, s.states, s.smask, key, max_len=6, num_samples=4, temperature=temp,
        top_k=top_k, top_p=top_p))(s.params, jax.random.PRNGKey(0))
    ids = np.asarray(out["ids"]).reshape(4 * B, 6)
    logp = _teacher_forced_logp(s, s.params, ids)  # log_softmax(l) / T = l / T + const
    allowed_sizes = []
    for r, row in enumerate(ids):
        for t in range(np.asarray(out["lengths"]).reshape(-1)[r] - 1):
            z = logp[r, t].astype(np.float64) / temp
            order = np.argsort(-z)
            allowed = order[:top_k] if top_k else order
            if top_p < 1:
                p = np.exp(z[allowed] - z[allowed].max())
                p /= p.sum()
                allowed = allowed[:int(np.searchsorted(np.cumsum(p), top_p) + 1)]
            allowed_sizes.append(len(allowed))
            assert row[t + 1] in set(allowed.tolist()), (r, t)
    assert max(allowed_sizes) < 30522 // 2  # the filters did restrict


def test_sample_first_token_frequencies_match_the_tempered_softmax():
    table = np.zeros((3, 7, 7), np.float32)
    table[0, BOS] = [-9.0, -9.0, -9.0, 1.0, 0.2, -0.5, 0.6]  # pad, bos, eos banned-ish
    model, params = TableDecoder(7, 3), {"table": jnp.asarray(table)}
    states, smask = jnp.zeros((1, 1, 4)), jnp.ones((1, 1), jnp.int32)
    n = 6000
    for temp, top_k in ((0.7, 0), (1.5, 0), (1.0, 2)):
        out = jax.jit(lambda p, key: generate.sample(
            model, p, states, smask, key, max_len=2, num_samples=n, temperature=temp,
            top_k=top_k, bos_id=BOS, eos_id=EOS, pad_id=PAD))(params, jax.random.PRNGKey(1))
        freq = np.bincount(np.asarray(out["ids"])[0, :, 1], minlength=7) / n
        z = table[0, BOS].astype(np.float64) / temp
        if top_k:
            z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
        want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(freq, want, atol=0.025, err_msg=f"T={temp} k={top_k}")
        # log-probs are those of the plain (T = 1, unfiltered) model
        plain = np.asarray(jax.nn.log_softmax(jnp.asarray(table[0, BOS])))
        np.testing.assert_allclose(np.asarray(out["logprobs"])[0],
                                   plain[np.asarray(out["ids"])[0, :, 1]], rtol=1e-6)


def test_sample_rejects_bad_settings():
    s = _setup(False)
    key = jax.random.PRNGKey(0)
    for kw, match in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                      (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"),
                      (dict(num_samples=0), "num_samples")):
        with pytest.raises(ValueError, match=match):
            generate.sample(s.model, s.params, s.states, s.smask, key, max_len=5, **kw)


def test_greedy_without_cache_equals_the_reference_recomputation():
    s = _setup(False)
    biased = _sep_biased(s, 10)
    got = jax.jit(lambda p: generate.greedy(s.model, p, s.states, s.smask, 10, min_length=2,
                                            use_cache=False))(biased)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(s.uncached_greedy(biased, _prefix(), 10, 2)))


# ---- mesh-sharded searches -----------------------------------------------------------------

def test_sharded_searches_equal_single_device():
    """make_search on 8 fake CPU devices (data 4 x fsdp 2, FSDP params) gives the outputs of
    the plain single-device calls, sharded over the batch; a batch of 6 is refused."""
    from mplug_jax import sharding as shd
    s = _setup(False)
    biased = _sep_biased(s, 10)
    mesh = shd.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    image, ids = jnp.zeros((1, 32, 32, 3)), jnp.full((1, 4), 1000, jnp.int32)
    boxed = jax.eval_shape(lambda: s.model.init(jax.random.PRNGKey(0), image, ids, ids, ids,
                                                ids)["params"])
    rule_set = shd.rules("fsdp")
    pshard = shd.logical_shardings(boxed, mesh, rule_set)
    r = np.random.default_rng(7)
    states = jnp.asarray(r.normal(size=(8, S, D)), jnp.float32)
    smask = jnp.ones((8, S), jnp.int32).at[2, 3:].set(0)
    key = jax.random.PRNGKey(11)
    cases = [("greedy", dict(max_len=8, min_length=1), ()),
             ("beam", dict(beam_size=3, min_length=1, max_length=6, return_trace=True), ()),
             ("beam", dict(beam_size=2, max_length=6, official=False), ()),
             ("sample", dict(max_len=8, num_samples=2, top_k=5), (key,))]
    single = {"greedy": lambda p, a, m, **kw: generate.greedy(s.model, p, a, m, **kw),
              "beam": lambda p, a, m, **kw: generate.beam_search(s.model, p, a, m, **kw),
              "sample": lambda p, a, m, k, **kw: generate.sample(s.model, p, a, m, k, **kw)}
    for kind, kw, extra in cases:
        fn = generate.make_search(s.model, mesh, pshard, kind, rules=rule_set, **kw)
        got = fn(biased, states, smask, *extra)
        want = jax.jit(functools.partial(single[kind], **kw))(biased, states, smask, *extra)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            name = f"{kind} {jax.tree_util.keystr(path)}"
            axis = 1 if "trace" in name else 0
            assert g.sharding.spec[axis] == shd.BATCH_AXES, (name, g.sharding)
            if g.dtype == jnp.float32:
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5,
                                           err_msg=name)
            else:
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    fn = generate.make_search(s.model, mesh, pshard, "greedy", max_len=8)
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        fn(biased, states[:6], smask[:6])
