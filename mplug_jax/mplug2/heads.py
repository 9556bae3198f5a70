"""mPLUG-2 with the heads of retrieval and pretraining (the release has neither).

`MPLUG2WithHeads` is `models.mplug2.MPLUG2` (same fields, same parameter names: a converted
release checkpoint or a `mplug2_video_qa` workdir loads into it unchanged) plus, at the top of
the parameter tree, the ALBEF-style heads of mPLUG v1 (`models/heads.py`: ITC projections, ITM
head, tied MLM head, temperature).

These heads are new parameters: loading a release checkpoint leaves them at their random init
(documented in the tasks).

Stages added (shapes; H = hidden_size, E = embed_dim):
  visual_embeds  video float32[B, T, R, R, 3] (dual vision encoder with the local temporal
                 modules) or image float32[B, R, R, 3] (image path: the spatial blocks only,
                 as a 1-frame clip) -> universal-layer outputs float[B, N, H]
                 (`MPLUG2.image_embeds`); token 0 is the pooled ([CLS]-like) visual token:
                 the frame-averaged class token after the universal layers.
  itc_project    (img_cls float[B, H], txt_cls float[B, H]) -> unit float32[B, E] pair
  itm_logits     fused text [CLS] float[B, H] -> float32[B, 2]
  mlm_logits     fused text float[B, L, H] -> float32[B, L, V]
"""
from __future__ import annotations

import jax

from mplug_jax.models import heads
from mplug_jax.mplug2 import model as mplug2

HEAD_PARAMS = heads.PARAM_NAMES


class MPLUG2WithHeads(mplug2.MPLUG2):
    """`MPLUG2` + ITC projections, ITM head, MLM head and temperature (module docstring)."""
    embed_dim: int = 256
    temp_init: float = 0.07

    def validate(self) -> None:
        super().validate()
        if self.embed_dim < 1:
            raise ValueError(f"invalid mPLUG-2 config: embed_dim must be >= 1, got "
                             f"{self.embed_dim}")
        if not self.temp_init > 0:
            raise ValueError(f"invalid mPLUG-2 config: temp_init must be > 0, got "
                             f"{self.temp_init}")

    def setup(self):
        super().setup()
        heads.setup_heads(self)

    def __call__(self, video, text_ids, text_mask, dec_ids, dec_mask) -> dict:
        """Forward touching every parameter (used by `init`): video float32[B, T, R, R, 3],
        text ids/mask int32[B, L], decoder ids/mask int32[B, Ld]."""
        img = self.visual_embeds(video)
        txt = self.encode_text(text_ids, text_mask)
        img_feat, txt_feat = self.itc_project(img[:, 0], txt[:, 0])
        f_img, f_txt = self.fuse(img, txt, text_mask)
        states, smask = mplug2.vqa_states(f_img, f_txt, text_mask)
        return dict(image_embeds=img, text_embeds=txt, img_feat=img_feat, txt_feat=txt_feat,
                    itm_logits=self.itm_logits(f_txt[:, 0]), mlm_logits=self.mlm_logits(f_txt),
                    decoder_logits=self.decode(dec_ids, dec_mask, states, smask),
                    temp=self.temp)

    def visual_embeds(self, visual: jax.Array) -> jax.Array:
        """Video float32[B, T, R, R, 3] or image float32[B, R, R, 3] -> universal-layer
        outputs float[B, N, H] (N = 1 + T * L for a video, 1 + L for an image)."""
        if visual.ndim == 5:
            return self.image_embeds(self.encode_video(visual))
        if visual.ndim == 4:
            return self.image_embeds(self.encode_image(visual))
        raise ValueError(f"visual input must be a video float[B, T, H, W, 3] or an image "
                         f"float[B, H, W, 3], got shape {tuple(visual.shape)}")

    def itc_project(self, img_cls: jax.Array, txt_cls: jax.Array):
        """(float[B, H], float[B, H]) -> L2-normalised float32[B, E] image / text features."""
        return heads.itc_project(self, img_cls, txt_cls)

    def itm_logits(self, fused_cls: jax.Array) -> jax.Array:
        """Fused text [CLS] float[B, H] -> float32[B, 2] (class 1 = match)."""
        return heads.itm_logits(self, fused_cls)

    def mlm_logits(self, fused_txt: jax.Array) -> jax.Array:
        """Fused text float[B, L, H] -> float32[B, L, V] (tied to the word embeddings)."""
        return heads.mlm_logits(self, fused_txt)


def from_config(cfg, **overrides) -> MPLUG2WithHeads:
    """`MPLUG2WithHeads.from_config` (unknown keys / bad values: ValueError)."""
    return MPLUG2WithHeads.from_config(cfg, **overrides)
