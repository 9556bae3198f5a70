r"""python -m mplug_jax.main --config=configs/grounding.py:tiny --workdir=/tmp/mplug_grounding_tiny \
  --config.init.checkpoint=/tmp/mplug_pretrain_tiny

Visual grounding on RefCOCO / RefCOCO+ / RefCOCOg (official `grounding_mplug.py`; the box as 4
coordinate tokens, docs/fixtures.md#grounding-fixtures): the decoder over [fused image; fused
expression] is trained with the official weighted coordinate-token loss and evaluated with the
greedy 4-token decode, Acc@0.5 and mIoU (official metric, padded frame) per test split, and a
`grounding_result.json` ([{"id", "phrase", "pred_box", "gt_box"}] in original-image pixels)
under <workdir>/results/ that `mplug-jax score --task grounding --results R --annotations
SPLIT_FILE` re-scores. Variants: `tiny` (the built-in synthetic shapes expressions -
1-3 coloured shapes in a 2x2 grid, each filling 75-90% of its cell, on square images, one
referred to by colour / shape / position / relation; `input.synthetic` sets the layout - from
the `configs/pretrain.py:tiny` workdir), `refcoco_base|refcocop_base|refcocog_base` (ViT-B/16 at
336 px, official values otherwise) and `..._large` (ViT-L/14 at 336 px, the official setup);
`vg_uni_large` trains on the official union (referit + unc + unc+ + gref_umd).

Two stages, as the paper (arXiv 7.1) and the release (scripts/grounding_mplug_large.sh,
grounding_mplug.py `--finetune`): `vg_uni_large` from the pretrained model, then each dataset
from that run's best checkpoint with `refcoco_large_finetune` (`refcocop_`, `refcocog_`; also
`_base_finetune` and `_large_finetune_paper`): lr 2e-6 for both groups, `init.select='best'`,
the stage-1 preset otherwise (120 epochs, the same schedule, val every epoch, test splits on
the best checkpoint). `tiny` -> `tiny_finetune` is the same chain on the built-in data (its
`test` split run on the best checkpoint).

  python -m mplug_jax.main --config=configs/grounding.py:vg_uni_large --workdir=UNI_DIR \
    --config.init.checkpoint=mplug_large_v2.pth --config.init.config_bert=config_bert.json \
    --config.input.data_root=ln_data --config.input.split_root=data
  python -m mplug_jax.main --config=configs/grounding.py:refcoco_large_finetune --workdir=DIR \
    --config.init.checkpoint=UNI_DIR \
    --config.input.data_root=ln_data --config.input.split_root=data
  python -m mplug_jax.main --config=configs/grounding.py:refcoco_large --workdir=DIR \
    --config.init.checkpoint=mplug_large_v2.pth --config.init.config_bert=config_bert.json \
    --config.input.data_root=ln_data --config.input.split_root=data
  python -m mplug_jax.main --config=configs/grounding.py:refcocog_base --workdir=DIR \
    --config.init.checkpoint=mplug_base.pth --config.init.config_bert=config_bert_stride3.json \
    --config.input.data_root=ln_data --config.input.split_root=data
  python -m mplug_jax.main --config=configs/grounding.py:tiny,mode=smoke --workdir=DIR \
    --config.init.checkpoint=PRETRAIN_WORKDIR
  mplug-jax evaluate --config configs/grounding.py:refcoco_large --checkpoint DIR \
    --config.input.data_root=ln_data --config.input.split_root=data --out DIR/eval
  mplug-jax predict --checkpoint DIR --task ground --image photo.jpg \
    --text "the man on the left" --out boxed.png

Evals: RefCOCO -> unc testA, testB (+ val); RefCOCO+ -> unc+ testA, testB (+ val); RefCOCOg
-> gref_umd test (+ val), as the official `evaluate()` (hard-coded test splits). As the official
`grounding_mplug.py`: val after every epoch selects the best checkpoint (<workdir>/best/), and
the test splits run once, after training, on that checkpoint (`test_on_best`; results under
<workdir>/results/<split>_step<best step>/); a checkpoint is kept every 10 epochs.

Stage 2, release vs paper: `--finetune` (grounding_mplug.py) sets lr1 = lr2 = 2e-6
and changes nothing else; the paper fine-tunes each dataset "with a learning rate of 2e-6"
(epochs not stated; the presets keep the yaml's 120). The release script's stage-2 commands
(commented out there) start from `vg_large_uni/checkpoint_best.pth` but do not pass
`--finetune`, so as shipped they would train at the yaml's 2e-5 / 5e-6: that run is
`refcoco_large` with `--config.init.checkpoint=UNI_DIR --config.init.select=best`.

Augmentation and boxes as the official code: colour jitter on 80% of the training images
(`input.augment.color_jitter_p`=0.8; 1.0 = every image, this repository's behaviour before)
and the split file's box cast to int before the corner conversion (`input.int_box`=True;
False = the float box); `tiny` and `tiny_finetune`: augmentation off and `int_box` False (the
runs its tests measured).

Deviations from the official recipe (documented): images are CLIP-normalised in training AND
evaluation; the official evaluation uses the ImageNet mean/std instead (quirk G2, a train/eval
mismatch) - set `--config.input.official_eval_normalisation=True` for parity with official
numbers. Evaluation is batched (official: batch 1; identical results, every text is padded to
max_query_len). The official loss broadcasting (G7) is kept (`task.loss_weighting`
='official'; 'per_sample' is the intended weighting). The official gradient accumulation
(4, but zero_grad before every backward: only every 4th batch counts) is not reproduced:
accum_steps 1, so an epoch here has 4x the official number of updates. The heads grounding
never reads (ITC/ITM/MLM, temperature) are frozen.

Learning-rate schedule: every variant but the tiny ones uses the official one
(`optim.schedule='epoch_cosine'`, mplug_jax/optim.py; the base variants follow the large
recipe): both groups start at warmup_lr 1e-6 and reach their peaks (2e-5; 5e-6 for the visual
encoder; 2e-6 for both in the `_finetune` presets) in 20 stairs of 100 batches (one batch =
one update here, as the official batches are counted whether or not their gradient is
applied), then one cosine value per epoch to min lr 1e-6 over 120 epochs.
`--config.optim.schedule=cosine` selects ours instead (linear warm-up from 0 over
`optim.warmup_steps` = 2000 updates, per-update cosine); `tiny` and `tiny_finetune` use ours
(lr 1e-3, and 1e-4 = 1e-3 x 2e-6 / 2e-5 for both groups).

Release vs paper (docs/recipes.md, value by value): the `..._large` variants are the release
(grounding_mplug_large.yaml + script); `refcoco_large_paper`, `refcocop_large_paper`,
`refcocog_large_paper` and `vg_uni_large_paper` take the values the paper states where they
differ (arXiv section 7.1 and Table 11 = EMNLP appendix A.4 and Table 9): global batch 512,
visual-encoder lr 2e-6 (lr 2e-5 as the release), weight decay 0.05; the second stage
`refcoco*_large_finetune_paper`: batch 512, weight decay 0.05, lr 2e-6 for both groups.
"""
import ml_collections

from configs import common

# Official grounding_mplug_large.yaml: batch 24 per GPU x 8, lr1 2e-5 / lr2 5e-6, 120 epochs,
# 20 x 100 warm-up iterations, min lr 1e-6, image_res 336, max_query_len 20.
_OFFICIAL = dict(batch_size=192, lr=2e-5, lr2=5e-6, warmup_steps=2000, epochs=120.0,
                 image_size=336)
_DATASETS = {"refcoco": ("unc", ("val", "testA", "testB")),
             "refcocop": ("unc+", ("val", "testA", "testB")),
             "refcocog": ("gref_umd", ("val", "test")),
             "vg_uni": ("vg_uni", ("val",))}
# Second stage (official grounding_mplug.py `--finetune`: lr1 = lr2 = 2e-6; the stage-2 lines
# of scripts/grounding_mplug_large.sh start from the vg_uni run's checkpoint_best.pth; the
# same yaml otherwise: 120 epochs, warm-up from 1e-6 in 20 stairs, min lr 1e-6).
FINETUNE_LR = 2e-6
FINETUNE = "_finetune"
_STAGE2 = ("refcoco", "refcocop", "refcocog")
_VARIANTS = {"tiny", "tiny" + FINETUNE} | {f"{d}_{s}" for d in _DATASETS
                                          for s in ("base", "large")}
_VARIANTS |= {f"{d}_{s}{FINETUNE}" for d in _STAGE2 for s in ("base", "large")}
# Paper (arXiv 7.1 / Table 11): batch 512, lr 2e-5 / 2e-6 (visual encoder), wd 0.05; the second
# stage "with a learning rate of 2e-6" (7.1).
PAPER = dict(batch_size=512, lr=2e-5, lr2=2e-6, wd=0.05)
_VARIANTS |= {f"{d}_large{common.PAPER_SUFFIX}" for d in _DATASETS}
_VARIANTS |= {f"{d}_large{FINETUNE}{common.PAPER_SUFFIX}" for d in _STAGE2}
UNUSED_HEADS = common.PRETRAIN_HEADS
# Background styles of the synthetic images (`input.synthetic.styles`; e.g. 'solid' alone).
_ALL_STYLES = "solid,gradient,noise"
TINY_LR = 1e-3


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Grounding config; `arg` is `VARIANT[,mode=smoke]` (VARIANT: tiny, tiny_finetune,
    refcoco_base, refcocop_base, refcocog_base, vg_uni_base, the same with _large and
    _large_paper, and refcoco* _base / _large / _large with _finetune (_paper): the second
    stage, from a vg_uni workdir)."""
    arg, c = common.start(arg, _VARIANTS, default="refcoco_large")
    variant = common.release_of(arg.variant)
    stage2 = variant.endswith(FINETUNE)
    variant = variant[:-len(FINETUNE)] if stage2 else variant
    tiny = variant == "tiny"
    o = dict(_OFFICIAL, **PAPER) if common.release_of(arg.variant) != arg.variant else \
        dict(_OFFICIAL, wd=0.02)
    if stage2:  # one lr for both groups (tiny: a tenth of its stage-1 lr, as 2e-6 / 2e-5)
        o.update(lr=FINETUNE_LR, lr2=FINETUNE_LR)
    dataset = "tiny" if tiny else variant.rsplit("_", 1)[0]
    size = "tiny" if tiny else variant.rsplit("_", 1)[1]
    c.total_steps = 600 if tiny else 0
    c.total_epochs = 0.0 if tiny else o["epochs"]

    c.model = common.finetune_model(size, 64 if tiny else o["image_size"])

    c.task = ml_collections.ConfigDict()
    c.task.name = "grounding"
    # 'official' (G7 broadcasting) | 'per_sample' | 'none' (plain token cross-entropy)
    c.task.loss_weighting = "official"

    c.input = ml_collections.ConfigDict()
    name = "synthetic" if tiny else _DATASETS[dataset][0]
    c.input.dataset = name
    c.input.allow_synthetic = tiny
    c.input.data_root = ""  # official ln_data: images (other/images/mscoco/..., referit/...)
    c.input.split_root = ""  # official data/: <name>/<name>_<split>.pth (or .json)
    c.input.synthetic_dir = ""  # built-in data folder; '' = under the system temp dir
    c.input.synthetic_image_size = 64  # side of the synthetic scenes (canvas up to 1.5x)
    # Synthetic scene layout (`data.synthetic_grounding.layout`). tiny: a 2x2 grid of shapes
    # that nearly fill their cell on a square canvas, so the box follows from the referent's
    # cell; the default (grid 3, fill (0.52, 0.72), jitter 0.08, max_extra 0.5) is finer.
    c.input.synthetic = dict(grid=2, fill=(0.75, 0.9), jitter=0.04, max_extra=0.0,
                             max_objects=3, styles=_ALL_STYLES) if tiny else \
        dict(grid=3, fill=(0.52, 0.72), jitter=0.08, max_extra=0.5, max_objects=3,
             styles=_ALL_STYLES)
    c.input.train_size = 8000 if tiny else 0  # synthetic records
    c.input.batch_size = 32 if tiny else o["batch_size"]
    c.input.max_query_len = 20
    # Official: scale + crop + translate on, blur off, colour jitter 0.4 drawn with p 0.8
    # (color_jitter_p; 1.0 = every image, the behaviour of this repository's earlier versions), flip
    # with the word swap. tiny: off (a 600-step run learns faster from the plain images).
    c.input.augment = dict(enabled=not tiny, scale=True, crop=True,
                           crop_short_sides=(400, 500, 600), crop_range=(384, 600),
                           color_jitter=0.4, color_jitter_p=0.8, hflip=True, translate=True)
    # Official: the split file's box is cast to int (truncated) before the corner conversion
    # (x2 = int(x) + int(w)); False keeps the file's float box. tiny: off (its measured runs).
    c.input.int_box = not tiny
    c.input.official_eval_normalisation = False  # True: ImageNet mean/std at eval (G2)
    common.finish_input(c.input, c.input.augment)

    # lr1 for everything but the visual encoder (lr2); official: no clipping (torch DDP).
    lr = (TINY_LR * FINETUNE_LR / _OFFICIAL["lr"] if stage2 else TINY_LR) if tiny else o["lr"]
    c.optim = common.finetune_optim(lr, vision_lr=lr if tiny else o["lr2"], wd=o["wd"],
                                    warmup_steps=50 if tiny else o["warmup_steps"],
                                    frozen=UNUSED_HEADS)
    if not tiny:  # official schedular: warmup_lr 1e-6, warmup_epochs 20, min_lr 1e-6
        common.official_schedule(c.optim, warmup_lr=1e-6, warmup_stairs=20, min_lr=1e-6)

    c.mesh = common.mesh_config(tiny)
    common.set_run_defaults(c, tiny, allow_scratch=False, ckpt_every_steps=200 if tiny else 5000)
    c.best.update(eval="val", metric="accu")  # official: best checkpoint by val Acc@0.5
    if stage2:  # official: --checkpoint <vg_uni output>/checkpoint_best.pth
        c.init.select = "best"

    c.evals = ml_collections.ConfigDict()
    # One block per split; num_examples: the first N records (synthetic: held-out records to
    # generate; 0 = all); batch_size: eval batch (official: 1, same results).
    # Cadence (official grounding_mplug.py main): val after every epoch, checkpoint_best.pth
    # when its accuracy improves, a checkpoint every 10 epochs; after training the test
    # splits run on checkpoint_best.pth. tiny: val once, after training; tiny_finetune: val
    # every epoch and the synthetic 'test' split on the best checkpoint, as the official.
    common_eval = dict(type="grounding", every_steps=0, every_epochs=0.0,
                       batch_size=64 if tiny else 128, num_examples=0, num_examples_shown=5)
    if tiny:
        c.evals.val = dict(common_eval, split="heldout", dataset="", num_examples=256)
        if stage2:
            c.evals.val.every_epochs = 1.0
            c.evals.test = dict(common_eval, split="test", dataset="", num_examples=256)
            c.test_on_best = ["test"]
    else:
        c.ckpt_every_epochs = 10.0
        for split in _DATASETS[dataset][1]:
            c.evals[split] = dict(common_eval, split=split,
                                  dataset="unc" if name == "vg_uni" else "")
        c.evals.val.every_epochs = 1.0
        c.test_on_best = [n for n in c.evals if n != "val"]
    if arg.mode == "smoke":
        common.smoke_run(c)
        c.input.train_size = 512 if tiny else 0
        for ecfg in c.evals.values():
            ecfg.update(num_examples=64, batch_size=32)
    return c
