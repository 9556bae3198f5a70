"""Prefix-LM text decoder (official `BertLMHeadModel` / `BertPrefixModel`).

BERT embeddings -> layers of [causal self-attention -> cross-attention to encoder states -> FFN]
-> LM head: LN(gelu(dense(h)), eps 1e-12) @ word_embeddings^T + bias (output tied to the
decoder's own word embeddings).
Call: ids int32[B, L], mask int[B, L], states float[B, S, D], states_mask int[B, S]
-> logits float32[B, L, V] (position t predicts token t + 1).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers
from mplug_jax.models.bert import TextStack, check_text


class TextDecoder(TextStack, kw_only=True):
    """Prefix-LM decoder (module docstring); 12 layers like the official decoder."""
    depth: int = 12

    def setup(self):
        self.embeddings = self.make_embeddings()
        self.decoder = self.make_stack(cross=True)
        self.lm_transform = layers.dense(self.hidden_size, ("embed", "mlp"), opts=self.opts,
                                         name="lm_transform")
        self.lm_ln = layers.layer_norm(eps=self.eps, opts=self.opts, name="lm_ln")
        self.lm_bias = self.param("lm_bias", layers.partitioned(nn.initializers.zeros,
                                                                ("vocab",)),
                                  (self.vocab_size,), self.opts.param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array, states: jax.Array,
                 states_mask: jax.Array) -> jax.Array:
        return self.lm_logits(self.hidden(ids, mask, states, states_mask))

    def hidden(self, ids, mask, states, states_mask) -> jax.Array:
        """Decoder states float[B, L, D] before the LM head."""
        check_text(ids, mask)
        if states.shape[:2] != states_mask.shape or states.shape[0] != ids.shape[0]:
            raise ValueError(f"decoder states {tuple(states.shape)} / mask "
                             f"{tuple(states_mask.shape)} do not match ids {tuple(ids.shape)}")
        return self.decoder(self.embeddings(ids), layers.causal_padding_mask(mask), states,
                            layers.padding_mask(states_mask))

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """float[B, L, D] -> float32[B, L, V]."""
        h = self.lm_ln(layers.gelu(self.lm_transform(h)))
        return self.embeddings.attend(h) + self.lm_bias.astype(jnp.float32)

    # ---- incremental decoding (key/value cache) -------------------------------------------
    # The cache is a plain pytree passed in and out (no flax 'cache' collection), so a search
    # can carry it through lax loops and reorder its batch rows (beams) freely:
    #   {'self':  {'k', 'v'} float[N, B, T, H, K]   keys/values of positions written so far,
    #    'cross': {'k', 'v'} float[N, B, S, H, K]}  encoder-state keys/values (after prefill)
    # with N = depth, T = cache length (max decoded length), H heads of K = D / H.

    def init_cache(self, batch: int, length: int) -> dict:
        """Empty self-attention cache for `batch` rows and `length` positions:
        {'self': {'k', 'v'} zeros float[N, B, T, H, K]} in the compute dtype."""
        if length > self.max_len:
            raise ValueError(f"cache length {length} exceeds the decoder's max_len={self.max_len} "
                             "position embeddings")
        shape = (self.depth, batch, length, self.num_heads, self.hidden_size // self.num_heads)
        z = jnp.zeros(shape, self.opts.dtype)
        return {"self": {"k": z, "v": z}}

    def decode_step(self, ids: jax.Array, pos, cache: dict, states_mask: jax.Array,
                    states: jax.Array | None = None,
                    key_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Logits of L new tokens given the cache of the positions before them.

        Args:
          ids: int32[B, L], the tokens at positions pos .. pos + L - 1.
          pos: int or int32[], position of ids[:, 0]; pos + L <= T.
          cache: from `init_cache` (then `states` is required: the prefill step computes the
            cross-attention keys/values from it) or from a previous `decode_step`.
          states_mask: int[B, S] (1 = attend) for the encoder states.
          states: float[B, S, D] encoder states, or None once the cache holds 'cross'.
          key_mask: optional int[B, T] (1 = attend) over the T cache slots, e.g. padded
            prefixes; default: every written slot (official generation: causal only).
        Returns:
          (logits float32[B, L, V], cache with both 'self' and 'cross', slots pos .. pos+L-1
          written). Equals `__call__` on the whole sequence at those positions.
        """
        check_text(ids, ids)
        if states is None and "cross" not in cache:
            raise ValueError("the first decode_step needs the encoder states (the cache has "
                             "no cross-attention keys/values yet)")
        b, length = ids.shape
        slots = cache["self"]["k"].shape[2]
        query_pos = pos + jnp.arange(length)
        mask = (jnp.arange(slots)[None, :] <= query_pos[:, None])[None, None]  # [1, 1, L, T]
        if key_mask is not None:
            mask = mask & layers.padding_mask(key_mask)
        mask = jnp.broadcast_to(mask, (b, 1, length, slots))
        x = self.embeddings(ids, offset=pos)
        h, cache = self.decoder(x, mask, states, layers.padding_mask(states_mask),
                                jnp.asarray(pos, jnp.int32), cache=cache)
        return self.lm_logits(h), cache
