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
