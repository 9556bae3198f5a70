"""mPLUG-2 model size presets: keyword arguments of `mplug_jax.mplug2.model.MPLUG2`.

  mplug2_large  the released model (X-PLUG/mPLUG-2 configs/config_bert_large_text.json +
                ViT-L/14 video yamls): H 1024, 24 text layers incl. 2 universal, 6 running fusion
                layers (stride 1000: no connected layer), 12 decoder layers, vision width 1024
                (= H: no visn_fc), 224 px, 16 frames.
  mplug2_base   the paper's base model (appendix: ViT-B/16, BERT-base text encoder and decoder,
                S = 2, 3 fusion layers, 12 decoder layers); no official config or checkpoint
                exists, the fusion stride keeps the release's (no connected layer).
  mplug2_tiny   a few-MB model for CPU tests.

Usage: `MPLUG2.from_config(model_config("mplug2_tiny"))`. Imports only ml_collections.
"""
import ml_collections

_COMMON = dict(vocab_size=30522, max_len=512, type_vocab_size=2, num_latents=50,
               dtype="float32", param_dtype="float32", attention_impl="xla")

MPLUG2_PRESETS = {
    "mplug2_large": dict(
        hidden_size=1024, num_heads=16, mlp_dim=4096, text_layers=24, universal_layers=2,
        fusion_layers=6, fusion_stride=1000, decoder_layers=12, image_size=224, patch_size=14,
        vision_width=1024, vision_layers=24, vision_heads=16, num_frames=16),
    "mplug2_base": dict(
        hidden_size=768, num_heads=12, mlp_dim=3072, text_layers=12, universal_layers=2,
        fusion_layers=3, fusion_stride=1000, decoder_layers=12, image_size=224, patch_size=16,
        vision_width=768, vision_layers=12, vision_heads=12, num_frames=4),
    "mplug2_tiny": dict(
        hidden_size=64, num_heads=2, mlp_dim=256, text_layers=3, universal_layers=2,
        num_latents=8, fusion_layers=2, fusion_stride=1, decoder_layers=2, image_size=32,
        patch_size=16, vision_width=64, vision_layers=2, vision_heads=1, num_frames=3),
}

# Variant settings the video fine-tuning configs (video_caption, video_qa) share: `TINY` trains
# mplug2_tiny from scratch on the synthetic clips; `RELEASE_VIDEO` is the release's MSRVTT
# fine-tuning (lr 2e-5 / 2e-6, 10 epochs, 16 frames at 224 px) for base and large.
TINY = dict(model="mplug2_tiny", batch_size=32, lr=1e-3, lr2=1e-3, warmup_steps=30,
            total_epochs=0.0, image_size=32, num_frames=4, dropout=0.0)
RELEASE_VIDEO = dict(lr=2e-5, lr2=2e-6, warmup_steps=200, total_steps=0, total_epochs=10.0,
                     image_size=224, num_frames=16, dropout=0.1)


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The MPLUG2 keyword arguments of a preset ('mplug2_tiny', 'mplug2_base', 'mplug2_large')."""
    if variant not in MPLUG2_PRESETS:
        raise ValueError(f"unknown mPLUG-2 variant {variant!r}; valid: {sorted(MPLUG2_PRESETS)}")
    return ml_collections.ConfigDict({**_COMMON, **MPLUG2_PRESETS[variant]})


def task_model(preset: str, *, image_size: int, num_frames: int, dropout: float, tiny: bool,
               **extra) -> ml_collections.ConfigDict:
    """The `model` block of an mPLUG-2 task config: `preset` at `image_size` px with
    `num_frames` frames per clip (train and eval), the local temporal modules on, dropout
    `dropout`, plus `extra` fields (e.g. the heads' embed_dim). tiny: 8 px patches (4 x 4 per
    32 px frame: a 2 x 2 grid of 16 px patches is too coarse to see a shape move) and a
    ~width^-0.5 init so the width-64 model learns from scratch; otherwise bfloat16 compute."""
    m = model_config(preset)
    m.update(image_size=image_size, num_frames=num_frames, temporal=True, dropout_rate=dropout,
             **extra)
    if tiny:
        m.update(patch_size=8, init_std=0.1)
    else:
        m.dtype = "bfloat16"
    return m


def variant_model(v: dict, tiny: bool, **overrides) -> ml_collections.ConfigDict:
    """`task_model` of a task config's variant dict `v` (its `model`, `image_size`,
    `num_frames` and `dropout`); `overrides`: further or replaced keyword arguments."""
    kwargs = dict(image_size=v["image_size"], num_frames=v["num_frames"], tiny=tiny)
    if "dropout" in v:
        kwargs["dropout"] = v["dropout"]
    return task_model(v["model"], **{**kwargs, **overrides})

# The image library of mPLUG-2's video RandAugment was not checked against the release (the
# mPLUG release's own image RandAugment is OpenCV, `official`), so the video presets keep the
# PIL ops (mplug_jax/data/ops/image.py, BACKENDS).
VIDEO_AUGMENT_BACKEND = "pil"
