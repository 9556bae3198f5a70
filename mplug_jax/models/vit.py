"""CLIP ViT visual encoder (OpenAI `VisualTransformer`, `skip_last_layer=True`).

image float32[B, R, R, 3] (channels last, CLIP-normalised) -> float[B, N, Wv], N = 1 + (R/P)^2,
taken after `ln_post` (applied to every token), with no projection; LayerNorm eps 1e-5.
The image may also come as uint8[B, R, R, 3] (RGB before normalisation, what the input
pipelines ship with ``input.image_dtype='uint8'``): :func:`normalize_uint8` then normalises it
inside the jitted computation, bit-identical to the pipeline's float32 output.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mplug_jax import image_norm
from mplug_jax.models import layers

# float32[256, 3]: image_norm.normalize of every uint8 value per channel (numpy, on the host).
_NORMALIZE_TABLE = image_norm.normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1))


def normalize_uint8(image: jax.Array) -> jax.Array:
    """uint8[..., 3] RGB -> float32[..., 3] CLIP-normalised, by looking up the table that
    `image_norm.normalize` computes on the host (as the input pipelines do): bit-identical to
    normalising in the input pipeline, whatever the device's float division does."""
    table = jnp.asarray(_NORMALIZE_TABLE.reshape(-1))  # index 3 * value + channel
    return jnp.take(table, image.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32))


class ResidualBlock(nn.Module, kw_only=True):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)) with QuickGELU and a 4x MLP.
    Call: float[B, N, W] -> (float[B, N, W], None)."""
    num_heads: int
    eps: float = 1e-5
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        h = layers.layer_norm(eps=self.eps, opts=self.opts, name="ln_1")(x)
        x = x + layers.Attention(num_heads=self.num_heads, kind="self", opts=self.opts,
                                 name="attn")(h)
        h = layers.layer_norm(eps=self.eps, opts=self.opts, name="ln_2")(x)
        x = x + layers.Mlp(mlp_dim=4 * x.shape[-1], activation=layers.quick_gelu,
                           opts=self.opts, name="mlp")(h)
        return x, None


class VisionEncoder(nn.Module, kw_only=True):
    """CLIP visual tower: patch conv (no bias) -> [CLS; patches] + posemb -> ln_pre -> blocks ->
    ln_post. Call: float32[B, R, R, 3] (CLIP-normalised) or uint8[B, R, R, 3] (raw RGB,
    normalised here by :func:`normalize_uint8`) -> float[B, 1 + (R/P)^2, width]."""
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    eps: float = 1e-5
    posemb_init_std: float = 0.0  # 0: CLIP's width ** -0.5
    remat_policy: str = "none"
    scan_layers: bool = False
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be float[B, H, W, 3] or uint8[B, H, W, 3] (channels "
                             f"last, RGB), got shape {tuple(image.shape)}")
        if image.dtype == jnp.uint8:
            image = normalize_uint8(image)
        elif not jnp.issubdtype(image.dtype, jnp.floating):
            raise ValueError(f"image must be float (CLIP-normalised) or uint8 (raw RGB), got "
                             f"{image.dtype}")
        if image.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[2]} but the model expects "
                             f"{self.image_size}x{self.image_size} (config image_size)")
        opts, dt = self.opts, self.opts.dtype
        x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                    strides=(self.patch_size, self.patch_size), padding="VALID", use_bias=False,
                    kernel_init=layers.partitioned(nn.initializers.normal(opts.init_std),
                                                   (None, None, None, "embed")),
                    name="patch_embed", **opts.dtypes)(image.astype(dt))
        x = rearrange(x, "b gh gw d -> b (gh gw) d")  # row-major patch order, as torch flatten(2)
        b = x.shape[0]
        scale = self.width ** -0.5
        cls = self.param("cls_token", layers.partitioned(nn.initializers.normal(scale),
                                                         ("embed",)),
                         (self.width,), opts.param_dtype)
        pos_scale = self.posemb_init_std or scale
        pos = self.param("pos_embed", layers.partitioned(nn.initializers.normal(pos_scale),
                                                         (None, "embed")),
                         (self.grid ** 2 + 1, self.width), opts.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, self.width)), x], 1)
        x = x + pos.astype(dt)
        x = layers.layer_norm(eps=self.eps, opts=opts, name="ln_pre")(x)
        x = layers.layer_stack(ResidualBlock, self.depth, name="blocks", scan=self.scan_layers,
                               remat_policy=self.remat_policy,
                               block_kwargs=dict(num_heads=self.num_heads, eps=self.eps,
                                                 opts=opts),
                               x=x, args=())
        return layers.layer_norm(eps=self.eps, opts=opts, name="ln_post")(x)


def resample_posemb(posemb: np.ndarray, new_grid: int) -> np.ndarray:
    """Resize a CLIP positional embedding float[1 + G^2, W] to float[1 + new_grid^2, W].

    The class row is kept; the G x G patch grid is resized bilinearly with half-pixel centres
    and no antialiasing, as the official loader's `F.interpolate(mode='bilinear')`.
    """
    posemb = np.asarray(posemb)
    n, width = posemb.shape
    grid = int(round((n - 1) ** 0.5))
    if grid * grid + 1 != n:
        raise ValueError(f"positional embedding has {n} rows, not 1 + a square grid")
    if grid == new_grid:
        return posemb
    patches = jnp.asarray(rearrange(posemb[1:], "(gh gw) d -> gh gw d", gh=grid), jnp.float32)
    resized = jax.image.scale_and_translate(
        patches, (new_grid, new_grid, width), (0, 1),
        jnp.array([new_grid / grid] * 2, jnp.float32), jnp.zeros(2, jnp.float32),
        method="linear", antialias=False)
    out = np.concatenate([posemb[:1], rearrange(np.asarray(resized), "gh gw d -> (gh gw) d")], 0)
    return out.astype(posemb.dtype)
