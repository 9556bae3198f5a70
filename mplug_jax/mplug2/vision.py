"""The mPLUG-2 video encoder (release `VideoFormer`): CLIP ViT blocks shared by all frames,
each with two local temporal modules (`LocalTemporal`) on the patch tokens.

  DualVisionEncoder  frames float32[B, T, R, R, 3] -> float[B, 1 + T*L, Wv] (class tokens
                     averaged over frames after the last block; ln_post)

Where the release differs from the paper, the release is implemented and the difference is
named in a comment at the place it happens (docs/fixtures.md#mplug-2-release-quirks).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers


class LocalTemporal(nn.Module, kw_only=True):
    """Official `LocalTemporal` (`lmhra1` / `lmhra2`): LN -> down C->C/2 -> depthwise kernel-3
    temporal conv (zero padding) -> QuickGELU -> up C/2->C.

    Call: x float[B, T, L, C] (patch tokens only) -> float[B, T, L, C] (the residual branch;
    the caller adds it). The up projection starts at zero (official init), so a fresh module is
    an identity residual.
    """
    eps: float = 1e-5
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        opts, width = self.opts, x.shape[-1]
        # Paper: ReLU and G = C groups; release: QuickGELU, bottleneck C/2, C/2 groups of one.
        mid = width // 2
        u = layers.layer_norm(eps=self.eps, opts=opts, name="ln")(x)
        z = layers.dense(mid, ("embed", "mlp"), opts=opts, name="down_proj")(u)
        kernel = self.param("conv_kernel", layers.partitioned(
            nn.initializers.normal(opts.init_std), (None, "mlp")), (3, mid), opts.param_dtype)
        bias = self.param("conv_bias", layers.partitioned(nn.initializers.zeros, ("mlp",)),
                          (mid,), opts.param_dtype)
        kernel, bias = kernel.astype(z.dtype), bias.astype(z.dtype)
        zp = jnp.pad(z, ((0, 0), (1, 1), (0, 0), (0, 0)))  # zero padding over time
        t = z.shape[1]
        # Cross-correlation: tap 0 reads frame t-1, tap 2 reads frame t+1.
        y = bias + sum(kernel[k] * zp[:, k:k + t] for k in range(3))
        up = nn.Dense(width, **opts.dtypes, name="up_proj",
                      kernel_init=layers.partitioned(nn.initializers.zeros, ("mlp", "embed")),
                      bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
        return up(layers.quick_gelu(y))


class TemporalBlock(nn.Module, kw_only=True):
    """Official `TemporalBlock`: a pre-LN CLIP block with `lmhra1` before the attention and
    `lmhra2` between attention and MLP, each a residual on the patch tokens only.
    (Paper: one LT module per block with post-LN equations; release: two, pre-LN.)

    Call: x float[B, T, 1+L, C] (token 0 of each frame = its class token), temporal: bool
    (False: images, the temporal modules are skipped) -> (float[B, T, 1+L, C], None).
    The LT outputs are sown as intermediates 'lt1' / 'lt2' (float[B, T, L, C]).
    """
    num_heads: int
    eps: float = 1e-5
    temporal: bool = True
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        opts = self.opts
        b, t, n, c = x.shape

        def lt(name, x):
            y = LocalTemporal(eps=self.eps, opts=opts, name=name)(x[:, :, 1:])
            self.sow("intermediates", name.replace("lmhra", "lt"), y)
            return x.at[:, :, 1:].add(y)

        if self.temporal:
            x = lt("lmhra1", x)
        h = layers.layer_norm(eps=self.eps, opts=opts, name="ln_1")(x).reshape(b * t, n, c)
        attn = layers.Attention(num_heads=self.num_heads, kind="self", opts=opts, name="attn")
        x = x + attn(h).reshape(b, t, n, c)  # each frame attends within itself
        if self.temporal:
            x = lt("lmhra2", x)
        h = layers.layer_norm(eps=self.eps, opts=opts, name="ln_2")(x)
        x = x + layers.Mlp(mlp_dim=4 * c, activation=layers.quick_gelu, opts=opts,
                           name="mlp")(h)
        self.sow("intermediates", "block_out", x)
        return x, None


class DualVisionEncoder(nn.Module, kw_only=True):
    """Official `VideoFormer` (skip_last_layer): frames share the spatial weights.

    Call: frames float32[B, T, R, R, 3] (CLIP-normalised, channels last), temporal: bool
    -> float[B, 1 + T*L, C]: [mean over frames of the class tokens, frame 0 patches, ...,
    frame T-1 patches] after ln_post. No `proj`.
    """
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    eps: float = 1e-5
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @nn.compact
    def __call__(self, frames: jax.Array, temporal: bool = True) -> jax.Array:
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"video must be float[B, T, H, W, 3] (channels last), got shape "
                             f"{tuple(frames.shape)}")
        if frames.shape[2:4] != (self.image_size, self.image_size):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[3]} but the model "
                             f"expects {self.image_size}x{self.image_size} (image_size)")
        opts, dt = self.opts, self.opts.dtype
        b, t = frames.shape[:2]
        # Official Conv3d with kernel (1, P, P) = a 2D patch convolution per frame.
        x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                    strides=(self.patch_size, self.patch_size), padding="VALID", use_bias=False,
                    kernel_init=layers.partitioned(nn.initializers.normal(opts.init_std),
                                                   (None, None, None, "embed")),
                    name="patch_embed", **opts.dtypes)(
            frames.reshape((b * t,) + frames.shape[2:]).astype(dt))
        x = x.reshape(b, t, self.grid * self.grid, self.width)  # row-major patches
        scale = self.width ** -0.5
        cls = self.param("cls_token", layers.partitioned(nn.initializers.normal(scale),
                                                         ("embed",)),
                         (self.width,), opts.param_dtype)
        pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(scale),
                                                         (None, "embed")),
                         (self.grid ** 2 + 1, self.width), opts.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, t, 1, self.width)), x], 2)
        x = layers.layer_norm(eps=self.eps, opts=opts, name="ln_pre")(x + pos.astype(dt))
        for i in range(self.depth):
            x, _ = TemporalBlock(num_heads=self.num_heads, eps=self.eps, temporal=temporal,
                                 opts=opts, name=f"blocks_{i}")(x)
        # Class tokens are averaged over time AFTER the transformer (release quirk 3).
        cls_out = x[:, :, :1].mean(1)
        x = jnp.concatenate([cls_out, x[:, :, 1:].reshape(b, -1, self.width)], 1)
        return layers.layer_norm(eps=self.eps, opts=opts, name="ln_post")(x)
