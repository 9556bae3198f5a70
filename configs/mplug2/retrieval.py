r"""python -m mplug_jax.main --config=configs/mplug2/retrieval.py:tiny --workdir=/tmp/m2ret_tiny

mPLUG-2 text-to-video retrieval fine-tuning (paper Table 3, appendix B.2.3; the release has no
retrieval code): ITC on the universal-layer outputs (pooled video token, text [CLS]) with a
feature queue and momentum distillation, video ids as positives, + ITM with hard negatives
through the fusion (mplug_jax/mplug2/tasks/retrieval.py); evaluation = similarity top-k_test
candidates re-ranked by ITM logit + similarity (official video score), text->video and
video->text R@1/5/10 and MdR (mplug_jax/evaluators/video_retrieval.py), result file
`video_retrieval_result.json` under <workdir>/results/. Variants:

  tiny   `mplug2_tiny` at 32 px (8 px patches), 4 frames, from scratch (init.allow_scratch)
         on the built-in synthetic moving-shape videos (`data.synthetic_video`: captions like
         "a red circle moving left"), held-out eval on 64 other videos
  base   `mplug2_base` (the paper's base model), the MSRVTT recipe below
  large  `mplug2_large` (the release's model), the MSRVTT recipe below

MSRVTT recipe (paper appendix B.2.3): 224 px, 12 frames sampled at random per segment in
training and uniformly at test, RandomResizedCrop(0.5-1) + horizontal flip, 10 epochs, lr 2e-5,
global batch 192; the rest as mPLUG v1 / ALBEF retrieval
(docs/official-formats.md#optimiser-and-schedule): wd 0.02, queue 65536 (a multiple of 192: 65472),
momentum 0.995, temp 0.07, embed dim 256, alpha 0.4 ramped over epoch 0, k_test 128, captions 40
words / 35 tokens (v1 MSRVTT eval settings), visual encoder at lr 2e-6 as the release's video QA.

  python -m mplug_jax.main --config=configs/mplug2/retrieval.py:large --workdir=DIR \
    --config.init.checkpoint=MPLUG2_CONVERTED_DIR --config.input.dataset=json \
    --config.input.annotations=msrvtt/msrvtt_train_9k.jsonl \
    --config.input.video_root=msrvtt/videos \
    --config.evals.val.annotations=msrvtt/msrvtt_test_1k.jsonl \
    --config.evals.val.video_root=msrvtt/videos
  python -m mplug_jax.main --config=configs/mplug2/retrieval.py:tiny,mode=smoke --workdir=DIR
  mplug-jax evaluate --config=configs/mplug2/retrieval.py:large --checkpoint=WORKDIR \
    --config.evals.val.annotations=... --config.evals.val.video_root=... --out=DIR

Annotations: MSRVTT retrieval jsonl ({"clip_name", "caption"} per line; training lines may
repeat a clip, one per caption; test = BLIP's msrvtt_test.jsonl, one caption per clip).
MPLUG2_CONVERTED_DIR: `mplug-jax convert` of the released mPLUG-2 (or init.checkpoint = the
official file with init.config_bert / init.config_yaml), or an mPLUG-2 workdir of ours
(mplug2_pretrain / mplug2_video_qa / mplug2_retrieval). The retrieval heads (ITC projections,
ITM head, temperature) are not in the release and start random.

In-batch negatives: `task.negatives='per_device'` (base / large) draws them from each batch
shard's rows, as the v1 / ALBEF retrieval code does per GPU under DDP; `tiny`: 'global'.

Deviations (documented): the temperature is clamped to [0.001, 0.5]; warm-up ramps from 0;
the decoder and MLM head get no gradient and are frozen (`optim.frozen`). Learning-rate
schedule: ours (`optim.schedule='cosine'`) for every variant (the release has no retrieval code).
"""
import ml_collections

from configs import common
from configs.mplug2 import models
from configs.mplug2.models import variant_model

_MSRVTT = dict(batch_size=192, lr=2e-5, lr2=2e-6, warmup_steps=100, total_steps=0,
               epochs=10.0, image_size=224, num_frames=12, eval_frames=12, queue_size=65472,
               momentum=0.995, max_tokens=35, k_test=128, dropout=0.1, train_size=0,
               eval_size=0, captions=1)
_VARIANTS = {
    # tiny: from scratch on the synthetic videos; as the v1 tiny retrieval, no queue (stale
    # features of a fast-changing model are a shortcut) and faster momentum.
    "tiny": dict(model="mplug2_tiny", batch_size=16, lr=1e-3, lr2=1e-3, warmup_steps=20,
                 total_steps=250, epochs=0.0, image_size=32, num_frames=4, eval_frames=4,
                 queue_size=0, momentum=0.99, max_tokens=16, k_test=8, dropout=0.0,
                 train_size=400, eval_size=64, captions=2),
    "base": dict(_MSRVTT, model="mplug2_base"),
    "large": dict(_MSRVTT, model="mplug2_large"),
}
# Parameters the retrieval forward never reads: the shared decoder and the MLM head.
UNUSED = r"^(decoder|mlm_transform|mlm_ln|mlm_bias)(/|$)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """mPLUG-2 retrieval config; `arg` is `VARIANT[,mode=smoke]` (tiny, base, large)."""
    arg, c, v, tiny = common.begin_finetune(
        arg, _VARIANTS, default="large", name="mplug2.retrieval", epochs="epochs",
        model=lambda v, tiny: variant_model(v, tiny, embed_dim=32 if tiny else 256,
                                            temp_init=0.07))
    c.task.loss_weights = dict(itc=1.0, itm=1.0)
    c.task.itc = dict(queue_size=v["queue_size"], momentum=v["momentum"], distill_alpha=0.4,
                      alpha_warmup_epochs=1.0, temp_min=0.001, temp_max=0.5)
    # In-batch negatives (mplug_jax/negatives.py): 'per_device' = each batch shard's rows, as
    # the mPLUG v1 / ALBEF retrieval code under DDP (the paper's per-GPU batch is not stated);
    # tiny: 'global', one pool of 16.
    c.task.negatives = "global" if tiny else "per_device"

    # dataset: 'synthetic' (built-in videos) | 'json' (MSRVTT jsonl)
    c.input = common.new_input(tiny)
    c.input.annotations = ""  # MSRVTT retrieval train jsonl (clip_name, caption)
    c.input.video_root = ""  # frame folders <root>/<clip>/ or <root>/<clip>.mp4
    c.input.synthetic_dir = ""  # '' = a fresh temporary folder
    c.input.synthetic_raw_frames = 8
    c.input.synthetic_image_size = 32
    c.input.train_size = v["train_size"]  # synthetic videos
    c.input.captions_per_video = v["captions"]  # synthetic captions per video
    c.input.batch_size = v["batch_size"]  # global
    c.input.max_words = 40
    c.input.max_tokens = v["max_tokens"]
    # tiny: no augmentation (a flip would contradict the left/right captions).
    common.finish_input(c.input, common.train_augment(tiny, randaug=(0, 0),
                                                      backend=models.VIDEO_AUGMENT_BACKEND))

    c.optim = common.finetune_optim(v["lr"], vision_lr=v["lr2"], wd=0.02,
                                    warmup_steps=v["warmup_steps"], frozen=UNUSED,
                                    end_lr=1e-5 if tiny else 1e-6)

    common.finetune_run(c, tiny, allow_scratch=tiny, ckpt_every_steps=250 if tiny else 2000)

    # Cadence: val r_mean after every epoch, the best kept (as the mPLUG retrieval script,
    # retrieval_img_mplug.py; the mPLUG-2 release has no retrieval fine-tuning script);
    # tiny: once, after training.
    c.evals.val = dict(
        type="video_retrieval", every_steps=0, every_epochs=0.0 if tiny else 1.0,
        dataset="synthetic" if tiny else "json",
        annotations="", video_root="", num_frames=v["eval_frames"], batch_size=16,
        max_text_tokens=v["max_tokens"], k_test=v["k_test"], sim_chunk=16 if tiny else 256,
        itm_batch_size=16 if tiny else 128, add_similarity=True, resize="nearest", limit=0,
        workers=2 if tiny else 8, log_every=0 if tiny else 20, log_every_batches=50,
        top_n=10, max_skip_rate=0.01, synthetic_size=v["eval_size"] or 16,
        synthetic_frames=8, synthetic_image_size=32, synthetic_video="frames",
        synthetic_dir="")
    c.best.update(eval="val", metric="r_mean")

    if arg.mode == "smoke":
        # base / large: 16 clips, so per_device leaves 2 per shard on up to 8 devices.
        common.smoke_run(c, batch_size=8 if tiny else 16)
        c.task.itc.queue_size = 16
        c.input.train_size = 32 if tiny else 0
        c.evals.val.update(synthetic_size=16, k_test=4)
    return c
