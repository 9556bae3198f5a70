"""Generation engine for the prefix-LM decoder, with a key/value cache.

The decoder reads each generated token once: `prefill` runs the prefix (usually [CLS] alone)
and computes the cross-attention keys/values of the encoder states; every later step feeds one
token at its position and attends over the cached keys/values (`TextDecoder.decode_step`).
Shapes are static (cache float[N, B, T, H, K] for T = max_len), so a whole search is one
`jax.jit`-able function; the loops are `lax.while_loop`s that stop once every row has ended.

Searches:
  greedy        argmax decoding -> int32[B, T] ([CLS] w1 .. [SEP] then [PAD]).
  beam_search   the official mPLUG beam search with all its quirks (FORMAT.md section 10.4)
                -> n-best ids / lengths / scores (+ optional per-step trace).

`model` is the `MPLUG` module (params = its full tree) or a bare `TextDecoder` (params = the
decoder's tree); the parameter tree is the one training uses, nothing is added to it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
from mplug_jax.models.decoder import TextDecoder
from mplug_jax.models.mplug import MPLUG


def _decoder(module) -> TextDecoder:
    if isinstance(module, MPLUG):
        return module.decoder
    if isinstance(module, TextDecoder):
        return module
    raise TypeError(f"generation needs an MPLUG or TextDecoder module, got {type(module)}")


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
           eos_id: int = SEP_ID, pad_id: int = PAD_ID) -> jax.Array:
    """Greedy decoding with the key/value cache; jit-compatible (`max_len` and the keyword
    settings static).

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

    logits, cache = prefill(model, params, prefix, states, states_mask, max_len)
    nxt = choose(logits[:, -1], p)
    ids = jnp.full((b, max_len), pad_id, jnp.int32).at[:, :p].set(prefix).at[:, p].set(nxt)
    done = nxt == eos_id

    def cond(carry):
        t, _, _, done = carry
        return (t < max_len - 1) & ~jnp.all(done)

    def body(carry):
        # t: position of the last token written; feeding it gives the logits for t + 1.
        t, ids, cache, done = carry
        tok = jax.lax.dynamic_slice_in_dim(ids, t, 1, axis=1)
        logits, cache = decode_step(model, params, tok, t, cache, states_mask)
        nxt = jnp.where(done, pad_id, choose(logits[:, 0], t + 1)).astype(jnp.int32)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], t + 1, axis=1)
        return t + 1, ids, cache, done | (nxt == eos_id)

    _, ids, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(p, jnp.int32), ids, cache, done))
    return ids


def _full_logits(model, params, ids, states, states_mask):
    """Uncached decoder: ids int32[R, L] (causal mask only, as the official generation),
    states float[R, S, D] -> logits float32[R, L, V]."""
    return model.apply({"params": params}, ids, jnp.ones_like(ids), states, states_mask,
                       method=lambda m, *a: _decoder(m)(*a))


def _length_penalties(max_length: int, alpha: float) -> jnp.ndarray:
    """float32[S]: ((5 + n) / 6) ** alpha for n = step + 1 generated tokens, computed in float64
    and rounded once to float32 (the official divides float32 scores by float32(lp))."""
    n = np.arange(1, max_length + 1, dtype=np.float64)
    return jnp.asarray((((5.0 + n) / 6.0) ** alpha).astype(np.float32))


def beam_search(model, params, states: jax.Array, states_mask: jax.Array, *, beam_size: int = 5,
                min_length: int = 1, max_length: int = 10, alpha: float = 0.6,
                bos_id: int = CLS_ID, eos_id: int = SEP_ID, pad_id: int = PAD_ID,
                return_trace: bool = False, use_cache: bool = True) -> dict:
    """The official mPLUG beam search (`TextGenerator._fast_translate_batch`, do_sample=False;
    ../shared/fixtures/FORMAT.md section 10.4), with the key/value cache; jit-compatible with
    the keyword settings static.

    Semantics kept on purpose: scores are summed log-probs (`log(softmax)`, float32) divided by
    ((5 + n) / 6) ** alpha, n = generated tokens; the carried value is score * lp; a slot that
    emits eos_id is stored as a hypothesis AND stays in the beam (it is extended further); an
    example ends only when its best slot emits eos_id (then all K slots are stored) or at the
    last step; eos_id gets log-prob -1e20 at steps < min_length; the stored hypotheses are
    stably sorted by score (ties: step, then slot).

    Args:
      states: float[B, S, D] encoder states (one row per example, not repeated per beam).
      states_mask: int[B, S], 1 = attend.
      beam_size: K; min_length / max_length: as the official config (max_length = steps).
    Returns dict (Lg = max_length + 1, H = max_length * K stored-hypothesis capacity):
      'ids' int32[B, K, Lg] the K best stored hypotheses, best first: bos_id, the generated
        tokens, then pad_id; 'lengths' int32[B, K] valid lengths; 'scores' float32[B, K];
      'end_step' int32[B] the step at which each example ended.
      With return_trace also 'hyp_ids' [B, H, Lg], 'hyp_lengths' / 'hyp_scores' [B, H] in
      insertion order (unused: length 0, score NaN), 'hyp_count' int32[B], and per step
      'trace_token' / 'trace_parent' int32[S, B, K] (-1 once the example has ended),
      'trace_score' / 'trace_cum_logprob' float32[S, B, K].
    use_cache=False recomputes the whole prefix at every step, as the official code (the
    reference the cached search is tested against, and the baseline of benchmarks).
    """
    b, k, steps = states.shape[0], beam_size, max_length
    if states.ndim != 3 or states.shape[:2] != states_mask.shape:
        raise ValueError(f"states {tuple(states.shape)} must be float[B, S, D] with states_mask "
                         f"int[B, S], got mask {tuple(states_mask.shape)}")
    if k < 1 or steps < 1:
        raise ValueError(f"beam_size ({k}) and max_length ({steps}) must be >= 1")
    total, cap = steps + 1, steps * k
    lps = _length_penalties(steps, alpha)
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

    def log_probs(logits):
        """float32[R, V] logits -> float32[R, V], official log(softmax(.)) (not log_softmax)."""
        return jnp.log(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))

    def advance(c, logp):
        """One search step given the slots' next-token log-probs float32[B, K, V]."""
        step = c["step"]
        logp = jnp.where((step < min_length) & (jnp.arange(vocab) == eos_id), -1e20, logp)
        lp = lps[step]
        cand = ((logp + c["cum"][..., None]) / lp).reshape(b, k * vocab)
        top_score, top_idx = jax.lax.top_k(cand, k)
        parent, token = (top_idx // vocab).astype(jnp.int32), (top_idx % vocab).astype(jnp.int32)
        alive = jnp.take_along_axis(c["alive"], parent[..., None], axis=1)
        alive = jnp.where(jnp.arange(total) == step + 1, token[..., None], alive)
        active = c["active"]
        finished = (token == eos_id) | (step == steps - 1)
        ended = finished[:, 0] & active
        finished = (finished | ended[:, None]) & active[:, None]
        slot = c["hyp_count"][:, None] + jnp.cumsum(finished, 1) - 1
        slot = jnp.where(finished, slot, cap)  # out of range: dropped by the scatters
        ex = jnp.broadcast_to(jnp.arange(b)[:, None], (b, k))
        out = dict(c)
        out["hyp_ids"] = c["hyp_ids"].at[ex, slot].set(alive, mode="drop")
        out["hyp_scores"] = c["hyp_scores"].at[ex, slot].set(top_score, mode="drop")
        out["hyp_lengths"] = c["hyp_lengths"].at[ex, slot].set(step + 2, mode="drop")
        out["hyp_count"] = c["hyp_count"] + finished.sum(1).astype(jnp.int32)
        out["end_step"] = jnp.where(ended, step, c["end_step"])
        out["active"] = active & ~ended
        out["alive"], out["cum"] = alive, top_score * lp
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
