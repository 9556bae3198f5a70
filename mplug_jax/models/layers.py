"""Shared layers: multi-head attention (self / cross), MLP, LayerNorm, mask helpers, layer stacks.

Numerics: parameters are `param_dtype` (float32); matmuls run in `dtype` (bf16 on accelerators);
attention logits and softmax, and LayerNorm statistics, are always float32.
Every module takes the settings all of them share (dropout, determinism, attention kernel,
init scale, dtypes) as one `opts: ModuleOptions` field, and every module is keyword-only, so no
call site depends on field order.
Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `norm`,
`layers`) that `mplug_jax.sharding` maps onto the mesh; activations inside attention and MLPs
carry `batch`/`length`/`act_*` names (`constrain`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
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


ATTENTION_IMPLS = ("xla", "cudnn", "auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleOptions:
    """Settings shared by every module of the model, passed down unchanged as `opts`.

    dropout_rate: hidden-state and attention-probability dropout (active only when
      `deterministic` is False).
    attention_impl: 'xla' (einsum + float32 softmax), 'cudnn' (fused kernel, no dropout) or
      'auto' (see `Attention`).
    init_std: std of the N(0, init_std) kernel / embedding initialisers.
    dtype / param_dtype: compute and parameter dtypes.
    """
    dropout_rate: float = 0.0
    deterministic: bool = True
    attention_impl: str = "xla"
    init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")

    @property
    def dtypes(self) -> dict:
        """`dtype=` / `param_dtype=` keywords for flax layers."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def dropout_active(self) -> bool:
        return self.dropout_rate > 0 and not self.deterministic


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def options_of(model) -> ModuleOptions:
    """The `ModuleOptions` of a model dataclass with the fields dropout_rate, deterministic,
    attention_impl, init_std and dtype / param_dtype (names in `DTYPE_NAMES`)."""
    return ModuleOptions(dropout_rate=model.dropout_rate, deterministic=model.deterministic,
                         attention_impl=model.attention_impl, init_std=model.init_std,
                         dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype))


def build_model(cls, cfg, overrides: dict, what: str):
    """`cls(**cfg, **overrides)` followed by `validate()`; keys that are not fields of `cls`
    give a ValueError naming them and the valid ones (`what` names the model in it)."""
    kwargs = {**dict(cfg), **overrides}
    valid = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; valid keys: {sorted(valid)}")
    model = cls(**kwargs)
    model.validate()
    return model


def check_common_fields(model, need) -> None:
    """The checks every model config shares (head splits, patch grid, attention kernel, dtype
    names); `need(cond, msg)` raises the model's ValueError."""
    need(model.hidden_size % model.num_heads == 0,
         f"hidden_size {model.hidden_size} not divisible by num_heads {model.num_heads}")
    need(model.vision_width % model.vision_heads == 0,
         f"vision_width {model.vision_width} not divisible by vision_heads "
         f"{model.vision_heads}")
    need(model.image_size % model.patch_size == 0,
         f"image_size {model.image_size} not divisible by patch_size {model.patch_size}")
    need(model.attention_impl in ATTENTION_IMPLS,
         f"attention_impl {model.attention_impl!r} not in {ATTENTION_IMPLS}")
    for f in ("dtype", "param_dtype"):
        need(getattr(model, f) in DTYPE_NAMES, f"{f} {getattr(model, f)!r} not in {DTYPE_NAMES}")


DEFAULT_OPTS = ModuleOptions()


def partitioned(init: Callable, names: tuple) -> Callable:
    return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str | None, str | None], *, opts: ModuleOptions,
          name: str, use_bias: bool = True) -> nn.Dense:
    """nn.Dense whose kernel (N(0, opts.init_std)) has logical axes `names`, bias `names[1:]`."""
    return nn.Dense(features, use_bias=use_bias, **opts.dtypes,
                    kernel_init=partitioned(nn.initializers.normal(opts.init_std), names),
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


def layer_norm(*, eps: float, opts: ModuleOptions, name: str) -> nn.LayerNorm:
    """LayerNorm with float32 statistics and the exact (two-pass) variance, as PyTorch."""
    return nn.LayerNorm(epsilon=eps, **opts.dtypes, use_fast_variance=False,
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


class Attention(nn.Module, kw_only=True):
    """Multi-head attention. `kind='self'` uses one fused qkv kernel float[D, 3, H, K];
    `kind='cross'` has a query kernel float[D, H, K] and a fused key/value kernel float[Dkv, 2, H, K].

    Call: x float[B, Lq, D], kv float[B, Lk, Dkv] (cross only), mask bool broadcastable to
    [B, H, Lq, Lk] or None -> float[B, Lq, D].

    Incremental decoding (`pos` given; same parameters, nothing is added to the tree): returns
    (float[B, Lq, D], cache) with cache = {'k', 'v'}.
      self:  `cache` {'k', 'v'} float[B, T, H, K] holds the keys / values of positions < pos;
             x holds positions pos .. pos + Lq - 1, whose keys / values are written in with
             `dynamic_update_slice`; the queries attend over all T slots, so `mask` (bool
             broadcastable to [B, H, Lq, T]) must hide the slots not written yet.
      cross: with `kv` the keys / values float[B, S, H, K] are projected from it and returned
             as the cache; with kv None they are read from `cache` (computed once per search).

    `opts.attention_impl`:
      'xla'    einsum attention with float32 logits / softmax and attention-probability dropout.
      'cudnn'  `jax.nn.dot_product_attention(implementation='cudnn')` (GPU only). That kernel
               has no dropout, so with dropout active (dropout_rate > 0, deterministic=False)
               it raises a ValueError at trace time instead of silently skipping it.
      'auto'   `jax.nn.dot_product_attention(implementation=None)` (cuDNN where available,
               else XLA) when dropout is inactive; falls back to the 'xla' path when dropout is
               active, so the dropout is always applied.
    """
    num_heads: int
    kind: str = "self"
    opts: ModuleOptions = DEFAULT_OPTS

    def _proj(self, features: tuple, names: tuple, name: str) -> nn.DenseGeneral:
        return nn.DenseGeneral(features, axis=-1, **self.opts.dtypes,
                               kernel_init=partitioned(nn.initializers.normal(self.opts.init_std),
                                                       names),
                               bias_init=partitioned(nn.initializers.zeros, names[1:]),
                               name=name)

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None = None,
                 mask: jax.Array | None = None, *, cache: dict | None = None,
                 pos: jax.Array | None = None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        heads, head_dim = self.num_heads, width // self.num_heads
        incremental = pos is not None
        if self.kind == "self":
            qkv = self._proj((3, heads, head_dim), ("embed", None, "heads", "kv"), "qkv")(x)
            q, k, v = (constrain(qkv[..., i, :, :], _HEADS) for i in range(3))
            if incremental:
                if cache is None:
                    raise ValueError("incremental self-attention needs a key/value cache")
                start = (0, pos, 0, 0)
                k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
                v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        elif self.kind == "cross":
            q = constrain(self._proj((heads, head_dim), ("embed", "heads", "kv"), "query")(x),
                          _HEADS)
            if kv is not None:
                kvp = self._proj((2, heads, head_dim), ("embed", None, "heads", "kv"), "kv")(kv)
                k, v = constrain(kvp[..., 0, :, :], _HEADS), constrain(kvp[..., 1, :, :], _HEADS)
            elif incremental and cache is not None:
                k, v = cache["k"], cache["v"]
            else:
                raise ValueError("cross-attention needs key/value states (or, when decoding "
                                 "incrementally, a cache of their keys/values)")
        else:
            raise ValueError(f"Attention.kind must be 'self' or 'cross', got {self.kind!r}")

        ctx = self._attend(q, k, v, mask)
        out = nn.DenseGeneral(width, axis=(-2, -1), **self.opts.dtypes,
                              kernel_init=partitioned(nn.initializers.normal(self.opts.init_std),
                                                      ("heads", "kv", "embed")),
                              bias_init=partitioned(nn.initializers.zeros, ("embed",)),
                              name="out")
        y = constrain(out(constrain(ctx, _HEADS)), EMBED_AXES)
        return (y, {"k": k, "v": v}) if incremental else y

    def _attend(self, q, k, v, mask):
        """q float[B, Lq, H, K], k / v float[B, Lk, H, K] -> context float[B, Lq, H, K]."""
        impl, drop = self.opts.attention_impl, self.opts.dropout_active
        if impl == "cudnn" and drop:
            raise ValueError(
                f"attention_impl='cudnn' has no attention dropout, but dropout_rate="
                f"{self.opts.dropout_rate} with deterministic=False asks for it; set "
                "attention_impl='xla' (or 'auto', which falls back to xla while dropout is "
                "active), or model.dropout_rate=0")
        if impl == "xla" or (impl == "auto" and drop):
            return self._xla_attention(q, k, v, mask)
        if impl in ("cudnn", "auto"):
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else None)
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")

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
        if self.opts.dropout_active:
            probs = nn.Dropout(self.opts.dropout_rate)(probs, deterministic=False)
        return jnp.einsum("bhqs,bshk->bqhk", probs.astype(self.opts.dtype), v)


class Mlp(nn.Module, kw_only=True):
    """fc1 -> activation -> fc2: float[..., D] -> float[..., D] via float[..., F]."""
    mlp_dim: int
    activation: Callable = gelu
    opts: ModuleOptions = DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(dense(self.mlp_dim, ("embed", "mlp"), opts=self.opts, name="fc1")(x))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return constrain(dense(x.shape[-1], ("mlp", "embed"), opts=self.opts, name="fc2")(h),
                         EMBED_AXES)


def layer_stack(block_cls: type[nn.Module], num: int, *, name: str, scan: bool, remat_policy: str,
                block_kwargs: dict, x: jax.Array, args: tuple, layer_args: Any = None):
    """Apply `num` blocks of `block_cls` to x (blocks return `(x, y)`; `args` are the same
    for every layer). Loop layout names params `{name}_{i}`; scan layout stacks them under
    `name` with a leading 'layers' axis. Must be called inside a compact method / setup of the
    parent so the blocks attach to it.

    Without `layer_args` returns x (the blocks' y is dropped). With `layer_args` (a pytree whose
    leaves have a leading axis of size `num`, e.g. a per-layer key/value cache) block i also gets
    slice i as its last argument, and the result is (x, ys) with the blocks' y stacked the same
    way, in both layouts.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; valid: {sorted(REMAT_POLICIES)}")
    cls = block_cls
    if remat_policy != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    per_layer = layer_args is not None
    extra = (layer_args,) if per_layer else ()
    if scan:
        scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                        "dropout": True},
                          in_axes=(nn.broadcast,) * len(args) + (0,) * len(extra), length=num,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, ys = scanned(**block_kwargs, name=name)(x, *args, *extra)
        return (x, ys) if per_layer else x
    ys = []
    for i in range(num):
        sliced = tuple(jax.tree.map(lambda a, i=i: a[i], e) for e in extra)
        x, y = cls(**block_kwargs, name=f"{name}_{i}")(x, *args, *sliced)
        ys.append(y)
    if not per_layer:
        return x
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)
