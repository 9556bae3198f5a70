r"""python -m mplug_jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/mplug_pretrain_tiny

mPLUG pretraining (ITC + ITM + MLM + prefix LM, paper section 3.3). Variants: `tiny` (the
built-in synthetic dataset from scratch on a 2-core CPU, about 6 minutes with the held-out
zero-shot evaluation), `base` (ViT-B/16 at 256 px, fusion stride 3) and `large` (ViT-L/14 at
224 px, stride 6). base and large default to the paper's recipe: bf16 compute, activation
checkpointing, parameters/optimizer state sharded over all devices (FSDP, ZeRO-3 style), and
initialisation from CLIP + BERT; they refuse to start on the synthetic data or from random
weights unless asked to (`input.allow_synthetic`, `init.allow_scratch`):

  python -m mplug_jax.main --config=configs/pretrain.py:base --workdir=DIR \
    --config.input.dataset=json --config.input.annotations='["coco.json", "vg.json"]' \
    --config.input.image_root=IMAGES --config.init.clip=ViT-B-16.pt \
    --config.init.bert=bert-base-uncased.safetensors
  python -m mplug_jax.main --config=configs/pretrain.py:large --workdir=DIR ... (as base)
  python -m mplug_jax.main --config=configs/pretrain.py:tiny,mode=smoke --workdir=DIR

Every field can be overridden, e.g. `--config.optim.lr=2e-4 --config.task.loss_weights.itm=0`
(a loss weight of 0 removes that loss and its compute: the ablation rows are configs).
Values from the official `pretrain_mplug_{base,large}.yaml` (docs/official-formats.md#config-values
and #optimiser-and-schedule): lr1/lr2 1e-4/1e-5 (base), 5e-5/5e-6 (large), wd 0.02, queue 65536,
momentum 0.995, temp 0.07, alpha 0.4 ramped over epoch 0, mask probability 0.15, min lr 1e-6, 30
epochs.
"""
import ml_collections

from configs import common

# Global batch, warm-up steps and base lr per variant.
_VARIANTS = {
    # tiny trains from scratch: no feature queue (stale features of a fast-changing model are a
    # shortcut: ITC then separates "old vs new" instead of pairs), faster momentum, and the same
    # lr for the visual encoder (the official 0.1x assumes a pretrained CLIP).
    "tiny": dict(batch_size=32, lr=5e-4, warmup_steps=50, queue_size=0, train_size=20_000,
                 max_tokens=24, total_steps=600, momentum=0.99, vision_lr_mult=1.0),
    "base": dict(batch_size=1024, lr=1e-4, warmup_steps=1000, queue_size=65536,
                 train_size=1_000_000, max_tokens=32, total_steps=0, momentum=0.995,
                 vision_lr_mult=0.1),
    "large": dict(batch_size=1024, lr=5e-5, warmup_steps=1000, queue_size=65536,
                  train_size=1_000_000, max_tokens=32, total_steps=0, momentum=0.995,
                  vision_lr_mult=0.1),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Pretraining config; `arg` is `VARIANT[,mode=smoke]`."""
    arg, c = common.start(arg, _VARIANTS, default="base")
    v = _VARIANTS[arg.variant]
    tiny = arg.variant == "tiny"
    # Exactly one of total_steps / total_epochs is > 0.
    c.total_steps = v["total_steps"]
    c.total_epochs = 0.0 if v["total_steps"] else 30.0

    c.model = common.model_config(arg.variant)
    c.model.dropout_rate = 0.0 if tiny else 0.1  # official BERT hidden/attention dropout
    if not tiny:
        # The paper's setup (section 4): mixed precision and activation checkpointing; layers
        # scanned (one compiled layer body per stack: faster compiles, same numbers).
        c.model.update(dtype="bfloat16", remat_policy="full", scan_layers=True)

    c.task = ml_collections.ConfigDict()
    c.task.name = "pretrain"
    c.task.loss_weights = dict(itc=1.0, itm=1.0, mlm=1.0, prefix_lm=1.0)  # paper: all equal
    if tiny:
        # Measured on the 64-wide tiny model from scratch (600 steps): with equal weights the
        # MLM gradient on the shared text-fusion layers is ~6x ITM's and ITM never leaves its
        # 1:2 prior (loss 0.636, train acc 0.667); itm=2, mlm=0.5 lets ITM learn (0.51) at the
        # cost of MLM accuracy (49% vs 65% at step 600 in a 32-batch probe).
        c.task.loss_weights.update(itm=2.0, mlm=0.5)
    # queue_size: a multiple of input.batch_size; 0 = in-batch negatives only (no queue).
    c.task.itc = dict(temp_min=0.001, temp_max=0.5, queue_size=v["queue_size"], momentum=v["momentum"],
                      distill_alpha=0.4, alpha_warmup_epochs=1.0)
    c.task.mlm = dict(mask_prob=0.15)
    # distill: soft targets from the momentum decoder (adds the decoder to the momentum copy).
    c.task.prefix_lm = dict(distill=False)
    # The MLM and LM heads (V-way) run on gathered target positions only, as many as the
    # expected count for full-length texts plus gather_sigmas standard deviations: with 6 a
    # batch overflows with probability < 1e-9; overflowing targets are counted
    # (train/dropped_targets_total) and warned about. 0 = every position, no gather.
    c.task.gather_sigmas = 6.0
    # Text length the capacities are sized for; 0 = input.max_tokens (the 30-word limit of
    # real captions). The built-in shapes captions have at most 15 tokens, and sizing for 24
    # made tiny's V-way heads 1.5x slower (37 vs 55 samples/s) for padding.
    c.task.gather_length = 16 if tiny else 0

    # dataset: 'synthetic' (built-in) | 'json' | 'tfds' (data/inputs/pretrain.py); base/large
    # refuse the shapes data unless allow_synthetic is set.
    c.input = common.new_input(tiny)
    # 'json': official pretraining lists, e.g. ['data/mscoco_train.json', 'data/vgnococo.json',
    # 'data/google_cc.json', 'data/sbu.json'] with their image root; 'tfds': `prepare` output.
    c.input.annotations = []
    c.input.eval_annotations = []
    c.input.image_root = ""
    c.input.tfds_dir = ""
    c.input.eval_split = "validation"
    c.input.train_size = v["train_size"]
    c.input.batch_size = v["batch_size"]  # global
    c.input.max_words = 30
    c.input.max_tokens = v["max_tokens"]
    common.image_transfer(c.input)
    # Official pretrain augmentation; off for tiny (flips would contradict "left of" captions).
    common.finish_input(c.input, common.train_augment(tiny, crop_scale=(0.2, 1.0)))

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = v["lr"]  # lr1: everything but the visual encoder
    # lr2 = 0.1 * lr1 for a pretrained visual encoder (official); 1.0 from scratch (tiny).
    c.optim.lr_groups = dict(vision=dict(pattern=r"^vision/", mult=v["vision_lr_mult"]))
    c.optim.wd = 0.02
    # Biases (incl. `mlm_bias`), LayerNorm scales and the ITC temperature: no decay.
    c.optim.no_wd = r"(?i)(bias$)|((ln|norm)[^/]*/scale$)|(^temp$)"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.warmup_steps = v["warmup_steps"]
    c.optim.schedule = "cosine"
    c.optim.end_lr = 1e-6
    c.optim.clip_norm = 0.0  # 0 = no clipping (the official pretraining yaml has none)
    # k > 1: each step runs the global batch as k micro-batches (memory of one), then one
    # update; ITC in-batch negatives and ITM hard negatives come from each micro-batch.
    # base/large: 2, so 8 devices of 40 GB hold the step (micro-batch 64 per device, as the
    # paper's 16 GPUs x 64 = 1024; with 16 or more devices set 1).
    c.optim.accum_steps = 1 if tiny else 2

    c.mesh = common.mesh_config(tiny)

    # Paper initialisation (base/large): OpenAI CLIP ViT + bert-base-uncased checkpoints
    # (init.clip / init.bert: .pt/.pth/.safetensors), or a whole mPLUG init.checkpoint.
    common.set_run_defaults(c, tiny, allow_scratch=tiny, ckpt_every_steps=300 if tiny else 2000)

    c.evals = ml_collections.ConfigDict()
    c.evals.heldout = dict(type="pretrain_zeroshot", every_steps=0, num_examples=512,
                           batch_size=64, num_captions=5, max_decode_len=v["max_tokens"])

    if arg.mode == "smoke":
        c.total_steps, c.total_epochs = 20, 0.0
        c.input.batch_size = 16
        c.input.train_size = 1024
        c.optim.warmup_steps = 5
        c.log_every_steps = 5
        c.ckpt_every_steps = 10
        c.evals.heldout.num_examples = 64
        c.evals.heldout.batch_size = 32
        c.evals.heldout.num_captions = 2
    return c
