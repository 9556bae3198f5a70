"""Generation engine for the prefix-LM decoder, with a key/value cache.

The decoder reads each generated token once: `prefill` runs the prefix (usually [CLS] alone)
and computes the cross-attention keys/values of the encoder states; every later step feeds one
token at its position and attends over the cached keys/values (`TextDecoder.decode_step`).
Shapes are static (cache float[N, B, T, H, K] for T = max_len), so a whole search is one
`jax.jit`-able function; the loops are `lax.while_loop`s that stop once every row has ended.

Searches:
  greedy        argmax decoding -> int32[B, T] ([CLS] w1 .. [SEP] then [PAD]).
  beam_search   the official mPLUG beam search with all its quirks
                (docs/fixtures.md#official-beam-search), or (official=False) the standard beam
                search -> n-best ids / lengths / scores (+ optional per-step trace).
  sample        temperature / top-k / top-p sampling, N samples per example, with the
                log-probs of the samples (SCST).
  make_search   any of them jitted over a device mesh, the batch split over data / fsdp.

`model` is the `MPLUG` module (params = its full tree) or a bare `TextDecoder` (params = the
decoder's tree); the parameter tree is the one training uses, nothing is added to it.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mplug_jax import sharding as shd
from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
from mplug_jax.models import layers
from mplug_jax.models.decoder import TextDecoder
from mplug_jax.models.mplug import MPLUG


def _decoder(module) -> TextDecoder:
    if isinstance(module, MPLUG):
        return module.decoder
    if isinstance(module, TextDecoder) or all(
            hasattr(module, m) for m in ("init_cache", "decode_step", "__call__")):
        return module
    raise TypeError(f"generation needs an MPLUG or TextDecoder module (or one with the "
                    f"TextDecoder methods init_cache / decode_step / __call__), got "
                    f"{type(module)}")


def init_cache(model, params, batch: int, length: int) -> dict:
    """Empty cache for `batch` rows and `length` positions (see `TextDecoder.init_cache`)."""
    return model.apply({"params": params}, batch, length,
                       method=lambda m, b, t: _decoder(m).init_cache(b, t))


def decode_step(model, params, ids: jax.Array, pos, cache: dict, states_mask: jax.Array,
                states: jax.Array | None = None, key_mask: jax.Array | None = None):
    """One cached decoder call: ids int32[B, L] at positions pos .. pos + L - 1
    -> (logits float32[B, L, V], cache). `states` float[B, S, D] is needed on the first call
    (prefill) only. See `TextDecoder.decode_step`."""
    return model.apply({"params": params}, ids, pos, cache, states_mask, states, key_mask,
                       method=lambda m, *a: _decoder(m).decode_step(*a))


def prefill(model, params, prefix: jax.Array, states: jax.Array, states_mask: jax.Array,
            length: int):
    """Run the prefix int32[B, P] through a fresh cache of `length` slots.

    Returns (logits float32[B, P, V], cache holding positions 0 .. P-1 and the
    cross-attention keys/values of `states` float[B, S, D])."""
    cache = init_cache(model, params, prefix.shape[0], length)
    return decode_step(model, params, prefix, 0, cache, states_mask, states)


def _check(states, states_mask, prefix, max_len):
    if states.ndim != 3 or states.shape[:2] != states_mask.shape:
        raise ValueError(f"states {tuple(states.shape)} must be float[B, S, D] with states_mask "
                         f"int[B, S], got mask {tuple(states_mask.shape)}")
    if prefix.ndim != 2 or prefix.shape[0] != states.shape[0]:
        raise ValueError(f"prefix {tuple(prefix.shape)} must be int[B, P] with B = "
                         f"{states.shape[0]} (the states' batch)")
    if not 1 <= prefix.shape[1] < max_len:
        raise ValueError(f"max_len={max_len} must exceed the prefix length {prefix.shape[1]} "
                         "(the output buffer holds the prefix and the generated tokens)")


def greedy(model, params, states: jax.Array, states_mask: jax.Array, max_len: int, *,
           prefix: jax.Array | None = None, min_length: int = 0, bos_id: int = CLS_ID,
           eos_id: int = SEP_ID, pad_id: int = PAD_ID, use_cache: bool = True) -> jax.Array:
    """Greedy decoding with the key/value cache; jit-compatible (`max_len` and the keyword
    settings static). use_cache=False re-runs the decoder on the whole buffer at every step,
    as the official code (the baseline of benchmarks/generate.py).

    Args:
      model / params: see module docstring.
      states: float[B, S, D] encoder states the decoder cross-attends to.
      states_mask: int[B, S], 1 = attend.
      max_len: T, length of the output buffer (prefix included).
      prefix: int32[B, P] tokens to start from, P < T, no padding; default [CLS] (bos_id).
      min_length: [eos_id] is never picked among the first `min_length` generated tokens.
    Returns:
      int32[B, T]: the prefix, the argmax tokens up to and including the first eos_id, then
      pad_id (as `tasks.pretrain.Task.greedy_decode`, which recomputes the whole prefix at
      every step).
    """
    b = states.shape[0]
    if prefix is None:
        prefix = jnp.full((b, 1), bos_id, jnp.int32)
    prefix = jnp.asarray(prefix, jnp.int32)
    _check(states, states_mask, prefix, max_len)
    p = prefix.shape[1]

    def choose(logits, t):
        """logits float32[B, V] for output position t -> int32[B]."""
        if min_length:
            banned = (t - p) < min_length
            logits = logits.at[:, eos_id].set(
                jnp.where(banned, -jnp.inf, logits[:, eos_id]))
        return jnp.argmax(logits, -1).astype(jnp.int32)

    if use_cache:
        logits, cache = prefill(model, params, prefix, states, states_mask, max_len)
    else:
        logits, cache = _full_logits(model, params, prefix, states, states_mask), None
    nxt = choose(logits[:, -1], p)
    ids = jnp.full((b, max_len), pad_id, jnp.int32).at[:, :p].set(prefix).at[:, p].set(nxt)
    done = nxt == eos_id

    def cond(carry):
        t, _, _, done = carry
        return (t < max_len - 1) & ~jnp.all(done)

    def body(carry):
        # t: position of the last token written; feeding it gives the logits for t + 1.
        t, ids, cache, done = carry
        if use_cache:
            tok = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
            logits, cache = decode_step(model, params, tok, t, cache, states_mask)
            logits = logits[:, 0]
        else:  # causal: the padding after t does not change the logits at t
            logits = jax.lax.dynamic_index_in_dim(
                _full_logits(model, params, ids, states, states_mask), t, 1, False)
        nxt = jnp.where(done, pad_id, choose(logits, t + 1)).astype(jnp.int32)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], t + 1, axis=1)
        return t + 1, ids, cache, done | (nxt == eos_id)

    _, ids, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(p, jnp.int32), ids, cache, done))
    return ids


def _restrict(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """float32[R, V] -> the same with every token outside the top-k and the nucleus set to
    -inf (top_k = 0 / top_p = 1 switch a filter off). The nucleus is the smallest set of the
    most likely tokens whose softmax mass reaches top_p; tokens tied with its last one (or
    with the k-th) are kept."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        better_mass = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked before
        n_keep = jnp.maximum((better_mass < top_p).sum(-1, keepdims=True), 1)
        last = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        logits = jnp.where(logits < last, -jnp.inf, logits)
    return logits


def sample(model, params, states: jax.Array, states_mask: jax.Array, key: jax.Array, *,
           max_len: int, num_samples: int = 1, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_length: int = 0, bos_id: int = CLS_ID, eos_id: int = SEP_ID,
           pad_id: int = PAD_ID) -> dict:
    """Ancestral sampling from [CLS] with the key/value cache (for SCST and diverse
    captions); jit-compatible with the keyword settings static, deterministic for a key.

    Each step draws from softmax(logits / temperature) restricted to the top_k most likely
    tokens (0: all) and then to the nucleus of mass top_p (1.0: all); temperature 0 takes the
    argmax (greedy). eos_id is never drawn among the first `min_length` generated tokens.
    Step t uses the key `fold_in(key, t)`; the N samples of an example are independent rows.

    Args:
      states: float[B, S, D] encoder states; states_mask: int[B, S], 1 = attend.
      key: a PRNG key.
      max_len: T, length of the output buffer ([CLS] included).
    Returns dict:
      'ids' int32[B, N, T]: [CLS], the sampled tokens up to and including eos_id, then pad_id;
      'lengths' int32[B, N]: valid lengths ([CLS] and [SEP] included);
      'logprobs' float32[B, N]: sum over the sampled tokens ([SEP] included) of their
        log-probs under the plain model (log_softmax of the untempered, unfiltered logits,
        without the min_length ban), as the policy-gradient loss needs.
    """
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or num_samples < 1 or min_length < 0:
        raise ValueError(f"top_k ({top_k}) and min_length ({min_length}) must be >= 0 and "
                         f"num_samples ({num_samples}) >= 1")
    b, n = states.shape[0], num_samples
    first = jnp.full((b, 1), bos_id, jnp.int32)
    _check(states, states_mask, first, max_len)
    rows = b * n
    rep_mask = jnp.repeat(states_mask, n, axis=0)

    def draw(logits, t, key):
        """logits float32[R, V] for output position t -> (int32[R] token, float32[R] its
        log-prob under the plain model)."""
        logits = logits.astype(jnp.float32)
        plain = jax.nn.log_softmax(logits, axis=-1)
        if min_length:
            logits = logits.at[:, eos_id].set(
                jnp.where(t - 1 < min_length, -jnp.inf, logits[:, eos_id]))
        if temperature == 0:
            tok = jnp.argmax(logits, -1)
        else:
            logits = _restrict(logits / temperature, top_k, top_p)
            tok = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1)
        tok = tok.astype(jnp.int32)
        return tok, jnp.take_along_axis(plain, tok[:, None], axis=-1)[:, 0]

    logits, cache = prefill(model, params, first, states, states_mask, max_len)
    cache = jax.tree.map(lambda x: jnp.repeat(x, n, axis=1), cache)
    nxt, logp = draw(jnp.repeat(logits[:, -1], n, axis=0), 1, key)
    ids = jnp.full((rows, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id).at[:, 1].set(nxt)
    carry = (jnp.int32(1), ids, cache, nxt == eos_id, logp, jnp.full((rows,), 2, jnp.int32))

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < max_len - 1) & ~jnp.all(done)

    def body(carry):
        t, ids, cache, done, total, length = carry
        tok = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
        logits, cache = decode_step(model, params, tok, t, cache, rep_mask)
        nxt, logp = draw(logits[:, 0], t + 1, key)
        nxt = jnp.where(done, pad_id, nxt)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], t + 1, axis=1)
        total = total + jnp.where(done, 0.0, logp)
        length = length + (~done).astype(jnp.int32)
        return t + 1, ids, cache, done | (nxt == eos_id), total, length

    _, ids, _, _, total, length = jax.lax.while_loop(cond, body, carry)
    return dict(ids=ids.reshape(b, n, max_len), lengths=length.reshape(b, n),
                logprobs=total.reshape(b, n))


def _full_logits(model, params, ids, states, states_mask):
    """Uncached decoder: ids int32[R, L] (causal mask only, as the official generation),
    states float[R, S, D] -> logits float32[R, L, V]."""
    return model.apply({"params": params}, ids, jnp.ones_like(ids), states, states_mask,
                       method=lambda m, *a: _decoder(m)(*a))


def coordinate_greedy(model, params, states: jax.Array, states_mask: jax.Array, *,
                      first_id: int, num_bins: int, prefix_id: int, steps: int = 4,
                      use_cache: bool = True, return_scores: bool = False):
    """Greedy decoding restricted to a contiguous range of coordinate tokens (grounding,
    docs/fixtures.md#grounding-forward-and-decode): from `prefix_id`, `steps` argmax steps over the
    ids first_id .. first_id + num_bins - 1 only. The official adds -10000 to every other logit
    and takes the argmax of the whole vocabulary, which picks the same token (first maximum).

    Args:
      states: float[B, S, D] decoder memory; states_mask: int[B, S].
      first_id, num_bins, prefix_id, steps: static ints.
      use_cache: the key/value cache; False re-runs the decoder on the whole prefix every step
        (as the official code: the parity check compares those raw scores).
      return_scores: also return the unrestricted LM-head output of every step.
    Returns:
      int32[B, steps] token ids in [first_id, first_id + num_bins); with return_scores,
      (tokens, float32[B, steps, V] raw scores).
    """
    b = states.shape[0]
    if num_bins < 1 or first_id < 0 or steps < 1:
        raise ValueError(f"need num_bins >= 1, first_id >= 0, steps >= 1; got {num_bins}, "
                         f"{first_id}, {steps}")
    seq = jnp.full((b, 1), prefix_id, jnp.int32)
    _check(states, states_mask, seq, steps + 1)
    if use_cache:
        logits, cache = prefill(model, params, seq, states, states_mask, steps + 1)
    else:
        logits = _full_logits(model, params, seq, states, states_mask)
    toks, raws = [], []
    for s in range(steps):
        raw = logits[:, -1].astype(jnp.float32)
        raws.append(raw)
        tok = (first_id + jnp.argmax(raw[:, first_id:first_id + num_bins], -1)).astype(jnp.int32)
        toks.append(tok)
        if s + 1 == steps:
            break
        if use_cache:
            logits, cache = decode_step(model, params, tok[:, None], s + 1, cache, states_mask)
        else:
            seq = jnp.concatenate([seq, tok[:, None]], 1)
            logits = _full_logits(model, params, seq, states, states_mask)
    tokens = jnp.stack(toks, 1)
    return (tokens, jnp.stack(raws, 1)) if return_scores else tokens


def _length_penalties(max_length: int, alpha: float) -> jnp.ndarray:
    """float32[S]: ((5 + n) / 6) ** alpha for n = step + 1 generated tokens, computed in float64
    and rounded once to float32 (the official divides float32 scores by float32(lp))."""
    n = np.arange(1, max_length + 1, dtype=np.float64)
    return jnp.asarray((((5.0 + n) / 6.0) ** alpha).astype(np.float32))


def beam_search(model, params, states: jax.Array, states_mask: jax.Array, *, beam_size: int = 5,
                min_length: int = 1, max_length: int = 10, alpha: float = 0.6,
                bos_id: int = CLS_ID, eos_id: int = SEP_ID, pad_id: int = PAD_ID,
                return_trace: bool = False, use_cache: bool = True,
                official: bool = True) -> dict:
    """Beam search with the key/value cache: the official mPLUG algorithm (default) or the
    standard one; jit-compatible with the keyword settings static.

    Shared by both modes: scores are summed log-probs (`log(softmax)`, float32) of every
    generated token ([SEP] included, [CLS] not) divided by ((5 + n) / 6) ** alpha,
    n = generated tokens; the carried value is score * lp; eos_id gets log-prob -1e20 at steps
    < min_length; the returned hypotheses are the K best stored ones, stably sorted by score
    (ties: the one stored first); every stored hypothesis is ranked with the score of the step
    at which it was stored.

    official=True, `TextGenerator._fast_translate_batch` (do_sample=False;
    docs/fixtures.md#official-beam-search) with all its quirks: each step keeps the top K
    of the K * V candidates; a slot that emits eos_id is stored as a hypothesis AND stays in
    the beam (it is extended further: later hypotheses can hold an inner [SEP]); an example
    ends only when its best slot emits eos_id (then all K slots are stored, [SEP] or not) or
    at the last step (all K stored).
    official=False, the standard algorithm of most libraries: each step takes the top 2K
    candidates; a [SEP] candidate ranked among the first K is stored and frozen (never
    extended); the beam is refilled with the K best non-[SEP] candidates, so K live slots
    always continue; an example ends once it has >= K stored hypotheses and no live slot can
    still beat the worst of its K best (a live slot's best reachable score is its carried
    log-prob, which can only decrease, divided by the largest length penalty of the remaining
    steps), or at the last step, where its K live slots are stored too. Hence the standard
    n-best never contains an inner [SEP], holds hypotheses without [SEP] only when the search
    hit max_length, and may find a [SEP]-ended hypothesis that official mode misses because a
    finished slot occupied the beam.

    Args:
      states: float[B, S, D] encoder states (one row per example, not repeated per beam).
      states_mask: int[B, S], 1 = attend.
      beam_size: K; min_length / max_length: as the official config (max_length = steps).
    Returns dict (Lg = max_length + 1; H = stored-hypothesis capacity, max_length * K
    official, (max_length + 1) * K standard):
      'ids' int32[B, K, Lg] the K best stored hypotheses, best first: bos_id, the generated
        tokens, then pad_id; 'lengths' int32[B, K] valid lengths; 'scores' float32[B, K];
      'end_step' int32[B] the step at which each example ended.
      With return_trace also 'hyp_ids' [B, H, Lg], 'hyp_lengths' / 'hyp_scores' [B, H] in
      insertion order (unused: length 0, score NaN), 'hyp_count' int32[B], and per step
      'trace_token' / 'trace_parent' int32[S, B, K] of the K slots kept (-1 once the example
      has ended), 'trace_score' / 'trace_cum_logprob' float32[S, B, K].
    use_cache=False recomputes the whole prefix at every step, as the official code (the
    reference the cached search is tested against, and the baseline of benchmarks).
    """
    b, k, steps = states.shape[0], beam_size, max_length
    if states.ndim != 3 or states.shape[:2] != states_mask.shape:
        raise ValueError(f"states {tuple(states.shape)} must be float[B, S, D] with states_mask "
                         f"int[B, S], got mask {tuple(states_mask.shape)}")
    if k < 1 or steps < 1:
        raise ValueError(f"beam_size ({k}) and max_length ({steps}) must be >= 1")
    total, cap = steps + 1, (steps if official else steps + 1) * k
    lps = _length_penalties(steps, alpha)
    # Largest length penalty of the steps after each step (standard end test; cum <= 0).
    lps_np = np.asarray((((5.0 + np.arange(1, steps + 1)) / 6.0) ** alpha).astype(np.float32))
    future_lp = jnp.asarray([lps_np[s + 1:].max() if s + 1 < steps else lps_np[s]
                             for s in range(steps)], jnp.float32)
    rows_of = jnp.arange(b)[:, None] * k  # first row of each example in the [B * K] batch

    first = jnp.full((b, 1), bos_id, jnp.int32)
    rep_mask = jnp.repeat(states_mask, k, axis=0)
    if use_cache:
        logits, cache = prefill(model, params, first, states, states_mask, steps)
        # Every row of an example holds the same prefix ([CLS]) and states at step 0.
        cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=1), cache)
    else:
        rep_states = jnp.repeat(states, k, axis=0)
        logits, cache = _full_logits(model, params, first, states, states_mask), None
    vocab = logits.shape[-1]
    if not official and vocab < 2 * k:
        raise ValueError(f"standard beam search needs vocab ({vocab}) >= 2 * beam_size ({k})")

    def log_probs(logits):
        """float32[R, V] logits -> float32[R, V], official log(softmax(.)) (not log_softmax)."""
        return jnp.log(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))

    def store(c, out, cand_ids, cand_scores, offer, length):
        """Append the offered candidates (ids int32[B, C, Lg], scores float32[B, C], offer
        bool[B, C]) to the stored hypotheses, in candidate order."""
        slot = c["hyp_count"][:, None] + jnp.cumsum(offer, 1) - 1
        slot = jnp.where(offer, slot, cap)  # out of range: dropped by the scatters
        ex = jnp.broadcast_to(jnp.arange(b)[:, None], offer.shape)
        out["hyp_ids"] = c["hyp_ids"].at[ex, slot].set(cand_ids, mode="drop")
        out["hyp_scores"] = c["hyp_scores"].at[ex, slot].set(cand_scores, mode="drop")
        out["hyp_lengths"] = c["hyp_lengths"].at[ex, slot].set(length, mode="drop")
        out["hyp_count"] = c["hyp_count"] + offer.sum(1).astype(jnp.int32)

    def advance(c, logp):
        """One search step given the slots' next-token log-probs float32[B, K, V]."""
        step = c["step"]
        logp = jnp.where((step < min_length) & (jnp.arange(vocab) == eos_id), -1e20, logp)
        lp = lps[step]
        cand = ((logp + c["cum"][..., None]) / lp).reshape(b, k * vocab)
        top_score, top_idx = jax.lax.top_k(cand, k if official else 2 * k)
        parent, token = (top_idx // vocab).astype(jnp.int32), (top_idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(c["alive"], parent[..., None], axis=1)
        seqs = jnp.where(jnp.arange(total) == step + 1, token[..., None], seqs)
        active, last = c["active"], step == steps - 1
        out = dict(c)
        if official:
            finished = (token == eos_id) | last
            ended = finished[:, 0] & active
            finished = (finished | ended[:, None]) & active[:, None]
            store(c, out, seqs, top_score, finished, step + 2)
        else:
            is_eos = token == eos_id
            # [SEP] candidates ranked among the first K are stored, and frozen: the live slots
            # are the K best non-[SEP] candidates (best first; the top 2K hold at least K).
            eos_offer = is_eos & (jnp.arange(2 * k) < k) & active[:, None]
            eos_seqs, eos_scores = seqs, top_score
            keep = jnp.argsort(is_eos, axis=1, stable=True)[:, :k]

            def pick(x):
                return jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)

            top_score, parent, token, seqs = map(pick, (top_score, parent, token, seqs))
            live_offer = jnp.broadcast_to(last & active[:, None], (b, k))
            store(c, out, jnp.concatenate([eos_seqs, seqs], 1),
                  jnp.concatenate([eos_scores, top_score], 1),
                  jnp.concatenate([eos_offer, live_offer], 1), step + 2)
            stored = out["hyp_scores"]
            worst_of_best = jax.lax.top_k(jnp.where(jnp.isnan(stored), -jnp.inf, stored),
                                          k)[0][:, -1]
            reachable = (top_score * lp).max(1) / future_lp[step]
            ended = active & (last | ((out["hyp_count"] >= k) & (reachable <= worst_of_best)))
        out["end_step"] = jnp.where(ended, step, c["end_step"])
        out["active"] = active & ~ended
        out["alive"], out["cum"] = seqs, top_score * lp
        if use_cache:
            rows = (rows_of + parent).reshape(-1)
            out["cache"] = {**c["cache"], "self": jax.tree.map(
                lambda x: jnp.take(x, rows, axis=1), c["cache"]["self"])}
        if return_trace:
            live = active[:, None]
            for name, val in (("trace_token", token), ("trace_parent", parent)):
                out[name] = c[name].at[step].set(jnp.where(live, val, -1))
            out["trace_score"] = c["trace_score"].at[step].set(top_score)
            out["trace_cum_logprob"] = c["trace_cum_logprob"].at[step].set(top_score * lp)
        out["step"] = step + 1
        return out

    carry = dict(
        step=jnp.int32(0),
        alive=jnp.full((b, k, total), pad_id, jnp.int32).at[:, :, 0].set(bos_id),
        # Only slot 0 is live at step 0: the first K tokens come from one distribution.
        cum=jnp.full((b, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0),
        active=jnp.ones((b,), bool), end_step=jnp.full((b,), steps - 1, jnp.int32),
        hyp_ids=jnp.full((b, cap, total), pad_id, jnp.int32),
        hyp_scores=jnp.full((b, cap), jnp.nan, jnp.float32),
        hyp_lengths=jnp.zeros((b, cap), jnp.int32), hyp_count=jnp.zeros((b,), jnp.int32),
        cache=cache)
    if return_trace:
        carry.update(trace_token=jnp.full((steps, b, k), -1, jnp.int32),
                     trace_parent=jnp.full((steps, b, k), -1, jnp.int32),
                     trace_score=jnp.full((steps, b, k), jnp.nan, jnp.float32),
                     trace_cum_logprob=jnp.full((steps, b, k), jnp.nan, jnp.float32))
    carry = advance(carry, jnp.broadcast_to(log_probs(logits[:, -1])[:, None], (b, k, vocab)))

    def cond(c):
        return (c["step"] < steps) & jnp.any(c["active"])

    def body(c):
        step = c["step"]
        if not use_cache:
            logits = _full_logits(model, params, c["alive"].reshape(b * k, total), rep_states,
                                  rep_mask)
            return advance(c, log_probs(jax.lax.dynamic_index_in_dim(logits, step, 1, False))
                           .reshape(b, k, vocab))
        tok = jax.lax.dynamic_slice_in_dim(c["alive"], step, 1, axis=2).reshape(b * k, 1)
        logits, cache = decode_step(model, params, tok, step, c["cache"], rep_mask)
        return advance({**c, "cache": cache}, log_probs(logits[:, 0]).reshape(b, k, vocab))

    c = jax.lax.while_loop(cond, body, carry)
    # Python's stable sorted(reverse=True) of the official: score descending, ties in insertion
    # order (the explicit last key), unused slots after every stored hypothesis.
    scores = c["hyp_scores"]
    order = jnp.lexsort((jnp.broadcast_to(jnp.arange(cap), (b, cap)),
                         -jnp.nan_to_num(scores, nan=0.0), jnp.isnan(scores)), axis=-1)
    best = order[:, :k]
    out = dict(ids=jnp.take_along_axis(c["hyp_ids"], best[..., None], axis=1),
               lengths=jnp.take_along_axis(c["hyp_lengths"], best, axis=1),
               scores=jnp.take_along_axis(c["hyp_scores"], best, axis=1),
               end_step=c["end_step"])
    if return_trace:
        out.update({n: c[n] for n in ("hyp_ids", "hyp_lengths", "hyp_scores", "hyp_count",
                                      "trace_token", "trace_parent", "trace_score",
                                      "trace_cum_logprob")})
    return out


_BEAM_OUTPUTS = ("ids", "lengths", "scores", "end_step")
_TRACE_OUTPUTS = ("hyp_ids", "hyp_lengths", "hyp_scores", "hyp_count", "trace_token",
                  "trace_parent", "trace_score", "trace_cum_logprob")
SEARCHES = ("greedy", "beam", "sample")


def make_search(model, mesh, param_shardings, kind: str, *, rules: tuple | None = None,
                **settings):
    """A search jitted over `mesh`: the batch is split over the ('data', 'fsdp') axes, the
    params follow `param_shardings` (e.g. `TrainState.params` shardings of the trainer).

    Args:
      model: the MPLUG module (or a TextDecoder), as for the searches themselves.
      mesh: a `sharding.make_mesh` mesh.
      param_shardings: a tree of NamedShardings matching params (or one sharding for all).
      kind: 'greedy' (settings: max_len and greedy's keywords), 'beam' (beam_search's
        keywords) or 'sample' (sample's keywords, max_len included).
      rules: logical-axis rules (`sharding.rules(preset)`) for the model's activation
        constraints; None traces without them.
    Returns:
      fn(params, states float[B, S, D], states_mask int[B, S][, key]) -> the search's output
      (key only for 'sample'), every output split over the batch shards along its example
      axis (axis 1 of the per-step trace arrays). B must be divisible by the number of batch
      shards (mesh data * fsdp), else ValueError.
    """
    if kind not in SEARCHES:
        raise ValueError(f"unknown search kind {kind!r}; valid: {SEARCHES}")
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = shd.batch_sharding(mesh)
    if kind == "greedy":
        if "max_len" not in settings:
            raise ValueError("make_search('greedy') needs max_len=")

        def fn(params, states, states_mask):
            return greedy(model, params, states, states_mask, **settings)
        out = batch
    elif kind == "beam":
        def fn(params, states, states_mask):
            return beam_search(model, params, states, states_mask, **settings)
        trace = NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES))
        names = _BEAM_OUTPUTS + (_TRACE_OUTPUTS if settings.get("return_trace") else ())
        out = {n: trace if n.startswith("trace_") else batch for n in names}
    else:
        if "max_len" not in settings:
            raise ValueError("make_search('sample') needs max_len=")

        def fn(params, states, states_mask, key):
            return sample(model, params, states, states_mask, key, **settings)
        out = {n: batch for n in ("ids", "lengths", "logprobs")}
    in_shardings = (param_shardings, batch, batch) + ((shd.replicated(mesh),)
                                                      if kind == "sample" else ())
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out)

    def run(params, states, states_mask, *key):
        if kind == "sample" and len(key) != 1:
            raise ValueError("the 'sample' search takes (params, states, states_mask, key)")
        if kind != "sample" and key:
            raise ValueError(f"the {kind!r} search takes (params, states, states_mask) only")
        if states.ndim < 1 or states.shape[0] % n_shards:
            raise ValueError(f"batch {states.shape[0] if states.ndim else None} is not divisible "
                             f"by the {n_shards} batch shards of mesh {dict(mesh.shape)} "
                             "(data x fsdp); pad the batch")
        args = jax.device_put((params, states, states_mask) + key, in_shardings)
        ctx = layers.activation_sharding(rules) if rules else contextlib.nullcontext()
        with jax.set_mesh(mesh), ctx:
            return jitted(*args)

    return run
