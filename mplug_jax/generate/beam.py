"""Beam search: the official mPLUG algorithm (docs/fixtures.md#official-beam-search) or the
standard one, over the cached decoder steps of `generate.decode`. See `mplug_jax.generate`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.generate.decode import decode_step, full_logits, prefill, step_key
from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID


def _length_penalties(max_length: int, alpha: float) -> jnp.ndarray:
    """float32[S]: ((5 + n) / 6) ** alpha for n = step + 1 generated tokens, computed in float64
    and rounded once to float32 (the official divides float32 scores by float32(lp))."""
    n = np.arange(1, max_length + 1, dtype=np.float64)
    return jnp.asarray((((5.0 + n) / 6.0) ** alpha).astype(np.float32))


def beam_search(model, params, states: jax.Array, states_mask: jax.Array, *, beam_size: int = 5,
                min_length: int = 1, max_length: int = 10, alpha: float = 0.6,
                bos_id: int = CLS_ID, eos_id: int = SEP_ID, pad_id: int = PAD_ID,
                return_trace: bool = False, use_cache: bool = True,
                official: bool = True, rng: jax.Array | None = None) -> dict:
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
    rng: dropout key, for a search in train mode (the official SCST searches with dropout
    on): pass a `model` built with deterministic=False (e.g. a task's `train_model`); decoder
    call c draws its masks from `fold_in(rng, c)` (c = 0 the prefill, then the step). With the
    cache, the keys / values of earlier positions keep the masks of the call that wrote them
    (the uncached search redraws the whole prefix at every step, as the official). None (the
    default): no dropout rng, the deterministic search.
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
        logits, cache = prefill(model, params, first, states, states_mask, steps,
                                step_key(rng, 0))
        # Every row of an example holds the same prefix ([CLS]) and states at step 0.
        cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=1), cache)
    else:
        rep_states = jnp.repeat(states, k, axis=0)
        logits, cache = full_logits(model, params, first, states, states_mask,
                                    step_key(rng, 0)), None
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
            logits = full_logits(model, params, c["alive"].reshape(b * k, total), rep_states,
                                  rep_mask, step_key(rng, step))
            return advance(c, log_probs(jax.lax.dynamic_index_in_dim(logits, step, 1, False))
                           .reshape(b, k, vocab))
        tok = jax.lax.dynamic_slice_in_dim(c["alive"], step, 1, axis=2).reshape(b * k, 1)
        logits, cache = decode_step(model, params, tok, step, c["cache"], rep_mask,
                                    rng=step_key(rng, step))
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
