"""Shared config pieces: model size presets, `parse_arg`, and the blocks every fine-tuning
config starts from (`start`, `finetune_model`, `finetune_optim`, `smoke_run`) or assembles
(`begin_finetune`, `new_input` ... `finish_input`, `release_optim`, `finetune_run`,
`classify_run`, `scst_block`). Imports only ml_collections.

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
    vision_posemb_init_std=0.0,  # CLIP's vision_width ** -0.5
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
    `mplug-jax convert` dir, or a workdir of ours at `step`, 0 = latest, or the one `select`
    picks; used only when a run starts fresh), `resume`, logging / checkpoint cadence, model
    selection (`best`, `test_on_best`), the non-finite stop and MFU peak.

    Eval blocks (`c.evals.<name>`, set by each task config) share these keys besides their
    evaluator's own (mplug_jax/selection.py): `every_steps` (evaluate after every N-th update,
    0 = off), `every_epochs` (at the end of every k-th epoch, 0 = off), `from_epoch`
    (periodic evaluations only from epoch index N on, counted from 0 like the official loops),
    `enabled` (False: never run) and `input` (a dict of `input` fields replaced for this block,
    e.g. a test split's files). Every enabled block not in `test_on_best` also runs once after
    training on the final params; results go to <workdir>/results/<name>_step<N>/."""
    # select: which checkpoint of a training workdir init.checkpoint loads: 'latest' (or
    # init.step when > 0), 'best' (its best/), or 'epoch:N' (the checkpoint at the end of epoch
    # N, counted from 0 like the official checkpoint_%02d.pth; the source run keeps it with
    # ckpt_every_epochs).
    c.init = dict(clip="", bert="", checkpoint="", config_bert="", config_yaml="", step=0,
                  select="latest", allow_scratch=allow_scratch)
    c.resume = ""  # another run's workdir to continue from when this workdir has no checkpoint
    c.log_every_steps = 25 if tiny else 100
    c.ckpt_every_steps = ckpt_every_steps
    c.keep_ckpts = 2
    # Also save at the end of every k-th epoch (0 = off); these epoch checkpoints are kept
    # besides the keep_ckpts newest (a later stage may start from one: init.select='epoch:N').
    c.ckpt_every_epochs = 0.0
    # Keep the checkpoint with the best `metric` of eval block `eval` under <workdir>/best/
    # (a workdir itself: pass it to --checkpoint / init.checkpoint); eval '' = off.
    c.best = dict(eval="", metric="", mode="max")
    # Eval blocks run after training on the checkpoint `best` selected (not on the final
    # params), their results under <workdir>/results/<name>_step<selected step>/.
    c.test_on_best = []
    c.max_nonfinite_steps = 10  # stop (with a checkpoint) after this many skipped steps in a row
    c.peak_flops = 0.0  # per device for MFU; 0 = table by device kind, or measured on CPU
    c.eval_at_start = False  # also run every eval before the first step of a fresh run (step 0)
    # PRNG of dropout, masking and negative sampling: threefry | rbg | unsafe_rbg (mplug_jax/rng.py;
    # README "Benchmarks" says why threefry). A run resumes only with the impl it started with.
    c.rng_impl = "threefry"


# Official `create_two_optimizer`: no weight decay for names containing "bias" or
# "LayerNorm.weight", i.e. every bias and the BERT-side LayerNorm scales (text encoder, fusion,
# decoder incl. its LM-head LayerNorm); CLIP's ln_* and visn_ln ARE decayed.
OFFICIAL_NO_WD = r"(bias$)|(^(text|fusion|decoder)/.*ln/scale$)"
# Heads of the shared mPLUG tree that only pretraining reads (ITC, ITM, MLM, temperature).
PRETRAIN_HEADS = r"^(vision_proj|text_proj|itm_head|mlm_transform|mlm_ln|mlm_bias|temp)(/|$)"


# Paper presets (docs/recipes.md): `<release preset>_paper` = the release preset with the
# values the paper states where they differ from the release; unstated values stay the release's.
PAPER_SUFFIX = "_paper"


def with_paper(variants: dict, paper: dict) -> dict:
    """`variants` plus `<name>_paper` for each `name: overrides` of `paper` (the release
    preset's values updated with the paper's)."""
    out = dict(variants)
    for name, overrides in paper.items():
        out[name + PAPER_SUFFIX] = {**variants[name], **overrides}
    return out


def release_of(variant: str) -> str:
    """The release preset a variant is built on: 'large_paper' -> 'large'; others unchanged."""
    return variant[:-len(PAPER_SUFFIX)] if variant.endswith(PAPER_SUFFIX) else variant


def start(arg: str | None, variants, *, default: str, modes=("full", "smoke"), **extra
          ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """Parse `VARIANT[,mode=M][,key=value...]` (`extra`: further keys and their defaults),
    check variant and mode, and start a config with `variant`, `mode` and `seed`.

    Returns (parsed argument, config)."""
    arg = parse_arg(arg, variant=default, mode=modes[0], **extra)
    if arg.variant not in variants:
        raise ValueError(f"unknown variant {arg.variant!r}; valid: {sorted(variants)}")
    if arg.mode not in modes:
        raise ValueError(f"unknown mode {arg.mode!r}; valid: {', '.join(modes)}")
    c = ml_collections.ConfigDict()
    c.variant, c.mode = arg.variant, arg.mode
    c.seed = 0
    return arg, c


def finetune_model(preset: str, image_size: int) -> ml_collections.ConfigDict:
    """Model preset at a fine-tuning resolution (the pretrained positional embedding is
    resampled to it): dropout 0.1, bfloat16 compute, full remat and scanned layers, except for
    'tiny' (float32, no dropout, the CPU demo)."""
    m = model_config(preset)
    m.image_size = image_size
    tiny = preset == "tiny"
    m.dropout_rate = 0.0 if tiny else 0.1
    if not tiny:
        m.update(dtype="bfloat16", remat_policy="full", scan_layers=True)
    return m


def finetune_optim(lr: float, *, wd: float, warmup_steps: int, clip_norm: float = 0.0,
                   vision_lr: float | None = None, no_wd: str = OFFICIAL_NO_WD,
                   frozen: str | None = None, end_lr: float = 1e-6,
                   accum_steps: int = 1) -> ml_collections.ConfigDict:
    """AdamW (0.9, 0.999, 1e-8) with our schedule ('cosine': linear warm-up from 0 over
    `warmup_steps` updates, then a per-update cosine to `end_lr`); the visual encoder at
    `vision_lr` (official lr2) when given; `frozen`: regex of params never updated (None: no
    such key). The fields of the official schedule ('epoch_cosine', mplug_jax/optim.py) are
    present with neutral values; `official_schedule` selects and fills them."""
    o = ml_collections.ConfigDict()
    o.lr = lr
    o.lr_groups = {} if vision_lr is None else dict(
        vision=dict(pattern=r"^vision/", mult=vision_lr / lr))
    o.wd, o.no_wd = wd, no_wd
    if frozen is not None:
        o.frozen = frozen
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.schedule = "cosine"
    o.warmup_steps = warmup_steps  # 'cosine' / 'constant': warm-up updates from 0
    o.end_lr = end_lr
    # 'epoch_cosine': every group starts at warmup_lr and reaches its peak in warmup_stairs
    # stairs of stair_microbatches micro-batches (official warmup_lr, warmup_epochs, 100).
    o.warmup_lr = 0.0
    o.warmup_stairs = 0
    o.stair_microbatches = 100
    o.clip_norm = clip_norm
    o.accum_steps = accum_steps
    return o


def official_schedule(o: ml_collections.ConfigDict, *, warmup_lr: float, warmup_stairs: int,
                      min_lr: float) -> None:
    """Select the official mPLUG fine-tuning schedule ('epoch_cosine') in optim block `o`:
    the yaml's `schedular` warmup_lr, warmup_epochs (stairs of 100 micro-batches) and min_lr.
    `--config.optim.schedule=cosine` switches back to ours (`o.warmup_steps` updates)."""
    o.schedule = "epoch_cosine"
    o.warmup_lr, o.warmup_stairs, o.stair_microbatches = warmup_lr, warmup_stairs, 100
    o.end_lr = min_lr


def scst_block(enabled: bool, tiny: bool) -> dict:
    """`task.scst` of a caption config (mplug_jax/scst.py): 'beam' = the official mPLUG SCST
    (the K n-best of the beam search, baseline = their mean reward; 'sample' = num_samples
    sampled captions, baseline = the greedy caption's reward) with the official SCST's details:
    loss divided by the generated tokens + 1, search with dropout on, PTB-tokenised rewards,
    CIDEr-D document frequencies from the batch's references. tiny keeps ours (n,
    deterministic search, simple tokenizer, training-set frequencies): no Java, and dropout is
    0 there anyway."""
    return dict(enabled=enabled, mode="beam", num_samples=0, temperature=1.0, top_k=0,
                top_p=1.0, length_norm="generated" if tiny else "official",
                search_dropout=not tiny, reward_tokenize="simple" if tiny else "ptb",
                cider_df="train" if tiny else "batch")


def smoke_run(c: ml_collections.ConfigDict, batch_size: int = 16) -> None:
    """`mode=smoke`: 20 steps of `batch_size`, short warm-up (our 'cosine' schedule: 20 steps
    would never leave the official schedule's first stair), frequent logs and checkpoints, no
    evaluation before training (the task config then shrinks its data and evals)."""
    c.total_steps, c.total_epochs = 20, 0.0
    c.input.batch_size = batch_size
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 5
    c.log_every_steps = 5
    c.ckpt_every_steps = 10
    c.eval_at_start = False  # the evals run once, after the 20 steps


def begin_finetune(arg: str | None, variants, *, default: str, name: str, epochs: float | str,
                   model=None, modes=("full", "smoke")):
    """`start` plus what every fine-tuning config sets next: the run length (`total_steps`
    from the variant; `total_epochs`: the variant's value under key `epochs` when that is a
    str, else `epochs` for a variant with total_steps 0 and 0 otherwise), the model
    (`model(variant dict, tiny)`, or `finetune_model` of the variant's release preset at its
    `image_size`) and `task.name`.

    Returns (parsed argument, config, variant dict, tiny)."""
    arg, c = start(arg, variants, default=default, modes=modes)
    v, tiny = variants[arg.variant], arg.variant == "tiny"
    c.total_steps = v["total_steps"]
    if isinstance(epochs, str):
        c.total_epochs = v[epochs]
    else:
        c.total_epochs = 0.0 if v["total_steps"] else epochs
    c.model = (model(v, tiny) if model
               else finetune_model(release_of(arg.variant), v["image_size"]))
    c.task = ml_collections.ConfigDict()
    c.task.name = name
    return arg, c, v, tiny


def new_input(tiny: bool) -> ml_collections.ConfigDict:
    """An `input` block reading the built-in synthetic data, which only tiny accepts unless
    `allow_synthetic` is set."""
    i = ml_collections.ConfigDict()
    i.dataset = "synthetic"
    i.allow_synthetic = tiny
    return i


def train_augment(tiny: bool, *, crop_scale=(0.5, 1.0), randaug=(2, 7),
                  backend: str = "official") -> dict:
    """The official fine-tuning augmentation (random resized crop at `crop_scale`, horizontal
    flip, RandAugment n/m = `randaug`), off for tiny. `backend` (data/ops/image.BACKENDS):
    'official' (PIL's resize, the official OpenCV RandAugment ops), 'pil' (PIL only, affine ops
    half a pixel apart) or 'cv2' (OpenCV only: about twice the images per core, a resize within
    resampling noise of PIL's)."""
    return dict(enabled=not tiny, crop_scale=crop_scale, randaug_n=randaug[0],
                randaug_m=randaug[1], hflip=True, backend=backend)


def image_transfer(i: ml_collections.ConfigDict) -> None:
    """Image loading of input block `i`: train images travel as uint8 and the vision encoder
    normalises them on the device (`image_dtype`; bit-identical to 'float32', normalised on
    the host: a quarter of the bytes, no float work); `reduced_decode` off (True: decode JPEGs
    at 1/2, 1/4 or 1/8 scale when the drawn crop still covers the output size; faster for
    large photos, not pixel-identical, see transforms.decode_train_image)."""
    i.image_dtype = "uint8"
    i.reduced_decode = False


def finish_input(i: ml_collections.ConfigDict, augment: dict) -> None:
    """Set the `augment` block and the loader defaults of input block `i`: no worker
    processes (`read_threads` 0 = auto: 4 threads in this process, 1 per worker process),
    shuffle seed 0, stop when over 1% of the records fail to load."""
    i.augment = augment
    i.workers = 0
    i.read_threads = 0
    i.shuffle_seed = 0
    i.max_skip_rate = 0.01


def release_optim(v: dict, tiny: bool, *, frozen: str, warmup_stairs: int
                  ) -> ml_collections.ConfigDict:
    """`finetune_optim` of an mPLUG fine-tuning variant `v` (its lr for everything but the
    visual encoder, lr2 for that, wd (default 0.02), warmup_steps, clip_norm); base/large
    then select the official schedule (warmup_lr 1e-5, `warmup_stairs`, min_lr 1e-6)."""
    o = finetune_optim(v["lr"], vision_lr=v["lr2"], wd=v.get("wd", 0.02),
                       warmup_steps=v["warmup_steps"], clip_norm=v["clip_norm"], frozen=frozen)
    if not tiny:
        official_schedule(o, warmup_lr=1e-5, warmup_stairs=warmup_stairs, min_lr=1e-6)
    return o


def finetune_run(c: ml_collections.ConfigDict, tiny: bool, *, allow_scratch: bool,
                 ckpt_every_steps: int) -> None:
    """The mesh (`mesh_config`), the run defaults (`set_run_defaults`) and an empty `evals`
    block for the task config to fill."""
    c.mesh = mesh_config(tiny)
    set_run_defaults(c, tiny, allow_scratch=allow_scratch, ckpt_every_steps=ckpt_every_steps)
    c.evals = ml_collections.ConfigDict()


def classify_run(c: ml_collections.ConfigDict, mode: str, tiny: bool) -> None:
    """The run, eval and smoke settings of the classification fine-tunings (NLVR2, SNLI-VE;
    no official script, so ALBEF's cadence): val accuracy after every epoch, the best kept;
    tiny: once, after training. Eval `split`: 'val' or 'test'; `num_examples`: the first N
    records (0 = all)."""
    finetune_run(c, tiny, allow_scratch=False, ckpt_every_steps=200 if tiny else 2000)
    c.best.update(eval="val", metric="acc")
    c.evals.val = dict(type="classify", every_steps=0, every_epochs=0.0 if tiny else 1.0,
                       split="val", num_examples=0,
                       batch_size=64 if tiny else 256, log_every_batches=50,
                       num_examples_shown=5)
    if mode == "smoke":
        smoke_run(c)
        c.input.train_size = max(c.input.train_size, 1024) if tiny else 1024
        c.input.eval_size = 64 if tiny else c.input.eval_size
        c.evals.val.update(num_examples=64, batch_size=32)
