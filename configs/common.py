"""Shared config pieces: model size presets and `parse_arg`. Imports only ml_collections.

Model presets are the keyword arguments of `mplug_jax.models.mplug.MPLUG`.
"""
import ml_collections

# Fields shared by every preset (official BERT/CLIP constants).
_COMMON = dict(
    vocab_size=30522,
    max_len=512,
    type_vocab_size=2,
    embed_dim=256,
    dtype="float32",
    param_dtype="float32",
    remat_policy="none",
    scan_layers=False,
    attention_impl="xla",
)

MODEL_PRESETS = {
    # Official mPLUG-B/16 (config_bert_stride3.json + ViT-B-16): 6 running fusion layers, stride 3.
    "base": dict(
        hidden_size=768, num_heads=12, mlp_dim=3072, text_layers=6, fusion_layers=6,
        fusion_stride=3, fusion_layout="skip", decoder_layers=12, image_size=256,
        patch_size=16, vision_width=768, vision_layers=12, vision_heads=12),
    # Official mPLUG-L/14 (config_bert.json + ViT-L-14): stride 6 (no connected layer), visn_fc.
    "large": dict(
        hidden_size=768, num_heads=12, mlp_dim=3072, text_layers=6, fusion_layers=6,
        fusion_stride=6, fusion_layout="skip", decoder_layers=12, image_size=224,
        patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16),
    # A few-MB model for CPU tests and the README main job.
    "tiny": dict(
        hidden_size=64, num_heads=2, mlp_dim=256, text_layers=2, fusion_layers=3,
        fusion_stride=2, fusion_layout="skip", decoder_layers=2, image_size=64,
        # 8x8 patches (65 image tokens): the built-in shapes' spatial relations need the detail.
        patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, embed_dim=32,
        # BERT's N(0, 0.02) is tuned for width 768; at width 64 it leaves the residual branches
        # ~6x too small to learn from scratch in minutes (ITM stays at chance); ~width^-0.5 works.
        init_std=0.1),
}


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The MPLUG keyword arguments of a preset ('tiny', 'base', 'large')."""
    if variant not in MODEL_PRESETS:
        raise ValueError(f"unknown model variant {variant!r}; valid: {sorted(MODEL_PRESETS)}")
    return ml_collections.ConfigDict({**_COMMON, **MODEL_PRESETS[variant]})


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
    """Parse a config argument: a bare value sets `variant`, `key=value` pairs the rest.

    Example: ``"tiny,mode=smoke"`` -> variant='tiny', mode='smoke'. Values are converted to
    the type of their default (bool/int/float/str).
    """
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
        else:
            key, value = "variant", part
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(out)}")
        default = out[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{key} must be true/false, got {value!r}")
            value = value.lower() in ("true", "1")
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        out[key] = value
    return ml_collections.ConfigDict(out)


def mesh_config(tiny: bool) -> ml_collections.ConfigDict:
    """`tiny`: data parallel over every device (a CPU); otherwise parameters, optimizer state
    and momentum copy sharded over every device (FSDP, ZeRO-3 style)."""
    if tiny:
        return ml_collections.ConfigDict(dict(shape=dict(data=-1, fsdp=1, tensor=1),
                                              sharding="dp"))
    return ml_collections.ConfigDict(dict(shape=dict(data=1, fsdp=-1, tensor=1),
                                          sharding="fsdp"))


def set_run_defaults(c: ml_collections.ConfigDict, tiny: bool, *, allow_scratch: bool = False,
                     ckpt_every_steps: int = 2000) -> None:
    """The fields every task config shares: `init` (mplug_jax/pretrained.py: CLIP + BERT
    checkpoints, or a whole mPLUG `checkpoint` = official file with config_bert / config_yaml,
    `mplug-jax convert` dir, or a workdir of ours at `step`, 0 = latest; used only when a run
    starts fresh), `resume`, logging / checkpoint cadence, the non-finite stop and MFU peak."""
    c.init = dict(clip="", bert="", checkpoint="", config_bert="", config_yaml="", step=0,
                  allow_scratch=allow_scratch)
    c.resume = ""  # another run's workdir to continue from when this workdir has no checkpoint
    c.log_every_steps = 25 if tiny else 100
    c.ckpt_every_steps = ckpt_every_steps
    c.keep_ckpts = 2
    # Keep the checkpoint with the best `metric` of eval block `eval` under <workdir>/best/
    # (a workdir itself: pass it to --checkpoint / init.checkpoint); eval '' = off.
    c.best = dict(eval="", metric="", mode="max")
    c.max_nonfinite_steps = 10  # stop (with a checkpoint) after this many skipped steps in a row
    c.peak_flops = 0.0  # per device for MFU; 0 = table by device kind, or measured on CPU
