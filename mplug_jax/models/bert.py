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


class Embeddings(nn.Module, kw_only=True):
    """ids int32[B, L] -> float[B, L, D]; `attend` gives tied output logits float32[..., V]."""
    vocab_size: int = 30522
    hidden_size: int = 768
    max_len: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    def setup(self):
        init = nn.initializers.normal(self.opts.init_std)
        kw = self.opts.dtypes
        self.word = nn.Embed(self.vocab_size, self.hidden_size,
                             embedding_init=layers.partitioned(init, ("vocab", "embed")), **kw)
        self.position = nn.Embed(self.max_len, self.hidden_size,
                                 embedding_init=layers.partitioned(init, (None, "embed")), **kw)
        self.token_type = nn.Embed(self.type_vocab_size, self.hidden_size,
                                   embedding_init=layers.partitioned(init, (None, "embed")), **kw)
        self.ln = layers.layer_norm(eps=self.eps, opts=self.opts, name="ln")
        self.dropout = nn.Dropout(self.opts.dropout_rate)

    def __call__(self, ids: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
        """`offset` (int or int32[]): position of ids[:, 0] (incremental decoding); the caller
        keeps offset + L <= max_len when it is traced."""
        length = ids.shape[-1]
        if length > self.max_len:
            raise ValueError(f"text has {length} tokens, more than max_len={self.max_len} "
                             "position embeddings; truncate it (tokenizer max_length)")
        # Gather from a table whose rows may be split over `tensor` but whose width is whole:
        # the partitioner then masks + all-reduces instead of replicating the output.
        table = layers.constrain(self.word.embedding, ("vocab", None)).astype(self.opts.dtype)
        x = layers.constrain(jnp.take(table, ids, axis=0), layers.EMBED_AXES) + self.position(
            offset + jnp.arange(length))[None] + self.token_type(jnp.zeros_like(ids))
        x = layers.constrain(self.ln(x), layers.EMBED_AXES)
        return self.dropout(x, deterministic=self.opts.deterministic)

    def attend(self, x: jax.Array) -> jax.Array:
        """float[..., D] -> float32[..., V] logits against the (tied) word embeddings."""
        dt = self.opts.dtype
        table = self.word.embedding.astype(dt)
        return jnp.einsum("...d,vd->...v", x.astype(dt), table,
                          preferred_element_type=jnp.float32)


class BertLayer(nn.Module, kw_only=True):
    """Post-LN layer. Call: x float[B, L, D], mask bool[B, 1, L|1, L], and for `cross=True`
    kv float[B, S, D] and kv_mask bool[B, 1, 1, S] (or None) -> (float[B, L, D], None).

    Incremental decoding (`pos` int32[] given, see `layers.Attention`): x holds positions
    pos .. pos + L - 1, mask is bool[B, 1, L, T] over the T cache slots, `cache` is
    {'self': {'k', 'v'} float[B, T, H, K]} plus, once computed, {'cross': {'k', 'v'}
    float[B, S, H, K]} (kv may then be None) -> (float[B, L, D], updated cache with both).
    """
    num_heads: int
    mlp_dim: int
    cross: bool = False
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x, mask, kv=None, kv_mask=None, pos=None, cache=None):
        opts = self.opts
        incremental = pos is not None
        if incremental and cache is None:
            raise ValueError("incremental decoding (pos given) needs a cache")
        new_cache = {}
        drop = nn.Dropout(opts.dropout_rate, deterministic=opts.deterministic)
        self_attn = layers.Attention(num_heads=self.num_heads, kind="self", opts=opts,
                                     name="self_attn")
        if incremental:
            h, new_cache["self"] = self_attn(x, mask=mask, cache=cache["self"], pos=pos)
        else:
            h = self_attn(x, mask=mask)
        x = layers.layer_norm(eps=self.eps, opts=opts, name="self_ln")(x + drop(h))
        if self.cross:
            cross_attn = layers.Attention(num_heads=self.num_heads, kind="cross", opts=opts,
                                          name="cross_attn")
            kv = None if kv is None else kv.astype(opts.dtype)
            if incremental:
                h, new_cache["cross"] = cross_attn(x, kv, mask=kv_mask,
                                                   cache=cache.get("cross"), pos=pos)
            else:
                h = cross_attn(x, kv, mask=kv_mask)
            x = layers.layer_norm(eps=self.eps, opts=opts, name="cross_ln")(x + drop(h))
        h = layers.Mlp(mlp_dim=self.mlp_dim, activation=layers.gelu, opts=opts, name="mlp")(x)
        x = layers.layer_norm(eps=self.eps, opts=opts, name="mlp_ln")(x + drop(h))
        return x, (new_cache if incremental else None)


class BertStack(nn.Module, kw_only=True):
    """`depth` BertLayers. Call: x float[B, L, D], mask, [kv, kv_mask] -> float[B, L, D].

    With `cache` (incremental decoding; args = mask, kv or None, kv_mask, pos as for
    `BertLayer`): the per-layer caches stacked on a leading [depth] axis, in both the loop and
    the scan layout -> (float[B, L, D], updated stacked cache).
    """
    num_heads: int
    mlp_dim: int
    depth: int
    cross: bool = False
    eps: float = 1e-12
    remat_policy: str = "none"
    scan_layers: bool = False
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array, *args: jax.Array, cache: dict | None = None):
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, cross=self.cross,
                            eps=self.eps, opts=self.opts)
        return layers.layer_stack(BertLayer, self.depth, name="layer", scan=self.scan_layers,
                                  remat_policy=self.remat_policy, block_kwargs=block_kwargs,
                                  x=x, args=args, layer_args=cache)


class TextStack(nn.Module, kw_only=True):
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
    remat_policy: str = "none"
    scan_layers: bool = False
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    def make_embeddings(self) -> Embeddings:
        return Embeddings(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          max_len=self.max_len, type_vocab_size=self.type_vocab_size,
                          eps=self.eps, opts=self.opts)

    def make_stack(self, *, cross: bool) -> BertStack:
        return BertStack(num_heads=self.num_heads, mlp_dim=self.mlp_dim, depth=self.depth,
                         cross=cross, eps=self.eps, remat_policy=self.remat_policy,
                         scan_layers=self.scan_layers, opts=self.opts)


class TextEncoder(TextStack, kw_only=True):
    """BERT text encoder: ids int32[B, L], mask int[B, L] (1 = token) -> float[B, L, D]."""

    def setup(self):
        self.embeddings = self.make_embeddings()
        self.encoder = self.make_stack(cross=False)

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
