r"""python -m mplug_jax.main --config=configs/mplug2/pretrain.py:tiny --workdir=/tmp/m2pre_tiny

mPLUG-2 pretraining (paper section 3.2; the release has none) on mixed image + video batches:
MLM, vision-language contrastive learning (queue + momentum distillation) and matching (hard
negatives), instruction-based LM through the shared decoder with a task prompt ("a video of"
/ "a picture of"); mplug_jax/mplug2/tasks/pretrain.py. Every loss and its video / image parts
are logged separately. Variants:

  tiny   `mplug2_tiny` at 32 px (8 px patches), 4 frames, from scratch on the built-in
         synthetic moving-shape videos (`data.synthetic_video`) + the built-in shapes images
         (`data.synthetic`), 16 clips + 16 images per step
  base   `mplug2_base` (paper appendix: ViT-B/16, BERT-base, 3 fusion layers, S = 2)
  large  `mplug2_large` (the release's architecture)

  python -m mplug_jax.main --config=configs/mplug2/pretrain.py:base --workdir=DIR \
    --config.init.checkpoint=MPLUG2_CONVERTED_DIR_OR_WORKDIR --config.input.dataset=json \
    --config.input.annotations=webvid_train.jsonl --config.input.video_root=webvid/videos \
    --config.input.images.dataset=json --config.input.images.annotations='["coco.json"]' \
    --config.input.images.image_root=IMAGES
  python -m mplug_jax.main --config=configs/mplug2/pretrain.py:tiny,mode=smoke --workdir=DIR

Video annotations: MSRVTT-retrieval-style jsonl ({"clip_name", "caption"} per line, e.g. a
WebVid-2M export); images: the mPLUG pretraining json lists (`data.pretrain_input`).
base / large (paper section 4.1 / appendix, values it does not give taken from mPLUG v1's
pretraining yaml, docs/official-formats.md#config-values): lr 1e-4 (vision 1e-5), wd 0.02, queue
65536, momentum 0.995, temp 0.07, alpha 0.4 over epoch 0, mask 15%, 8 frames at 224 px,
30 epochs. There is no mPLUG-2 pretraining from scratch on a CPU beyond `tiny`: base / large
refuse the synthetic data and random weights unless asked.
"""
import ml_collections

from configs import common
from configs.mplug2 import models
from configs.mplug2.models import variant_model

_VARIANTS = {
    "tiny": dict(model="mplug2_tiny", batch_size=16, image_batch_size=16, lr=5e-4,
                 lr2=5e-4, warmup_steps=30, total_steps=300, epochs=0.0, image_size=32,
                 num_frames=4, queue_size=0, momentum=0.99, max_tokens=16, train_size=2000,
                 image_train_size=4000),
    "base": dict(model="mplug2_base", batch_size=512, image_batch_size=512, lr=1e-4,
                 lr2=1e-5, warmup_steps=1000, total_steps=0, epochs=30.0, image_size=224,
                 num_frames=8, queue_size=65536, momentum=0.995, max_tokens=32, train_size=0,
                 image_train_size=0),
    "large": dict(model="mplug2_large", batch_size=512, image_batch_size=512, lr=5e-5,
                  lr2=5e-6, warmup_steps=1000, total_steps=0, epochs=30.0, image_size=224,
                  num_frames=8, queue_size=65536, momentum=0.995, max_tokens=32, train_size=0,
                  image_train_size=0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """mPLUG-2 pretraining config; `arg` is `VARIANT[,mode=smoke]` (tiny, base, large)."""
    arg, c, v, tiny = common.begin_finetune(
        arg, _VARIANTS, default="base", name="mplug2.pretrain", epochs="epochs",
        model=lambda v, tiny: variant_model(v, tiny, dropout=0.0 if tiny else 0.1,
                                            embed_dim=32 if tiny else 256, temp_init=0.07))
    c.task.loss_weights = dict(itc=1.0, itm=1.0, mlm=1.0, lm=1.0)
    c.task.itc = dict(queue_size=v["queue_size"], momentum=v["momentum"], distill_alpha=0.4,
                      alpha_warmup_epochs=1.0, temp_min=0.001, temp_max=0.5)
    c.task.mlm = dict(mask_prob=0.15)
    # Instruction prompts of the instruction-based LM, per modality (paper section 3.2).
    c.task.instructions = dict(video="a video of", image="a picture of")

    # dataset of the videos: 'synthetic' (built-in) | 'json' (clip_name, caption)
    c.input = common.new_input(tiny)
    c.input.annotations = ""
    c.input.video_root = ""
    c.input.synthetic_dir = ""
    c.input.synthetic_raw_frames = 8
    c.input.synthetic_image_size = 32
    c.input.train_size = v["train_size"]  # synthetic videos
    c.input.captions_per_video = 2
    c.input.batch_size = v["batch_size"]  # clips per step (global)
    c.input.image_batch_size = v["image_batch_size"]  # images per step (global)
    c.input.max_words = 30
    c.input.max_tokens = v["max_tokens"]
    common.finish_input(c.input, common.train_augment(tiny, randaug=(0, 0),
                                                      backend=models.VIDEO_AUGMENT_BACKEND))
    # Image-caption stream (`data.pretrain_input` keys).
    c.input.images = dict(dataset="synthetic", annotations=[], eval_annotations=[],
                          image_root="", tfds_dir="", eval_split="validation",
                          train_size=v["image_train_size"],
                          augment=common.train_augment(tiny, randaug=(0, 0), backend="pil"))

    c.optim = common.finetune_optim(v["lr"], vision_lr=v["lr2"], wd=0.02,
                                    warmup_steps=v["warmup_steps"], frozen="",
                                    end_lr=1e-5 if tiny else 1e-6)

    common.finetune_run(c, tiny, allow_scratch=tiny, ckpt_every_steps=300 if tiny else 2000)

    if arg.mode == "smoke":
        common.smoke_run(c, batch_size=8)
        c.input.image_batch_size = 8
        c.task.itc.queue_size = 32
        c.input.train_size = 32 if tiny else 0
        c.input.images.train_size = 64 if tiny else 0
    return c
