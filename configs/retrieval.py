r"""python -m mplug_jax.main --config=configs/retrieval.py:tiny \
  --workdir=/tmp/mplug_retrieval_tiny --config.init.checkpoint=/tmp/mplug_pretrain_tiny

Image-text retrieval fine-tuning (paper section 5.2.3; official `retrieval_img_mplug.py`):
ITC with a 65536-entry queue and momentum distillation + ITM with hard negatives, image ids as
ITC positives (mplug_jax/tasks/retrieval.py); evaluation = similarity top-k_test candidates
re-ranked by the ITM logit, R@1/5/10 both ways (mplug_jax/evaluators/retrieval.py) and a
`retrieval_result.json` under <workdir>/results/. Variants: `tiny` (built-in synthetic shapes
written as ALBEF json + images, 2-core CPU, from the `configs/pretrain.py:tiny` workdir),
`coco_large` / `flickr_large` (the official configs: ViT-L/14 at 336 px, mplug_large.pth) and
`coco_base` / `flickr_base` (ViT-B/16, same recipe; no official base retrieval config exists,
resolution 384 as the official base VQA / caption configs). Real-data variants refuse the
synthetic data and random initialisation unless asked (`input.allow_synthetic`,
`init.allow_scratch`):

  python -m mplug_jax.main --config=configs/retrieval.py:coco_large --workdir=DIR \
    --config.init.checkpoint=mplug_large.pth --config.init.config_bert=config_bert.json \
    --config.input.dataset=json --config.input.train_annotations='["data/coco_train.json"]' \
    --config.input.eval_annotations='["data/coco_test.json"]' \
    --config.input.image_root=img_root/coco_2014/
  python -m mplug_jax.main --config=configs/retrieval.py:flickr_large --workdir=DIR ... (as
    coco_large, with flickr30k_{train,test}.json and image_root img_root/flickr30k/)
  python -m mplug_jax.main --config=configs/retrieval.py:tiny,mode=smoke --workdir=DIR \
    --config.init.checkpoint=PRETRAIN_WORKDIR

Zero-shot retrieval of a pretrained model (paper Table 8: Flickr30K without fine-tuning;
`mode=zeroshot` has no train steps, so it runs through `evaluate`, not the trainer):

  mplug-jax evaluate --config configs/retrieval.py:flickr_base,mode=zeroshot \
    --checkpoint PRETRAIN_WORKDIR --config.input.dataset=json \
    --config.input.eval_annotations='["data/flickr30k_test.json"]' \
    --config.input.image_root=img_root/flickr30k/ --out DIR

Use `--config.evals.val.annotations='["data/coco_val.json"]'` to evaluate another split than
input.eval_annotations. Re-score a result file: `mplug-jax score --task retrieval --results
DIR/results/val_stepN/retrieval_result.json --annotations data/coco_test.json`.

Official values (docs/official-formats.md#config-values and #optimiser-and-schedule): per-GPU batch
128 x 8 GPUs = 1024, lr1 1e-5 / lr2 (CLIP) 2e-6, weight decay 0.02, 8 epochs, cosine to min_lr 1e-6,
100 warm-up iterations, queue 65536, momentum 0.995, temp 0.07, E 256, alpha 0.4 ramped over epoch
0, k_test 256 (both release yamls), texts 30 tokens.

Release vs paper (docs/recipes.md, value by value): `coco_large` / `flickr_large` are the
release (retrieval_{coco,flickr30k}_mplug_large.yaml + scripts); `coco_large_paper` /
`flickr_large_paper` take the values the paper states where they differ (arXiv section 7.1,
Table 11 and section 5.2.3 = EMNLP appendix A.4 and Table 9): global batch 256, 5 epochs,
weight decay 0.05, and k_test 128 for Flickr30K (the release yaml has 256). There is no base
paper preset (the paper's table is for the ViT-L model).

Learning-rate schedule: every variant but `tiny` uses the official one
(`optim.schedule='epoch_cosine'`, mplug_jax/optim.py; the base variants follow the large
recipe): both groups start at warmup_lr 1e-5 and reach their peaks (1e-5; 2e-6 for the visual
encoder, which warms *down*) after one stair of 100 updates, then one cosine value per epoch to
min lr 1e-6 over 8 epochs. `--config.optim.schedule=cosine` selects ours instead (linear
warm-up from 0 over `optim.warmup_steps` = 100 updates, per-update cosine); `tiny` uses ours.
Deviations (documented): the temperature is clamped to [0.001, 0.5]; the decoder and MLM head
(absent from the official retrieval model) are frozen. In-batch negatives: `task.negatives`
'per_device' (every variant but `tiny`) draws them from each batch shard's rows as the official
per-GPU forward under DDP does; the pools are the official 128 rows only on 8 batch shards of
1024 (the paper presets' 256 over 8 gives 32); 'global' draws them from the whole batch.
"""
import ml_collections

from configs import common

_OFFICIAL = dict(batch_size=1024, lr=1e-5, lr2=2e-6, warmup_steps=100, total_steps=0,
                 epochs=8.0, queue_size=65536, momentum=0.995, train_size=0, eval_size=0,
                 clip_norm=0.0)
_VARIANTS = {
    # tiny: from the tiny pretraining workdir, same 64 px model, built-in synthetic data; as
    # configs/pretrain.py:tiny, no feature queue (stale features of a fast-changing model are
    # a shortcut), faster momentum and the same lr for the visual encoder.
    "tiny": dict(model="tiny", image_size=64, k_test=32, batch_size=32, lr=1e-3, lr2=1e-3,
                 warmup_steps=30, total_steps=600, epochs=0.0, queue_size=0, momentum=0.99,
                 train_size=2000, eval_size=100, clip_norm=0.0),
    "coco_base": dict(_OFFICIAL, model="base", image_size=384, k_test=256),
    "coco_large": dict(_OFFICIAL, model="large", image_size=336, k_test=256),
    "flickr_base": dict(_OFFICIAL, model="base", image_size=384, k_test=128),
    "flickr_large": dict(_OFFICIAL, model="large", image_size=336, k_test=256),
}
# Paper (arXiv 7.1 / Table 11, 5.2.3): batch 256, 5 epochs, wd 0.05; k 256 COCO / 128 Flickr30K.
PAPER = {"coco_large": dict(batch_size=256, epochs=5.0, wd=0.05),
         "flickr_large": dict(batch_size=256, epochs=5.0, wd=0.05, k_test=128)}
_VARIANTS = common.with_paper(_VARIANTS, PAPER)
# Parameters of the shared tree the retrieval forward never reads (not in the official
# retrieval model): the prefix-LM decoder and the MLM head.
UNUSED_HEADS = r"^(decoder|mlm_transform|mlm_ln|mlm_bias)(/|$)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Retrieval config; `arg` is `VARIANT[,mode=smoke|zeroshot]`."""
    arg, c, v, tiny = common.begin_finetune(
        arg, _VARIANTS, default="coco_large", name="retrieval", epochs="epochs",
        model=lambda v, tiny: common.finetune_model(v["model"], v["image_size"]),
        modes=("full", "smoke", "zeroshot"))
    c.task.loss_weights = dict(itc=1.0, itm=1.0)
    c.task.itc = dict(queue_size=v["queue_size"], momentum=v["momentum"], distill_alpha=0.4,
                      alpha_warmup_epochs=1.0, temp_min=0.001, temp_max=0.5)
    # Where ITC's in-batch columns and ITM's hard negatives come from (mplug_jax/negatives.py):
    # 'per_device' = each batch shard's rows, as the official DDP runs (128 per GPU of 1024:
    # 8 batch shards reproduce it); 'global' = the whole batch (tiny: one CPU pool of 32).
    c.task.negatives = "global" if tiny else "per_device"

    c.input = common.new_input(tiny)  # dataset 'synthetic' (built-in, ALBEF json + images) | 'json'
    c.input.train_annotations = []  # official train json ({image, caption, image_id})
    c.input.eval_annotations = []  # official val/test json ({image, caption: [...]})
    c.input.image_root = ""
    c.input.synthetic_dir = ""  # '' = a folder in the system temp dir named by the settings
    c.input.train_size = v["train_size"]  # synthetic train images
    c.input.eval_size = v["eval_size"]  # synthetic val (and test) images
    c.input.captions_per_image = 2  # synthetic
    c.input.batch_size = v["batch_size"]  # global
    c.input.max_tokens = 30  # official: pre_caption 30 words, 30 ids at evaluation
    # Official retrieval train transform; tiny: none (flips contradict left/right captions).
    common.finish_input(c.input, common.train_augment(tiny))

    # Official schedular (base/large): warmup_lr 1e-5, warmup_epochs 1, min_lr 1e-6.
    c.optim = common.release_optim(v, tiny, frozen=UNUSED_HEADS, warmup_stairs=1)

    common.finetune_run(c, tiny, allow_scratch=False, ckpt_every_steps=200 if tiny else 2000)
    c.best.update(eval="val", metric="r_mean")  # official: best by val r_mean

    # k_test: candidates re-ranked per query (capped at the number of items); batch_size:
    # images / texts per embedding call (official batch_size_test 64); sim_chunk: query rows
    # per similarity call; itm_batch_size: (image, text) pairs per ITM call; annotations:
    # eval json files (empty: input.eval_annotations, or the synthetic `split`);
    # add_similarity: score = ITM logit + cosine similarity (official video retrieval).
    # Cadence (official retrieval_img_mplug.py main): val (and test, not run here) after
    # every epoch, checkpoint_best.pth by val r_mean; tiny: once, after training.
    c.evals.val = dict(type="retrieval", every_steps=0,
                       every_epochs=0.0 if tiny or arg.mode == "zeroshot" else 1.0,
                       k_test=v["k_test"], batch_size=64,
                       sim_chunk=256 if tiny else 1024, itm_batch_size=128 if tiny else 256,
                       add_similarity=False, annotations=[], split="val",
                       log_every_batches=200, top_n=10)

    if arg.mode == "smoke":
        common.smoke_run(c)
        c.task.itc.queue_size = 64
        c.input.train_size = 256 if tiny else 0
        c.input.eval_size = 32 if tiny else 0
        c.evals.val.update(batch_size=32, k_test=min(v["k_test"], 16))
    elif arg.mode == "zeroshot":
        # No training: `mplug-jax evaluate --checkpoint PRETRAIN_WORKDIR` (module docstring).
        c.total_steps, c.total_epochs = 0, 0.0
        c.init.allow_scratch = False
    return c
