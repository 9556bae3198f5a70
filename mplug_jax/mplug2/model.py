"""mPLUG-2 (video QA / video caption release, X-PLUG/mPLUG-2 @ a46aa97).

Stages (docs/fixtures.md#mplug-2-forward):
  encode_video    float32[B, T, R, R, 3] -> visual tokens float[B, 1 + T*L, Wv] (`mplug2.vision`)
                  (CLIP ViT blocks shared by all frames + two local temporal modules per block;
                  per-frame class tokens averaged after the last block; ln_post)
  encode_image    float32[B, R, R, 3] -> float[B, 1 + L, Wv] (same blocks, no temporal modules)
  vision_embeds   float[B, N, Wv] -> float[B, N, H] (large-style: visn_fc + LN when Wv != H)
  universal       vision_embeds -> image_embeds float[B, N, H] (latent queries, last text layers)
  encode_text     ids/mask int32[B, L] -> float[B, L, H] (every text-encoder layer, self-attn only)
  fuse            (img, txt, txt_mask) -> (img, txt), the mPLUG skip-connected fusion
  decode          (ids, mask, states, states_mask) -> logits float32[B, L, V] (shared decoder)

Where the release differs from the paper, the release is implemented and the difference is
named in a comment at the place it happens (docs/fixtures.md#mplug-2-release-quirks).
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax.models import layers
from mplug_jax.models.bert import Embeddings, check_text
from mplug_jax.models.decoder import TextDecoder
from mplug_jax.models.fusion import FusionEncoder, fusion_pattern
from mplug_jax.mplug2.vision import DualVisionEncoder

NUM_LATENTS = 50  # hard-coded in the official BertLayer


class UniversalBertLayer(nn.Module, kw_only=True):
    """A text-encoder layer of the release (`BertLayer`): post-LN self-attention, optional
    cross-attention (universal layers on the visual path only), FFN. Param names match
    `bert.BertLayer`. Call: x float[B, L, H], mask bool or None, kv float[B, S, H] or None
    (no cross-attention) -> float[B, L, H]."""
    num_heads: int
    mlp_dim: int
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    @nn.compact
    def __call__(self, x, mask=None, kv=None):
        opts = self.opts
        drop = nn.Dropout(opts.dropout_rate, deterministic=opts.deterministic)
        h = layers.Attention(num_heads=self.num_heads, kind="self", opts=opts,
                             name="self_attn")(x, mask=mask)
        x = layers.layer_norm(eps=self.eps, opts=opts, name="self_ln")(x + drop(h))
        if kv is not None:
            h = layers.Attention(num_heads=self.num_heads, kind="cross", opts=opts,
                                 name="cross_attn")(x, kv.astype(opts.dtype))
            x = layers.layer_norm(eps=self.eps, opts=opts, name="cross_ln")(x + drop(h))
        h = layers.Mlp(mlp_dim=self.mlp_dim, activation=layers.gelu, opts=opts, name="mlp")(x)
        return layers.layer_norm(eps=self.eps, opts=opts, name="mlp_ln")(x + drop(h))


class UniversalTextEncoder(nn.Module, kw_only=True):
    """Official `text_encoder` (`BertModel`): n layers, the last S of them universal.

    `text(ids, mask)`: the question through every layer, self-attention + FFN only (the
      universal layers' cross-attention is not run on text: release quirk 5; the paper has
      the text and visual tokens share one self-attention).
    `visual(v)`: the universal layers on vision_embeds float[B, N, H] -> float[B, N, H],
      the last universal layer's output g (before visn_emb_norm).
    """
    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    depth: int = 12
    universal_layers: int = 2
    num_latents: int = NUM_LATENTS
    max_len: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    opts: layers.ModuleOptions = layers.DEFAULT_OPTS

    def setup(self):
        self.embeddings = Embeddings(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                     max_len=self.max_len, type_vocab_size=self.type_vocab_size,
                                     eps=self.eps, opts=self.opts)
        self.layer = [UniversalBertLayer(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                         eps=self.eps, opts=self.opts)
                      for _ in range(self.depth)]
        # Official: a parameter of the first universal layer, torch.randn(50, H).
        self.latents = self.param("latents", layers.partitioned(nn.initializers.normal(1.0),
                                                                (None, "embed")),
                                  (self.num_latents, self.hidden_size), self.opts.param_dtype)

    def text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        check_text(ids, mask)
        x = self.embeddings(ids)
        m = layers.padding_mask(mask)
        for lyr in self.layer:
            x = lyr(x, m)
            self.sow("intermediates", "text_layers", x)
        return x

    def visual(self, v: jax.Array) -> jax.Array:
        first = self.depth - self.universal_layers
        h = jnp.broadcast_to(self.latents.astype(self.opts.dtype)[None],
                             (v.shape[0],) + self.latents.shape)
        # Latent path: layers first .. n-2 (S - 1 layers; the paper runs S), no masks.
        for lyr in self.layer[first:-1]:
            h = lyr(h, None, v)
            self.sow("intermediates", "universal_latents", h)
        # The last universal layer swaps roles: the image tokens query the latents.
        return self.layer[-1](v, None, h)


class MPLUG2(nn.Module):
    """The mPLUG-2 network (release). Fields are the model config (configs/mplug2/models.py)."""
    vocab_size: int = 30522
    hidden_size: int = 1024
    num_heads: int = 16
    mlp_dim: int = 4096
    max_len: int = 512
    type_vocab_size: int = 2
    text_layers: int = 24        # official text_encoder_layers (n), universal layers included
    universal_layers: int = 2    # official num_uni_layer (S)
    num_latents: int = NUM_LATENTS
    fusion_layers: int = 6       # fusion modules that run (official fusion_layers)
    fusion_stride: int = 1000    # official stride_layer
    decoder_layers: int = 12
    text_ln_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_ln_eps: float = 1e-5
    num_frames: int = 16         # default frames per clip (data side; no parameter depends on it)
    # False: no local temporal modules (no lmhra params); each frame is encoded alone and the
    # frames only meet by the class-token average and in the universal / fusion layers.
    temporal: bool = True
    init_std: float = 0.02
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    deterministic: bool = True
    # Not a field: layers are Python loops, params always in the loop layout
    # (`params.to_model_layout`, `pretrained.put`).
    scan_layers = False

    @classmethod
    def from_config(cls, cfg, **overrides) -> "MPLUG2":
        """Build from a mapping of fields; unknown keys or bad values give a readable error."""
        return layers.build_model(cls, cfg, overrides, "mPLUG-2")

    def validate(self) -> None:
        """Check the config before any tracing; raises ValueError naming the bad field."""
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid mPLUG-2 config: {msg}")
        layers.check_common_fields(self, need)
        need(self.vision_width % 2 == 0, f"vision_width {self.vision_width} must be even "
             "(local temporal bottleneck C/2)")
        need(1 <= self.universal_layers <= self.text_layers,
             f"universal_layers {self.universal_layers} must be in 1..text_layers "
             f"({self.text_layers})")
        need(self.num_latents >= 1, f"num_latents must be >= 1, got {self.num_latents}")
        need(self.decoder_layers >= 1, f"decoder_layers must be >= 1, got {self.decoder_layers}")
        fusion_pattern("skip", self.fusion_layers, self.fusion_stride)

    @property
    def pattern(self) -> str:
        """Fusion layer kinds: official `layer_nums % stride_layer` rule ('a' co-attention,
        'c' connected with the extra image residual)."""
        return fusion_pattern("skip", self.fusion_layers, self.fusion_stride)

    @property
    def has_visn_fc(self) -> bool:
        return self.vision_width != self.hidden_size

    @property
    def opts(self) -> layers.ModuleOptions:
        return layers.options_of(self)

    def setup(self):
        opts = self.opts
        self.vision = vision_module(self)
        if self.has_visn_fc:
            self.visn_fc = layers.dense(self.hidden_size, ("mlp", "embed"), opts=opts,
                                        name="visn_fc")
            self.visn_ln = layers.layer_norm(eps=1e-12, opts=opts, name="visn_ln")
        self.visn_emb_norm = layers.layer_norm(eps=1e-12, opts=opts, name="visn_emb_norm")
        bert = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    num_heads=self.num_heads, mlp_dim=self.mlp_dim, max_len=self.max_len,
                    type_vocab_size=self.type_vocab_size, eps=self.text_ln_eps, opts=opts)
        self.text = UniversalTextEncoder(depth=self.text_layers,
                                         universal_layers=self.universal_layers,
                                         num_latents=self.num_latents, **bert)
        self.fusion = FusionEncoder(pattern=self.pattern, num_heads=self.num_heads,
                                    mlp_dim=self.mlp_dim, eps=self.text_ln_eps, opts=opts)
        # One decoder for QA and captioning (the release builds one instance per task model).
        self.decoder = TextDecoder(depth=self.decoder_layers, **bert)

    def __call__(self, video, text_ids, text_mask, dec_ids, dec_mask) -> dict:
        """VQA forward touching every parameter (used by `init`): video float32[B, T, R, R, 3],
        question ids/mask int32[B, Lq], answer ids/mask int32[B, La] (one per clip)."""
        img = self.image_embeds(self.encode_video(video))
        txt = self.encode_text(text_ids, text_mask)
        f_img, f_txt = self.fuse(img, txt, text_mask)
        states, states_mask = vqa_states(f_img, f_txt, text_mask)
        return dict(image_embeds=img, text_embeds=txt, fusion_image=f_img, fusion_text=f_txt,
                    decoder_logits=self.decode(dec_ids, dec_mask, states, states_mask))

    def encode_video(self, video: jax.Array) -> jax.Array:
        """float32[B, T, R, R, 3] -> float[B, 1 + T*L, Wv] (after ln_post); without the local
        temporal modules when the model's `temporal` is False."""
        return self.vision(video, temporal=self.temporal)

    def encode_image(self, image: jax.Array) -> jax.Array:
        """float32[B, R, R, 3] -> float[B, 1 + L, Wv]: the spatial blocks only. Paper: LT is the
        only video-specific part; the release has no image model (it would run LT with T = 1)."""
        if image.ndim != 4:
            raise ValueError(f"image must be float[B, H, W, 3], got shape {tuple(image.shape)}")
        return self.vision(image[:, None], temporal=False)

    def vision_embeds(self, visual: jax.Array) -> jax.Array:
        """float[B, N, Wv] -> float[B, N, H]: large-style `LN(visn_fc(x))` when Wv != H."""
        return self.visn_ln(self.visn_fc(visual)) if self.has_visn_fc else visual

    def universal(self, v: jax.Array) -> jax.Array:
        """vision_embeds float[B, N, H] -> image_embeds float[B, N, H] =
        visn_emb_norm(v + last universal layer output)."""
        g = self.text.visual(v)
        self.sow("intermediates", "universal_image_out", g)
        return self.visn_emb_norm(v + g)

    def image_embeds(self, visual: jax.Array) -> jax.Array:
        """Vision encoder output float[B, N, Wv] -> image_embeds float[B, N, H]."""
        return self.universal(self.vision_embeds(visual))

    def encode_text(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return self.text.text(ids, mask)

    def fuse(self, img: jax.Array, txt: jax.Array, txt_mask: jax.Array):
        return self.fusion(img, txt, txt_mask)

    def decode(self, ids, mask, states, states_mask) -> jax.Array:
        return self.decoder(ids, mask, states, states_mask)


def vqa_states(f_img: jax.Array, f_txt: jax.Array, text_mask: jax.Array):
    """Decoder states of video QA: [fusion image; fusion text] float[B, N + Lq, H] and their
    mask int32[B, N + Lq] (image all ones)."""
    states = jnp.concatenate([f_img, f_txt], 1)
    mask = jnp.concatenate([jnp.ones(f_img.shape[:2], jnp.int32),
                            jnp.asarray(text_mask, jnp.int32)], 1)
    return states, mask


def decoder_module(model: MPLUG2) -> TextDecoder:
    """A standalone TextDecoder equal to `model.decoder` (apply with params['decoder']), e.g.
    for `mplug_jax.generate` searches."""
    return TextDecoder(vocab_size=model.vocab_size, hidden_size=model.hidden_size,
                       num_heads=model.num_heads, mlp_dim=model.mlp_dim, max_len=model.max_len,
                       type_vocab_size=model.type_vocab_size, eps=model.text_ln_eps,
                       depth=model.decoder_layers, opts=model.opts)


def vision_module(model: MPLUG2) -> DualVisionEncoder:
    """A standalone DualVisionEncoder equal to `model.vision` (params['vision'])."""
    return DualVisionEncoder(image_size=model.image_size, patch_size=model.patch_size,
                             width=model.vision_width, depth=model.vision_layers,
                             num_heads=model.vision_heads, eps=model.vision_ln_eps,
                             opts=model.opts)


def dummy_inputs(model: MPLUG2, batch: int = 1, frames: int = 2, text_len: int = 4) -> tuple:
    """Smallest valid inputs of `MPLUG2.__call__` (for init)."""
    video = jnp.zeros((batch, frames, model.image_size, model.image_size, 3), jnp.float32)
    ids = jnp.ones((batch, text_len), jnp.int32)
    return video, ids, ids, ids, ids


def init_params(model: MPLUG2, rng: jax.Array):
    """Boxed (LogicallyPartitioned) params of `model`."""
    # Jitted: one compile is much faster than running the full forward op by op.
    return jax.jit(model.init)(rng, *dummy_inputs(model))["params"]


def abstract_params(model: MPLUG2):
    """ShapeDtypeStruct tree of the boxed params, without allocating anything."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
