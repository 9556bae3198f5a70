"""The ALBEF-style pretraining heads mPLUG and mPLUG-2 share (same parameter names in both):

  vision_proj / text_proj  D -> E projections of the pooled visual / text token (ITC)
  itm_head                 D -> 2 on the fused text [CLS] (vision-language matching)
  mlm_transform / mlm_ln / mlm_bias   BERT MLM head, tied to the text encoder's word embeddings
  temp                     the learnable ITC temperature (init `temp_init`)

`setup_heads(module)` is called from a model's `setup`; the model's `itc_project`, `itm_logits`
and `mlm_logits` methods call the functions below. The model needs the fields `embed_dim`,
`hidden_size`, `vocab_size`, `text_ln_eps`, `temp_init`, the property `opts` and a text encoder
at `module.text` with `embeddings.attend`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers

PARAM_NAMES = ("vision_proj", "text_proj", "itm_head", "mlm_transform", "mlm_ln", "mlm_bias",
               "temp")


def setup_heads(m: nn.Module) -> None:
    """Create the heads on `m` inside its `setup`."""
    opts = m.opts
    m.vision_proj = layers.dense(m.embed_dim, ("embed", None), opts=opts, name="vision_proj")
    m.text_proj = layers.dense(m.embed_dim, ("embed", None), opts=opts, name="text_proj")
    m.itm_head = layers.dense(2, ("embed", None), opts=opts, name="itm_head")
    m.mlm_transform = layers.dense(m.hidden_size, ("embed", "mlp"), opts=opts,
                                   name="mlm_transform")
    m.mlm_ln = layers.layer_norm(eps=m.text_ln_eps, opts=opts, name="mlm_ln")
    m.mlm_bias = m.param("mlm_bias", layers.partitioned(nn.initializers.zeros, ("vocab",)),
                         (m.vocab_size,), opts.param_dtype)
    m.temp = m.param("temp", layers.partitioned(nn.initializers.constant(m.temp_init), ()),
                     (), opts.param_dtype)


def itc_project(m: nn.Module, img_cls: jax.Array, txt_cls: jax.Array):
    """(float[B, D], float[B, D]) -> L2-normalised float32[B, E] image / text features."""
    def norm(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return norm(m.vision_proj(img_cls)), norm(m.text_proj(txt_cls))


def itm_logits(m: nn.Module, fused_cls: jax.Array) -> jax.Array:
    """Fused text [CLS] float[B, D] -> float32[B, 2] (class 1 = match)."""
    return m.itm_head(fused_cls).astype(jnp.float32)


def mlm_logits(m: nn.Module, fused_txt: jax.Array) -> jax.Array:
    """Fused text float[B, L, D] -> float32[B, L, V] (tied to the text word embeddings)."""
    h = m.mlm_ln(layers.gelu(m.mlm_transform(fused_txt)))
    return m.text.embeddings.attend(h).astype(jnp.float32) + m.mlm_bias.astype(jnp.float32)
