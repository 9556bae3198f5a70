r"""python -m mplug_jax.main --config=configs/caption.py:tiny --workdir=/tmp/mplug_caption_tiny \
  --config.init.checkpoint=/tmp/mplug_pretrain_tiny

Image captioning (COCO Karpathy split; paper section 5.2, official `caption_mplug.py`): cross-
entropy fine-tuning, then SCST (`mode=scst`, official `caption_mplug_scst.py`), or zero-shot
captioning of a pretraining workdir (`mode=zeroshot`). Variants: `tiny` (built-in synthetic
shapes captions, 5 references per image, on a 2-core CPU), `base` (ViT-B/16 at 384 px) and
`large` (ViT-L/14 at 336 px). base/large refuse the synthetic data and random weights unless
asked (`input.allow_synthetic`, `init.allow_scratch`):

  python -m mplug_jax.main --config=configs/caption.py:base --workdir=DIR \
    --config.input.train_annotations='["data/coco_object/coco_caption_train_ocr.json"]' \
    --config.input.eval_annotations='["data/coco_object/coco_caption_test_ocr.json"]' \
    --config.input.coco_root=img_root/coco_2014/ --config.init.checkpoint=mplug_base.pth \
    --config.init.config_bert=config_bert_stride3.json
  python -m mplug_jax.main --config=configs/caption.py:base,mode=scst --workdir=DIR2 \
    (same data flags) --config.init.checkpoint=DIR          # SCST from the CE workdir's
                                                            # epoch-3 checkpoint (init.select)
  python -m mplug_jax.main --config=configs/caption.py:large --workdir=DIR ... \
    --config.init.checkpoint=mplug_large_v2.pth --config.init.config_bert=config_bert.json
  mplug-jax evaluate --config=configs/caption.py:tiny,mode=zeroshot \
    --checkpoint=/tmp/mplug_pretrain_tiny --out=DIR3        # "a picture of" prompt, no training

Evaluation and selection (official `caption_mplug.py` / `caption_mplug_scst.py`): CE evaluates
after every epoch and keeps every epoch's checkpoint (`ckpt_every_epochs`); SCST starts from the
CE workdir's checkpoint after epoch 3 (base) / 4 (large), counted from 0 as the official
`checkpoint_03.pth` / `checkpoint_04.pth` (`init.select='epoch:3'`; `--config.init.select=best`
or `latest` for another; `latest` for an official file or a converted directory), evaluates
every 1500 updates and after every epoch, and keeps the best CIDEr under <workdir>/best/.

Official values (docs/official-formats.md#config-values and #optimiser-and-schedule): CE lr1 / lr2
1e-5 / 5e-6 (visual encoder), wd 0.02, 5 epochs, 400 warm-up iterations (= 100 optimizer steps with
accumulation 4), min lr 1e-6, 64 images/GPU x 4 GPUs x 4 accumulation = 1024 per update, targets
truncated at 25 tokens, beam 5 / min 8 / max 25, prompt ''. SCST: lr 1e-6 for all, min lr 8e-8, 32
(base) / 64 (large) images/GPU x 4 GPUs, no accumulation, 5 beams per image; and the official
SCST's details (`task.scst`, mplug_jax/scst.py): length_norm='official' (summed
log-prob / (generated tokens + 1)), search_dropout=True (the beam search runs in train mode),
reward_tokenize='ptb' (Java), cider_df='batch' (CIDEr-D document frequencies from the batch's
references). `tiny` keeps ours instead (length_norm='generated', search_dropout=False,
reward_tokenize='simple', cider_df='train'): fast, no Java, and its dropout is 0 anyway.

Learning-rate schedule: base / large (CE and SCST) use the official one
(`optim.schedule='epoch_cosine'`, mplug_jax/optim.py): every group starts at warmup_lr 1e-5 and
reaches its peak in 4 stairs of 100 micro-batches (CE: 25 updates of 4 micro-batches each; the
visual encoder's 5e-6 warms *down*; SCST: 100 updates, so its first 400 updates run at 3-10x
its 1e-6), then one cosine value per epoch to min lr 1e-6 (SCST 8e-8) over 5 epochs.
`--config.optim.schedule=cosine` selects ours instead (linear warm-up from 0 over
`optim.warmup_steps` updates, per-update cosine); `tiny` uses ours. `mode=zeroshot` is for
`mplug-jax evaluate` (no training; through the trainer it would run one step at lr 0).

Release vs paper (docs/recipes.md, value by value): `base` and `large` are the release
(caption_mplug_{base,large}[_scst].yaml + scripts); `large_paper` is `large` with the values
the paper states where they differ (arXiv section 7.1 and Table 11 = EMNLP appendix A.4 and
Table 9): cross-entropy batch 256, weight decay 0.05, SCST lr 8e-7, beam 10 with max length
20 (min length unstated: 8 as the release; the SCST search uses the same beam, as the task has
one search setting). Everything else stays the release's. The paper's table is for the ViT-L
model only, so there is no `base_paper`.
"""
import ml_collections

from configs import common

_VARIANTS = {
    "tiny": dict(image_size=64, batch_size=32, lr=5e-4, vision_lr_mult=1.0, warmup_steps=30,
                 total_steps=400, max_tokens=20, min_length=2, max_length=16,
                 scst_batch_size=16, scst_lr=2e-5),
    "base": dict(image_size=384, batch_size=1024, lr=1e-5, vision_lr_mult=0.5, warmup_steps=100,
                 total_steps=0, max_tokens=25, min_length=8, max_length=25,
                 scst_batch_size=128, scst_lr=1e-6),
    "large": dict(image_size=336, batch_size=1024, lr=1e-5, vision_lr_mult=0.5,
                  warmup_steps=100, total_steps=0, max_tokens=25, min_length=8, max_length=25,
                  scst_batch_size=256, scst_lr=1e-6),
}
# Paper (arXiv 7.1 / Table 11): CE batch 256 (accumulation kept: 4 micro-batches of 64), SCST
# lr 8e-7, wd 0.05, inference beam 10 / max length 20.
PAPER = {"large": dict(batch_size=256, scst_lr=8e-7, wd=0.05, beam_size=10, max_length=20)}
_VARIANTS = common.with_paper(_VARIANTS, PAPER)
MODES = ("ce", "scst", "zeroshot")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Caption config; `arg` is `VARIANT[,mode=ce|scst|zeroshot]`."""
    arg, c = common.start(arg, _VARIANTS, default="base", modes=MODES)
    v = _VARIANTS[arg.variant]
    tiny, scst, zeroshot = arg.variant == "tiny", arg.mode == "scst", arg.mode == "zeroshot"
    c.total_steps = 1 if zeroshot else v["total_steps"]
    c.total_epochs = 0.0 if c.total_steps else 5.0

    c.model = common.finetune_model(common.release_of(arg.variant), v["image_size"])

    c.task = ml_collections.ConfigDict()
    c.task.name = "caption"
    c.task.prompt = ""  # official COCO: '' (prefixes training targets only)
    # Zero-shot from pretraining: the prompt goes through the text encoder + fusion, as the
    # prefix-LM prefixes did (see mplug_jax/tasks/caption.py).
    c.task.zero_shot_prompt = "a picture of" if zeroshot else ""
    # tiny: shapes captions have 2-12 words; the official min 8 would force padding words.
    c.task.generation = dict(beam_size=v.get("beam_size", 5), min_length=v["min_length"],
                             max_length=v["max_length"], alpha=0.6)
    c.task.scst = common.scst_block(scst, tiny)  # official SCST choices; tiny: ours

    c.input = ml_collections.ConfigDict()
    c.input.dataset = "synthetic"  # 'synthetic' (built-in) | 'karpathy' (official files)
    c.input.allow_synthetic = tiny
    c.input.train_annotations = []
    c.input.eval_annotations = []
    c.input.coco_root = ""
    c.input.train_size = 4000  # synthetic images (5 records each)
    c.input.eval_size = 200
    c.input.refs_per_image = 5
    c.input.batch_size = v["scst_batch_size"] if scst else v["batch_size"]  # global
    c.input.max_tokens = v["max_tokens"]
    # Official fine-tune augmentation; off for tiny (flips would contradict "left of" captions).
    common.finish_input(c.input, common.train_augment(tiny))

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.0 if zeroshot else (v["scst_lr"] if scst else v["lr"])
    mult = 1.0 if scst else v["vision_lr_mult"]  # SCST: lr1 = lr2
    c.optim.lr_groups = dict(vision=dict(pattern=r"^vision/", mult=mult))
    c.optim.wd = v.get("wd", 0.02)
    c.optim.no_wd = r"(?i)(bias$)|((ln|norm)[^/]*/scale$)|(^temp$)"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.warmup_steps = 0 if zeroshot else (v["warmup_steps"] * (4 if scst and not tiny
                                                                      else 1))
    c.optim.schedule = "cosine"
    c.optim.end_lr = 0.0 if zeroshot else (8e-8 if scst and not tiny else 1e-6)
    c.optim.warmup_lr, c.optim.warmup_stairs, c.optim.stair_microbatches = 0.0, 0, 100
    c.optim.clip_norm = 0.0
    # Official CE: 4 accumulated batches per update; SCST: none.
    c.optim.accum_steps = 1 if tiny or scst else 4
    if not (tiny or zeroshot):  # official schedular: warmup_lr 1e-5, warmup_epochs 4
        common.official_schedule(c.optim, warmup_lr=1e-5, warmup_stairs=4,
                                 min_lr=8e-8 if scst else 1e-6)

    c.mesh = common.mesh_config(tiny)

    common.set_run_defaults(c, tiny, allow_scratch=False, ckpt_every_steps=200 if tiny else 2000)
    c.best.update(eval="caption", metric="CIDEr")  # official SCST: checkpoint_best by CIDEr
    official = not (tiny or zeroshot)
    if official and not scst:
        # Official caption_mplug.py saves checkpoint_%02d.pth after every epoch; SCST starts
        # from one of them (below), so they are kept.
        c.ckpt_every_epochs = 1.0
    if official and scst:
        # Official scripts/caption_mplug_{base,large}_scst.sh: --checkpoint
        # coco_caption_base_1e-5/checkpoint_03.pth (base) / coco_caption_large/checkpoint_04.pth
        # (large), i.e. the CE run's checkpoint after epoch 3 / 4 (counted from 0).
        c.init.select = "epoch:3" if arg.variant.startswith("base") else "epoch:4"

    # Cadence: official CE (caption_mplug.py) evaluates the test split after every epoch
    # (vqa_result_epoch<E>.json); official SCST (caption_mplug_scst.py) every 1500 iterations
    # (--eval_steps; checkpoint_best.pth when CIDEr improves) and after every epoch. Two
    # differences: the official SCST counts the 1500 from each epoch's start and compares
    # CIDEr within an epoch only (its best_cider is reset every epoch); here `every_steps`
    # counts from the run's start and the best is over the whole run, end-of-epoch
    # evaluations included. tiny: once, after training.
    c.evals = ml_collections.ConfigDict()
    c.evals.caption = dict(type="caption", every_steps=1500 if official and scst else 0,
                           every_epochs=1.0 if official else 0.0,
                           batch_size=32 if tiny else 64,
                           num_images=0, metrics=("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4",
                                                  "METEOR", "ROUGE_L", "CIDEr"),
                           tokenize="ptb", num_examples=5, log_every=20, write_results=True)
    return c
