"""mPLUG for NLVR2: one sentence, two images, a True/False classifier (paper section 5.2.2).

The paper: "two cross-attention layers to process the two input images, and their outputs are
merged and fed to the FFN. An MLP classifier is then applied on the output embedding of the
language [CLS] token" (following BLIP). The official release has no NLVR2 model; the choices
the paper leaves open are made here:

- Image encoder: the 2B images of a batch go through the visual encoder in one call
  (float32[B, 2, R, R, 3] -> [2B, ...], rows b*2 + k, so each data-parallel shard keeps its
  own rows) and stay paired as float[B, 2, N, D] through the fusion.
- Asymmetric co-attention layer 'a' (`TwinCrossLayer`): text self-attention -> two
  cross-attention branches, `cross_attn` over image 1 and `cross_attn_1` over image 2, merged
  by the MEAN of their outputs -> the one residual + `cross_ln` -> FFN. The mean (BLIP's merge
  in its lower layers; BLIP concatenates + projects in the upper six) adds no randomly
  initialised weight to the fusion path: with both branches loaded from the pretrained
  cross-attention (the task copies it, `tasks.nlvr2.twin_cross_attention`) and two identical
  images the layer is exactly the pretrained single-image layer.
- Connected-attention layers 'c' / 'm' (and the image side of 's'): each image is fused with
  the text on its own ([img_k; text] through the one pretrained joint layer, the two pairs
  batched as 2B); each image stream keeps its own output (plus the extra residual for 'c',
  as `fusion.FusionLayer`) and the two text halves are averaged. Joint attention over
  [img1; img2; text] was the alternative; per image keeps the sequence lengths and attention
  statistics of pretraining, costs 2 (N + L)^2 instead of (2N + L)^2, and again reduces to the
  pretrained layer for identical images.
- 's' layers: the text side is a `TwinCrossLayer`; each image cross-attends to the text with
  the one pretrained `image` layer (shared by both images).
- Classifier (`cls_head`): ALBEF's NLVR head, Linear(D, D) -> ReLU -> Linear(D, 2), on the
  fused text [CLS]; new weights (N(0, init_std) kernels, zero biases). Logits float32.

Parameter tree: the pretrained names it shares with `MPLUG` (vision, visn_fc, visn_ln, text,
fusion/layer_i/{text, joint, image}/...) plus `fusion/layer_i/text/cross_attn_1` and
`cls_head`; no decoder and no pretraining heads.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers
from mplug_jax.models.bert import BertLayer, TextEncoder
from mplug_jax.models.fusion import LAYER_KINDS
from mplug_jax.models.mplug import MPLUG
from mplug_jax.models.vit import VisionEncoder

NUM_IMAGES = 2


class TwinCrossLayer(nn.Module, kw_only=True):
    """BERT post-LN layer with two cross-attention branches (module docstring).

    Call: x float[B, L, D], mask bool[B, 1, 1|L, L], kv1 / kv2 float[B, N, D] (all keys valid)
    -> float[B, L, D]. Param names are `BertLayer`'s plus `cross_attn_1`.
    """
    num_heads: int
    mlp_dim: int
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, kv1: jax.Array, kv2: jax.Array):
        opts = self.opts
        drop = nn.Dropout(opts.dropout_rate, deterministic=opts.deterministic)
        h = layers.Attention(num_heads=self.num_heads, kind="self", opts=opts,
                             name="self_attn")(x, mask=mask)
        x = layers.layer_norm(eps=self.eps, opts=opts, name="self_ln")(x + drop(h))
        h1 = layers.Attention(num_heads=self.num_heads, kind="cross", opts=opts,
                              name="cross_attn")(x, kv1.astype(opts.dtype))
        h2 = layers.Attention(num_heads=self.num_heads, kind="cross", opts=opts,
                              name="cross_attn_1")(x, kv2.astype(opts.dtype))
        x = layers.layer_norm(eps=self.eps, opts=opts, name="cross_ln")(
            x + drop(0.5 * (h1 + h2)))
        h = layers.Mlp(mlp_dim=self.mlp_dim, activation=layers.gelu, opts=opts, name="mlp")(x)
        return layers.layer_norm(eps=self.eps, opts=opts, name="mlp_ln")(x + drop(h))


def _pairs(x: jax.Array) -> jax.Array:
    """float[B, 2, ...] -> float[2B, ...] (rows b*2 + k)."""
    return x.reshape((-1,) + x.shape[2:])


def _unpairs(x: jax.Array) -> jax.Array:
    """float[2B, ...] -> float[B, 2, ...] (inverse of `_pairs`)."""
    return x.reshape((-1, NUM_IMAGES) + x.shape[1:])


class TwoImageFusionLayer(nn.Module, kw_only=True):
    """One fusion layer of kind 'a', 'c', 'm' or 's' over an image pair (module docstring).

    Call: imgs float[B, 2, N, D], txt float[B, L, D], txt_mask int[B, L] -> (imgs, txt).
    """
    kind: str
    num_heads: int
    mlp_dim: int
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, imgs: jax.Array, txt: jax.Array, txt_mask: jax.Array):
        def twin(name: str) -> TwinCrossLayer:
            return TwinCrossLayer(num_heads=self.num_heads, mlp_dim=self.mlp_dim, eps=self.eps,
                                  opts=self.opts, name=name)

        def bert(cross: bool, name: str) -> BertLayer:
            return BertLayer(num_heads=self.num_heads, mlp_dim=self.mlp_dim, cross=cross,
                             eps=self.eps, opts=self.opts, name=name)

        text_mask = layers.padding_mask(txt_mask)
        rep = lambda a: jnp.repeat(a, NUM_IMAGES, axis=0)  # noqa: E731  [B] -> [2B] rows
        if self.kind == "a":
            txt = twin("text")(txt, text_mask, imgs[:, 0], imgs[:, 1])
        elif self.kind in "cm":
            flat = _pairs(imgs)  # [2B, N, D]
            n = flat.shape[1]
            joint_mask = jnp.concatenate([jnp.ones((flat.shape[0], n), txt_mask.dtype),
                                          rep(txt_mask)], 1)
            z, _ = bert(False, "joint")(jnp.concatenate([flat, rep(txt)], 1),
                                        layers.padding_mask(joint_mask))
            z_img, z_txt = _unpairs(z[:, :n]), _unpairs(z[:, n:])
            imgs = imgs + z_img if self.kind == "c" else z_img
            txt = jnp.mean(z_txt, axis=1)
        elif self.kind == "s":
            new_txt = twin("text")(txt, text_mask, imgs[:, 0], imgs[:, 1])
            new_imgs, _ = bert(True, "image")(_pairs(imgs), None, rep(txt),
                                              layers.padding_mask(rep(txt_mask)))
            imgs, txt = _unpairs(new_imgs), new_txt
        else:
            raise ValueError(f"unknown fusion layer kind {self.kind!r}; valid: {LAYER_KINDS!r}")
        return imgs, txt


class TwoImageFusion(nn.Module, kw_only=True):
    """Fusion stack over an image pair following `pattern`; params `layer_{i}` (as
    `fusion.FusionEncoder`, so the pretrained fusion loads by name).

    Call: imgs float[B, 2, N, D], txt float[B, L, D], txt_mask int[B, L] -> (imgs, txt).
    """
    pattern: str
    num_heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-12
    remat_policy: str = "none"
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, imgs: jax.Array, txt: jax.Array, txt_mask: jax.Array):
        if (imgs.ndim != 4 or imgs.shape[1] != NUM_IMAGES or imgs.shape[0] != txt.shape[0]
                or txt.shape[:2] != txt_mask.shape):
            raise ValueError(f"two-image fusion inputs disagree: images {tuple(imgs.shape)} "
                             f"(want [B, 2, N, D]), text {tuple(txt.shape)}, text mask "
                             f"{tuple(txt_mask.shape)}")
        cls = TwoImageFusionLayer
        if self.remat_policy != "none":
            cls = nn.remat(cls, policy=layers.REMAT_POLICIES[self.remat_policy])
        for i, kind in enumerate(self.pattern):
            imgs, txt = cls(kind=kind, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                            eps=self.eps, opts=self.opts, name=f"layer_{i}")(imgs, txt, txt_mask)
        return imgs, txt


class ClassifierHead(nn.Module, kw_only=True):
    """ALBEF's NLVR head: float[B, D] -> Linear(D, D) -> ReLU -> Linear(D, C) -> float32[B, C]."""
    num_classes: int
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(layers.dense(x.shape[-1], ("embed", "mlp"), opts=self.opts, name="fc1")(x))
        return layers.dense(self.num_classes, ("mlp", None), opts=self.opts,
                            name="fc2")(h).astype(jnp.float32)


class NLVR2Model(MPLUG):
    """`MPLUG`'s encoders and fusion, extended to image pairs, plus the classifier.

    Same fields as `MPLUG` (the model config presets), so `pretrained.load` and the layout
    helpers treat it as one; `num_classes` is 2 (False, True). Only the stages below exist
    (the decoder and the pretraining heads are not built).
      encode_image  float32[B', R, R, 3] -> float[B', N, D]   (inherited)
      encode_text   ids / mask int32[B, L] -> float[B, L, D]  (inherited)
      fuse_pair     (imgs float[B, 2, N, D], txt, txt_mask) -> fused text float[B, L, D]
      classify      fused text [CLS] float[B, D] -> float32[B, C]
    """
    num_classes: int = 2

    def setup(self):
        opts = self.opts
        stacks = dict(remat_policy=self.remat_policy, opts=opts)
        self.vision = VisionEncoder(image_size=self.image_size, patch_size=self.patch_size,
                                    width=self.vision_width, depth=self.vision_layers,
                                    num_heads=self.vision_heads, eps=self.vision_ln_eps,
                                    scan_layers=self.scan_layers, **stacks)
        if self.has_visn_fc:
            self.visn_fc = layers.dense(self.hidden_size, ("mlp", "embed"), opts=opts,
                                        name="visn_fc")
            self.visn_ln = layers.layer_norm(eps=1e-12, opts=opts, name="visn_ln")
        self.text = TextEncoder(depth=self.text_layers, vocab_size=self.vocab_size,
                                hidden_size=self.hidden_size, num_heads=self.num_heads,
                                mlp_dim=self.mlp_dim, max_len=self.max_len,
                                type_vocab_size=self.type_vocab_size, eps=self.text_ln_eps,
                                scan_layers=self.scan_layers, **stacks)
        self.fusion = TwoImageFusion(pattern=self.pattern, num_heads=self.num_heads,
                                     mlp_dim=self.mlp_dim, eps=self.text_ln_eps, **stacks)
        self.cls_head = ClassifierHead(num_classes=self.num_classes, opts=opts)

    def __call__(self, images: jax.Array, text_ids: jax.Array, text_mask: jax.Array
                 ) -> jax.Array:
        """images float32[B, 2, R, R, 3], text int32[B, L] -> logits float32[B, C]."""
        if images.ndim != 5 or images.shape[1] != NUM_IMAGES:
            raise ValueError(f"NLVR2 images must be float[B, 2, R, R, 3], got "
                             f"{tuple(images.shape)}")
        imgs = _unpairs(self.encode_image(_pairs(images)))
        txt = self.encode_text(text_ids, text_mask)
        return self.classify(self.fuse_pair(imgs, txt, text_mask)[:, 0])

    def fuse_pair(self, imgs: jax.Array, txt: jax.Array, txt_mask: jax.Array) -> jax.Array:
        return self.fusion(imgs, txt, txt_mask)[1]

    def classify(self, fused_cls: jax.Array) -> jax.Array:
        return self.cls_head(fused_cls)
