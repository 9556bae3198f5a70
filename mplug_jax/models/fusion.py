"""The cross-modal skip-connected fusion encoder and the comparison networks of the paper.

A fusion network is a pattern string with one character per running layer:
  'a'  asymmetric co-attention: text self-attention -> cross-attention to the image -> FFN;
       the image passes through unchanged (mPLUG's co-attention layer; BLIP-style fusion).
  'c'  connected attention, official flavour: self-attention + FFN over [image; text]; the text
       half replaces the text, the image half is ADDED to the incoming image (official quirk:
       a second residual on top of the ones inside the layer).
  'm'  merged attention: like 'c' without the extra image residual (single-stream fusion).
  's'  symmetric co-attention: both streams self-attend and cross-attend to each other.

Call: img float[B, N, D], txt float[B, L, D], txt_mask int[B, L] -> (img, txt), same shapes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers
from mplug_jax.models.bert import BertLayer

LAYOUTS = ("skip", "skip_alg1", "connected", "coattn", "asym")
LAYER_KINDS = "acms"


def fusion_pattern(layout: str, num_layers: int, stride: int) -> str:
    """Per-layer kinds for a named layout or an explicit pattern.

    'skip' is the official rule: relative layer r is connected iff r != 0 and r % stride == 0
    (so stride 6 with 6 layers has no connected layer, as the official large model).
    'skip_alg1' is the paper's Algorithm 1: layer i (from 1) is connected iff i % (S+1) == 0.
    'connected' = all merged attention, 'coattn' = all symmetric co-attention,
    'asym' = all asymmetric co-attention. Any other value must be a string over 'acms' of
    length `num_layers`.
    """
    if num_layers < 1:
        raise ValueError(f"fusion_layers must be >= 1, got {num_layers}")
    if layout in ("skip", "skip_alg1") and stride < 1:
        raise ValueError(f"fusion_stride must be >= 1, got {stride}")
    if layout == "skip":
        return "".join("c" if r and r % stride == 0 else "a" for r in range(num_layers))
    if layout == "skip_alg1":
        return "".join("c" if i % (stride + 1) == 0 else "a" for i in range(1, num_layers + 1))
    if layout == "connected":
        return "m" * num_layers
    if layout == "coattn":
        return "s" * num_layers
    if layout == "asym":
        return "a" * num_layers
    if len(layout) != num_layers or set(layout) - set(LAYER_KINDS):
        raise ValueError(f"fusion_layout {layout!r} is neither one of {LAYOUTS} nor a pattern "
                         f"of {num_layers} characters from {LAYER_KINDS!r}")
    return layout


class FusionLayer(nn.Module, kw_only=True):
    """One fusion layer of kind 'a', 'c', 'm' or 's' (module docstring)."""
    kind: str
    num_heads: int
    mlp_dim: int
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, img: jax.Array, txt: jax.Array, txt_mask: jax.Array):
        def bert_layer(cross: bool, name: str) -> BertLayer:
            return BertLayer(num_heads=self.num_heads, mlp_dim=self.mlp_dim, cross=cross,
                             eps=self.eps, opts=self.opts, name=name)

        text_mask = layers.padding_mask(txt_mask)
        if self.kind == "a":
            txt, _ = bert_layer(True, "text")(txt, text_mask, img, None)
        elif self.kind in "cm":
            n = img.shape[1]
            joint_mask = jnp.concatenate([jnp.ones_like(txt_mask[:, :1]).repeat(n, 1),
                                          txt_mask], 1)
            z, _ = bert_layer(False, "joint")(jnp.concatenate([img, txt], 1),
                                              layers.padding_mask(joint_mask))
            z_img, txt = z[:, :n], z[:, n:]
            img = img + z_img if self.kind == "c" else z_img
        elif self.kind == "s":
            new_txt, _ = bert_layer(True, "text")(txt, text_mask, img, None)
            img, _ = bert_layer(True, "image")(img, None, txt, text_mask)
            txt = new_txt
        else:
            raise ValueError(f"unknown fusion layer kind {self.kind!r}; valid: {LAYER_KINDS!r}")
        return img, txt


class FusionEncoder(nn.Module, kw_only=True):
    """Stack of fusion layers following `pattern` (see `fusion_pattern`); params `layer_{i}`."""
    pattern: str
    num_heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-12
    remat_policy: str = "none"
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, img: jax.Array, txt: jax.Array, txt_mask: jax.Array):
        if img.shape[0] != txt.shape[0] or txt.shape[:2] != txt_mask.shape:
            raise ValueError(f"fusion inputs disagree: image {tuple(img.shape)}, text "
                             f"{tuple(txt.shape)}, text mask {tuple(txt_mask.shape)}")
        cls = FusionLayer
        if self.remat_policy != "none":
            cls = nn.remat(FusionLayer, policy=layers.REMAT_POLICIES[self.remat_policy])
        for i, kind in enumerate(self.pattern):
            img, txt = cls(kind=kind, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                           eps=self.eps, opts=self.opts, name=f"layer_{i}")(img, txt, txt_mask)
        return img, txt
