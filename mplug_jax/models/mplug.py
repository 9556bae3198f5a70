"""MPLUG: visual encoder + text encoder + skip-connected fusion + prefix-LM decoder + heads.

Mirrors the official `models/model_*_mplug.py` MPLUG classes. Stages are methods so every task
uses the same module:
  encode_image  float32[B, R, R, 3] -> img float[B, N, D]   (CLIP ViT; large: + visn_fc + LN)
  encode_text   ids/mask int32[B, L] -> txt float[B, L, D]
  fuse          (img, txt, txt_mask) -> (img float[B, N, D], txt float[B, L, D])
  decode        (ids, mask, states float[B, S, D], states_mask) -> logits float32[B, L, V]
  itc_project   (img_cls, txt_cls) -> L2-normalised float32[B, E] pair
  itm_logits    fused text [CLS] float[B, D] -> float32[B, 2]
  mlm_logits    fused text float[B, L, D] -> float32[B, L, V] (tied to the text embeddings)
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import heads, layers
from mplug_jax.models.bert import TextEncoder
from mplug_jax.models.decoder import TextDecoder
from mplug_jax.models.fusion import FusionEncoder, fusion_pattern
from mplug_jax.models.vit import VisionEncoder


class MPLUG(nn.Module):
    """The mPLUG network. Fields are the model config (configs/common.py presets)."""
    # Text / BERT (shared by text encoder, fusion and decoder, as the official config_bert.json).
    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    text_layers: int = 6
    fusion_layers: int = 6
    fusion_stride: int = 3
    fusion_layout: str = "skip"
    decoder_layers: int = 12
    text_ln_eps: float = 1e-12  # official: every BERT-side LayerNorm uses 1e-12 ...
    # Vision / CLIP.
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ln_eps: float = 1e-5  # ... and every CLIP LayerNorm 1e-5
    # Std of the ViT position embeddings at init; 0 = CLIP's vision_width ** -0.5. That is ~15x
    # below the patch embeddings' scale, so a tiny model trained for minutes never learns where
    # things are (grounding predicts one box); the tiny preset sets it.
    vision_posemb_init_std: float = 0.0
    # Heads.
    embed_dim: int = 256
    temp_init: float = 0.07
    # Numerics and memory.
    init_std: float = 0.02  # BERT initializer_range (official); tiny models train far better
    # from scratch with a fan-in scale (about width ** -0.5), see configs/common.py.
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "xla"
    deterministic: bool = True

    @classmethod
    def from_config(cls, cfg, **overrides) -> "MPLUG":
        """Build from a mapping of fields; unknown keys or bad values give a readable error."""
        return layers.build_model(cls, cfg, overrides, "model")

    def validate(self) -> None:
        """Check the config before any tracing; raises ValueError naming the bad field."""
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid model config: {msg}")
        layers.check_common_fields(self, need)
        need(self.vision_posemb_init_std >= 0,
             f"vision_posemb_init_std {self.vision_posemb_init_std} < 0 (0 = CLIP's default)")
        need(self.remat_policy in layers.REMAT_POLICIES,
             f"remat_policy {self.remat_policy!r} not in {sorted(layers.REMAT_POLICIES)}")
        fusion_pattern(self.fusion_layout, self.fusion_layers, self.fusion_stride)

    @property
    def pattern(self) -> str:
        return fusion_pattern(self.fusion_layout, self.fusion_layers, self.fusion_stride)

    @property
    def has_visn_fc(self) -> bool:
        """Official rule: a vision width different from the text width means the large model."""
        return self.vision_width != self.hidden_size

    @property
    def opts(self) -> layers.ModuleOptions:
        """The settings every submodule shares, from this config."""
        return layers.options_of(self)

    def setup(self):
        opts = self.opts
        stacks = dict(remat_policy=self.remat_policy, opts=opts)
        bert = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    num_heads=self.num_heads, mlp_dim=self.mlp_dim, max_len=self.max_len,
                    type_vocab_size=self.type_vocab_size, eps=self.text_ln_eps,
                    scan_layers=self.scan_layers, **stacks)
        self.vision = VisionEncoder(image_size=self.image_size, patch_size=self.patch_size,
                                    width=self.vision_width, depth=self.vision_layers,
                                    num_heads=self.vision_heads, eps=self.vision_ln_eps,
                                    posemb_init_std=self.vision_posemb_init_std,
                                    scan_layers=self.scan_layers, **stacks)
        if self.has_visn_fc:
            self.visn_fc = layers.dense(self.hidden_size, ("mlp", "embed"), opts=opts,
                                        name="visn_fc")
            # Official eps 1e-12 here, though the vision tower's own LayerNorms use 1e-5.
            self.visn_ln = layers.layer_norm(eps=1e-12, opts=opts, name="visn_ln")
        self.text = TextEncoder(depth=self.text_layers, **bert)
        self.fusion = FusionEncoder(pattern=self.pattern, num_heads=self.num_heads,
                                    mlp_dim=self.mlp_dim, eps=self.text_ln_eps, **stacks)
        self.decoder = TextDecoder(depth=self.decoder_layers, **bert)
        heads.setup_heads(self)

    def __call__(self, image, text_ids, text_mask, dec_ids, dec_mask) -> dict:
        """Full forward touching every parameter (used by `init`); VQA-style decoding over
        [fused image; fused text]. Returns a dict of the stage outputs."""
        img = self.encode_image(image)
        txt = self.encode_text(text_ids, text_mask)
        img_feat, txt_feat = self.itc_project(img[:, 0], txt[:, 0])
        f_img, f_txt = self.fuse(img, txt, text_mask)
        states = jnp.concatenate([f_img, f_txt], 1)
        states_mask = jnp.concatenate([jnp.ones(f_img.shape[:2], text_mask.dtype), text_mask], 1)
        return dict(image_embeds=img, text_embeds=txt, fusion_image=f_img, fusion_text=f_txt,
                    img_feat=img_feat, txt_feat=txt_feat,
                    itm_logits=self.itm_logits(f_txt[:, 0]), mlm_logits=self.mlm_logits(f_txt),
                    decoder_logits=self.decode(dec_ids, dec_mask, states, states_mask),
                    temp=self.temp)

    def encode_image(self, image: jax.Array) -> jax.Array:
        """float32[B, R, R, 3] -> float[B, N, D] (after visn_fc + LN for the large model)."""
        x = self.vision(image)
        if self.has_visn_fc:
            x = self.visn_ln(self.visn_fc(x))
        return x

    def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.text(ids, mask)

    def fuse(self, img: jax.Array, txt: jax.Array, txt_mask: jax.Array):
        return self.fusion(img, txt, txt_mask)

    def decode(self, ids, mask, states, states_mask) -> jax.Array:
        return self.decoder(ids, mask, states, states_mask)

    def itc_project(self, img_cls: jax.Array, txt_cls: jax.Array):
        return heads.itc_project(self, img_cls, txt_cls)

    def itm_logits(self, fused_cls: jax.Array) -> jax.Array:
        return heads.itm_logits(self, fused_cls)

    def mlm_logits(self, fused_txt: jax.Array) -> jax.Array:
        return heads.mlm_logits(self, fused_txt)

