"""Shared layers: multi-head attention (self / cross), MLP, LayerNorm, mask helpers, layer stacks.

Numerics: parameters are `param_dtype` (float32); matmuls run in `dtype` (bf16 on accelerators);
attention logits and softmax, and LayerNorm statistics, are always float32.
Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `norm`,
`layers`) that `mplug_jax.sharding` maps onto the mesh; activations inside attention and MLPs
carry `batch`/`length`/`act_*` names (`constrain`).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
INIT_STD = 0.02  # BERT initializer_range; also used for our from-scratch ViT kernels.

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def partitioned(init: Callable, names: tuple) -> Callable:
    return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype,
          name: str, use_bias: bool = True, init_std: float = INIT_STD) -> nn.Dense:
    """nn.Dense whose kernel (N(0, init_std)) has logical axes `names` and bias `names[1:]`."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=partitioned(nn.initializers.normal(init_std), names),
                    bias_init=partitioned(nn.initializers.zeros, names[1:]), name=name)


_ACTIVATION_RULES: contextvars.ContextVar[tuple] = contextvars.ContextVar("activation_rules",
                                                                         default=())


@contextlib.contextmanager
def activation_sharding(rules: tuple):
    """Trace under this (and `jax.set_mesh`) to apply `constrain`'s activation constraints.

    Separate from `nn.logical_axis_rules`, which would also constrain every parameter as it is
    unboxed (the train step's params already arrive with their shardings).
    """
    token = _ACTIVATION_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Activation sharding by logical axes (`batch`, `length`, `act_embed`, `act_heads`,
    `act_mlp`); a no-op outside `activation_sharding`. Pins batch (and, with tensor
    parallelism, heads / MLP hidden) sharding so XLA does not pick layouts that need
    involuntary rematerialisation or extra all-gathers."""
    rules = _ACTIVATION_RULES.get()
    if not rules:
        return x
    return nn.with_logical_constraint(x, names, rules=rules)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with float32 statistics and the exact (two-pass) variance, as PyTorch."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=partitioned(nn.initializers.zeros, ("norm",)), name=name)


def padding_mask(key_mask: jax.Array) -> jax.Array:
    """int/bool[B, Lk] (1 = keep) -> bool[B, 1, 1, Lk], broadcast over heads and queries."""
    return (key_mask > 0)[:, None, None, :]


def causal_padding_mask(key_mask: jax.Array) -> jax.Array:
    """int/bool[B, L] -> bool[B, 1, L, L]: query t sees keys t' <= t that are not padding."""
    length = key_mask.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None, None] & padding_mask(key_mask)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """BERT's exact erf GELU."""
    return jax.nn.gelu(x, approximate=False)


_HEADS = ("batch", "length", "act_heads", None)  # q / k / v / context float[B, L, H, K]
EMBED_AXES = ("batch", "length", "act_embed")  # the residual stream float[B, L, D]


class Attention(nn.Module):
    """Multi-head attention. `kind='self'` uses one fused qkv kernel float[D, 3, H, K];
    `kind='cross'` has a query kernel float[D, H, K] and a fused key/value kernel float[Dkv, 2, H, K].

    Call: x float[B, Lq, D], kv float[B, Lk, Dkv] (cross only), mask bool broadcastable to
    [B, H, Lq, Lk] or None -> float[B, Lq, D].
    """
    num_heads: int
    kind: str = "self"
    dropout_rate: float = 0.0
    deterministic: bool = True
    attention_impl: str = "xla"
    init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _proj(self, features: tuple, names: tuple, name: str) -> nn.DenseGeneral:
        return nn.DenseGeneral(features, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=partitioned(nn.initializers.normal(self.init_std),
                                                       names),
                               bias_init=partitioned(nn.initializers.zeros, names[1:]),
                               name=name)

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        heads, head_dim = self.num_heads, width // self.num_heads
        if self.kind == "self":
            qkv = self._proj((3, heads, head_dim), ("embed", None, "heads", "kv"), "qkv")(x)
            q, k, v = (constrain(qkv[..., i, :, :], _HEADS) for i in range(3))
        elif self.kind == "cross":
            if kv is None:
                raise ValueError("cross-attention needs key/value states")
            q = constrain(self._proj((heads, head_dim), ("embed", "heads", "kv"), "query")(x),
                          _HEADS)
            kvp = self._proj((2, heads, head_dim), ("embed", None, "heads", "kv"), "kv")(kv)
            k, v = constrain(kvp[..., 0, :, :], _HEADS), constrain(kvp[..., 1, :, :], _HEADS)
        else:
            raise ValueError(f"Attention.kind must be 'self' or 'cross', got {self.kind!r}")

        if self.attention_impl == "xla":
            ctx = self._xla_attention(q, k, v, mask)
        elif self.attention_impl in ("cudnn", "auto"):
            impl = "cudnn" if self.attention_impl == "cudnn" else None
            ctx = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        else:
            raise ValueError(f"attention_impl must be 'xla', 'cudnn' or 'auto', "
                             f"got {self.attention_impl!r}")
        out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=partitioned(nn.initializers.normal(self.init_std),
                                                      ("heads", "kv", "embed")),
                              bias_init=partitioned(nn.initializers.zeros, ("embed",)),
                              name="out")
        return constrain(out(constrain(ctx, _HEADS)), EMBED_AXES)

    def _xla_attention(self, q, k, v, mask):
        """Softmax attention; logits and softmax in float32 whatever the compute dtype."""
        head_dim = q.shape[-1]
        logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(head_dim))
        if mask is not None:
            # Official adds -10000 (self) or dtype-min (cross): in float32 both give exactly zero
            # weight, which is what a `where` gives too.
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.dropout_rate > 0 and not self.deterministic:
            probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
        return jnp.einsum("bhqs,bshk->bqhk", probs.astype(self.dtype), v)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2: float[..., D] -> float[..., D] via float[..., F]."""
    mlp_dim: int
    activation: Callable = gelu
    init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
        h = self.activation(dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(x))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return constrain(dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h), EMBED_AXES)


def layer_stack(block_cls: type[nn.Module], num: int, *, name: str, scan: bool, remat_policy: str,
                block_kwargs: dict, x: jax.Array, args: tuple) -> jax.Array:
    """Apply `num` blocks of `block_cls` to x (blocks return `(x, None)`; `args` are the same
    for every layer). Loop layout names params `{name}_{i}`; scan layout stacks them under
    `name` with a leading 'layers' axis. Must be called inside a compact method / setup of the
    parent so the blocks attach to it.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; valid: {sorted(REMAT_POLICIES)}")
    cls = block_cls
    if remat_policy != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                        "dropout": True},
                          in_axes=(nn.broadcast,) * len(args), length=num,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(**block_kwargs, name=name)(x, *args)
        return x
    for i in range(num):
        x, _ = cls(**block_kwargs, name=f"{name}_{i}")(x, *args)
    return x
