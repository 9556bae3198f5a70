"""BERT building blocks (post-LN) and the text encoder.

Mirrors HF `BertModel` as used by the official mPLUG (no pooler): embeddings = word + position +
token type 0, LayerNorm eps 1e-12; layers = self-attention -> [cross-attention] -> FFN, each
followed by residual + LayerNorm; exact erf GELU.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers
from mplug_jax.models.layers import Dtype


class Embeddings(nn.Module):
    """ids int32[B, L] -> float[B, L, D]; `attend` gives tied output logits float32[..., V]."""
    vocab_size: int = 30522
    hidden_size: int = 768
    max_len: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    dropout_rate: float = 0.0
    deterministic: bool = True
    init_std: float = layers.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        init = nn.initializers.normal(self.init_std)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word = nn.Embed(self.vocab_size, self.hidden_size,
                             embedding_init=layers.partitioned(init, ("vocab", "embed")), **kw)
        self.position = nn.Embed(self.max_len, self.hidden_size,
                                 embedding_init=layers.partitioned(init, (None, "embed")), **kw)
        self.token_type = nn.Embed(self.type_vocab_size, self.hidden_size,
                                   embedding_init=layers.partitioned(init, (None, "embed")), **kw)
        self.ln = layers.layer_norm(self.eps, name="ln", **kw)
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, ids: jax.Array) -> jax.Array:
        length = ids.shape[-1]
        if length > self.max_len:
            raise ValueError(f"text has {length} tokens, more than max_len={self.max_len} "
                             "position embeddings; truncate it (tokenizer max_length)")
        # Gather from a table whose rows may be split over `tensor` but whose width is whole:
        # the partitioner then masks + all-reduces instead of replicating the output.
        table = layers.constrain(self.word.embedding, ("vocab", None)).astype(self.dtype)
        x = layers.constrain(jnp.take(table, ids, axis=0), layers.EMBED_AXES) + self.position(
            jnp.arange(length))[None] + self.token_type(jnp.zeros_like(ids))
        x = layers.constrain(self.ln(x), layers.EMBED_AXES)
        return self.dropout(x, deterministic=self.deterministic)

    def attend(self, x: jax.Array) -> jax.Array:
        """float[..., D] -> float32[..., V] logits against the (tied) word embeddings."""
        table = self.word.embedding.astype(self.dtype)
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), table,
                          preferred_element_type=jnp.float32)


class BertLayer(nn.Module):
    """Post-LN layer. Call: x float[B, L, D], mask bool[B, 1, L|1, L], and for `cross=True`
    kv float[B, S, D] and kv_mask bool[B, 1, 1, S] (or None) -> (float[B, L, D], None)."""
    num_heads: int
    mlp_dim: int
    cross: bool = False
    eps: float = 1e-12
    dropout_rate: float = 0.0
    deterministic: bool = True
    attention_impl: str = "xla"
    init_std: float = layers.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, kv=None, kv_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(dropout_rate=self.dropout_rate, deterministic=self.deterministic,
                       attention_impl=self.attention_impl, init_std=self.init_std, **kw)
        drop = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)
        h = layers.Attention(self.num_heads, "self", name="self_attn", **attn_kw)(x, mask=mask)
        x = layers.layer_norm(self.eps, name="self_ln", **kw)(x + drop(h))
        if self.cross:
            h = layers.Attention(self.num_heads, "cross", name="cross_attn", **attn_kw)(
                x, kv.astype(self.dtype), mask=kv_mask)
            x = layers.layer_norm(self.eps, name="cross_ln", **kw)(x + drop(h))
        h = layers.Mlp(self.mlp_dim, layers.gelu, self.init_std, name="mlp", **kw)(x)
        x = layers.layer_norm(self.eps, name="mlp_ln", **kw)(x + drop(h))
        return x, None


class BertStack(nn.Module):
    """`depth` BertLayers. Call: x float[B, L, D], mask, [kv, kv_mask] -> float[B, L, D]."""
    num_heads: int
    mlp_dim: int
    depth: int
    cross: bool = False
    eps: float = 1e-12
    dropout_rate: float = 0.0
    deterministic: bool = True
    attention_impl: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = False
    init_std: float = layers.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *args: jax.Array) -> jax.Array:
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, cross=self.cross,
                            eps=self.eps, dropout_rate=self.dropout_rate,
                            deterministic=self.deterministic, attention_impl=self.attention_impl,
                            init_std=self.init_std, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        return layers.layer_stack(BertLayer, self.depth, name="layer", scan=self.scan_layers,
                                  remat_policy=self.remat_policy, block_kwargs=block_kwargs,
                                  x=x, args=args)


class TextStack(nn.Module):
    """Fields shared by the BERT text encoder and the prefix-LM decoder (official
    `BertConfig`): embeddings + `depth` layers of `hidden_size`."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    depth: int = 6
    max_len: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    dropout_rate: float = 0.0
    deterministic: bool = True
    attention_impl: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = False
    init_std: float = layers.INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class TextEncoder(TextStack):
    """BERT text encoder: ids int32[B, L], mask int[B, L] (1 = token) -> float[B, L, D]."""

    def setup(self):
        self.embeddings = Embeddings(self.vocab_size, self.hidden_size, self.max_len,
                                     self.type_vocab_size, self.eps, self.dropout_rate,
                                     self.deterministic, self.init_std, self.dtype,
                                     self.param_dtype)
        self.encoder = BertStack(self.num_heads, self.mlp_dim, self.depth, False, self.eps,
                                 self.dropout_rate, self.deterministic, self.attention_impl,
                                 self.remat_policy, self.scan_layers, self.init_std, self.dtype,
                                 self.param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        check_text(ids, mask)
        return self.encoder(self.embeddings(ids), layers.padding_mask(mask))


def check_text(ids: jax.Array, mask: jax.Array) -> None:
    """Readable errors for malformed text inputs (raised at trace time, before any compute)."""
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"text ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both "
                         "be int[B, L]")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"text ids must be integers, got {ids.dtype}")
