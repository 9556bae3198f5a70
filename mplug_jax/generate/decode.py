"""Decoding with the key/value cache: the cache steps every search shares (`init_cache`,
`prefill`, `decode_step`, the uncached `full_logits`), and the greedy searches (`greedy`,
`coordinate_greedy`) and sampling (`sample`). See `mplug_jax.generate`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
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


def _rngs(rng: jax.Array | None):
    return None if rng is None else {"dropout": rng}


def step_key(rng: jax.Array | None, call) -> jax.Array | None:
    """The dropout key of a search's decoder call number `call` (int or int32[]): None
    without dropout, else `fold_in(rng, call)` (fresh masks at every call)."""
    return None if rng is None else jax.random.fold_in(rng, call)


def decode_step(model, params, ids: jax.Array, pos, cache: dict, states_mask: jax.Array,
                states: jax.Array | None = None, key_mask: jax.Array | None = None,
                rng: jax.Array | None = None):
    """One cached decoder call: ids int32[B, L] at positions pos .. pos + L - 1
    -> (logits float32[B, L, V], cache). `states` float[B, S, D] is needed on the first call
    (prefill) only. See `TextDecoder.decode_step`. `rng`: dropout key, used when `model` was
    built with deterministic=False (see `beam_search`); None: no dropout rng."""
    return model.apply({"params": params}, ids, pos, cache, states_mask, states, key_mask,
                       method=lambda m, *a: _decoder(m).decode_step(*a), rngs=_rngs(rng))


def prefill(model, params, prefix: jax.Array, states: jax.Array, states_mask: jax.Array,
            length: int, rng: jax.Array | None = None):
    """Run the prefix int32[B, P] through a fresh cache of `length` slots (`rng`: dropout key,
    as `decode_step`).

    Returns (logits float32[B, P, V], cache holding positions 0 .. P-1 and the
    cross-attention keys/values of `states` float[B, S, D])."""
    cache = init_cache(model, params, prefix.shape[0], length)
    return decode_step(model, params, prefix, 0, cache, states_mask, states, rng=rng)


def check_inputs(states, states_mask, prefix, max_len):
    """ValueError unless states float[B, S, D], states_mask int[B, S] and prefix int[B, P]
    agree, with 1 <= P < max_len."""
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
           eos_id: int = SEP_ID, pad_id: int = PAD_ID, use_cache: bool = True,
           rng: jax.Array | None = None) -> jax.Array:
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
      rng: dropout key for a `model` built with deterministic=False (as `beam_search`).
    Returns:
      int32[B, T]: the prefix, the argmax tokens up to and including the first eos_id, then
      pad_id (as `tasks.pretrain.Task.greedy_decode`, which recomputes the whole prefix at
      every step).
    """
    b = states.shape[0]
    if prefix is None:
        prefix = jnp.full((b, 1), bos_id, jnp.int32)
    prefix = jnp.asarray(prefix, jnp.int32)
    check_inputs(states, states_mask, prefix, max_len)
    p = prefix.shape[1]

    def choose(logits, t):
        """logits float32[B, V] for output position t -> int32[B]."""
        if min_length:
            banned = (t - p) < min_length
            logits = logits.at[:, eos_id].set(
                jnp.where(banned, -jnp.inf, logits[:, eos_id]))
        return jnp.argmax(logits, -1).astype(jnp.int32)

    k0 = step_key(rng, 0)
    if use_cache:
        logits, cache = prefill(model, params, prefix, states, states_mask, max_len, k0)
    else:
        logits, cache = full_logits(model, params, prefix, states, states_mask, k0), None
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
            logits, cache = decode_step(model, params, tok, t, cache, states_mask,
                                        rng=step_key(rng, t))
            logits = logits[:, 0]
        else:  # causal: the padding after t does not change the logits at t
            logits = jax.lax.dynamic_index_in_dim(
                full_logits(model, params, ids, states, states_mask, step_key(rng, t)), t, 1,
                False)
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
           pad_id: int = PAD_ID, rng: jax.Array | None = None) -> dict:
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
      rng: dropout key for a `model` built with deterministic=False (as `beam_search`).
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
    check_inputs(states, states_mask, first, max_len)
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

    logits, cache = prefill(model, params, first, states, states_mask, max_len,
                            step_key(rng, 0))
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
        logits, cache = decode_step(model, params, tok, t, cache, rep_mask,
                                    rng=step_key(rng, t))
        nxt, logp = draw(logits[:, 0], t + 1, key)
        nxt = jnp.where(done, pad_id, nxt)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, nxt[:, None], t + 1, axis=1)
        total = total + jnp.where(done, 0.0, logp)
        length = length + (~done).astype(jnp.int32)
        return t + 1, ids, cache, done | (nxt == eos_id), total, length

    _, ids, _, _, total, length = jax.lax.while_loop(cond, body, carry)
    return dict(ids=ids.reshape(b, n, max_len), lengths=length.reshape(b, n),
                logprobs=total.reshape(b, n))


def full_logits(model, params, ids, states, states_mask, rng: jax.Array | None = None):
    """Uncached decoder: ids int32[R, L] (causal mask only, as the official generation),
    states float[R, S, D] -> logits float32[R, L, V] (`rng`: dropout key, as `decode_step`)."""
    return model.apply({"params": params}, ids, jnp.ones_like(ids), states, states_mask,
                       method=lambda m, *a: _decoder(m)(*a), rngs=_rngs(rng))


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
    check_inputs(states, states_mask, seq, steps + 1)
    if use_cache:
        logits, cache = prefill(model, params, seq, states, states_mask, steps + 1)
    else:
        logits = full_logits(model, params, seq, states, states_mask)
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
            logits = full_logits(model, params, seq, states, states_mask)
    tokens = jnp.stack(toks, 1)
    return (tokens, jnp.stack(raws, 1)) if return_scores else tokens
