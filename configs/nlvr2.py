r"""python -m mplug_jax.main --config=configs/nlvr2.py:tiny --workdir=/tmp/mplug_nlvr2_tiny \
  --config.init.checkpoint=/tmp/mplug_pretrain_tiny

NLVR2 fine-tuning (paper 5.2.2 and Table 11; the official release has only a dataset reader):
is the sentence true of the (left, right) image pair? Both images through the visual encoder,
each co-attention layer with two cross-attention branches (one per image, both initialised
from the pretrained cross-attention, outputs averaged), an MLP on the fused text [CLS],
cross-entropy (mplug_jax/models/nlvr2.py and tasks/nlvr2.py give every choice). Evaluated by
the shared `classify` evaluator: accuracy overall and per class (False / True) and
`nlvr2_result.json` ([{"id", "pred", "label"}]) under <workdir>/results/. Variants: `tiny`
(the built-in synthetic NLVR2, mplug_jax/data/synthetic/nlvr2.py, on a 2-core CPU, starting
from the `configs/pretrain.py:tiny` workdir), `base` (ViT-B/16) and `large` (ViT-L/14), both
at 336 px with the paper's values. base and large refuse the synthetic data and random
initialisation unless asked (`input.allow_synthetic`, `init.allow_scratch`):

  python -m mplug_jax.main --config=configs/nlvr2.py:base --workdir=DIR \
    --config.init.checkpoint=mplug_base.pth --config.init.config_bert=config_bert_stride3.json \
    --config.input.dataset=json --config.input.train_files='["nlvr_train.json"]' \
    --config.input.val_files='["nlvr_dev.json"]' --config.input.test_files='["nlvr_test.json"]' \
    --config.input.image_root=nlvr2/images/
  python -m mplug_jax.main --config=configs/nlvr2.py:large --workdir=DIR ... (as base, with
    mplug_large_v2.pth and config_bert.json)
  python -m mplug_jax.main --config=configs/nlvr2.py:tiny,mode=smoke --workdir=DIR \
    --config.init.checkpoint=PRETRAIN_WORKDIR
  mplug-jax evaluate --config configs/nlvr2.py:base --checkpoint DIR \
    --config.input.dataset=json ... --config.evals.val.split=test
  mplug-jax score --task nlvr2 --results nlvr2_result.json --annotations nlvr_test.json

Choices (the paper gives lr 5e-5 / 5e-6, batch 256, 15 epochs, 336 px, RandAugment, AdamW wd
0.05 and a cosine schedule; the rest is ours): lr 5e-5 for everything but the visual encoder
(5e-6); 400 warm-up steps from 0 (as the other fine-tuning configs; ~1.2 epochs of NLVR2's 86k
pairs at 256, ALBEF's NLVR warms up 1 epoch); min lr 1e-6; bias and BERT-side LayerNorm scales
without weight decay (official `create_two_optimizer`); dropout 0.1; sentences up to 40 tokens
(pre_caption keeps 30 words); the official fine-tuning augmentation (crop 0.5-1, horizontal
flip, RandAugment 2/7) on each image independently, plus the training-only image / left-right
swap (data/inputs/nlvr2.py); evaluation is deterministic (the official reader also swaps at
test time). The model has no decoder and no pretraining heads (nothing to freeze).
Learning-rate schedule: ours (`optim.schedule='cosine'`) for every variant; no official NLVR2
script was released, so there is no official schedule to reproduce.
"""
import ml_collections

from configs import common

_VARIANTS = {
    # tiny: the shapes pairs at the tiny pretraining model's 64 px; no augmentation (a crop
    # could cut away the object a statement counts).
    "tiny": dict(batch_size=32, lr=3e-4, lr2=3e-4, warmup_steps=30, total_steps=600,
                 image_size=64, max_tokens=16, train_size=8000, eval_size=512, clip_norm=0.0),
    # Paper Table 11: lr 5e-5 / 5e-6 (ViT), batch 256, 15 epochs; 336 x 336 (section 7.1).
    "base": dict(batch_size=256, lr=5e-5, lr2=5e-6, warmup_steps=400, total_steps=0,
                 image_size=336, max_tokens=40, train_size=0, eval_size=0, clip_norm=0.0),
    "large": dict(batch_size=256, lr=5e-5, lr2=5e-6, warmup_steps=400, total_steps=0,
                  image_size=336, max_tokens=40, train_size=0, eval_size=0, clip_norm=0.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """NLVR2 config; `arg` is `VARIANT[,mode=smoke]`."""
    arg, c, v, tiny = common.begin_finetune(arg, _VARIANTS, default="base", name="nlvr2",
                                            epochs=15.0)

    c.input = common.new_input(tiny)  # dataset 'synthetic' (built-in, official files) | 'json'
    c.input.train_files = []  # official json lists (ALBEF's nlvr_train/nlvr_dev/nlvr_test)
    c.input.val_files = []
    c.input.test_files = []
    c.input.image_root = ""  # the json image paths are relative to it
    c.input.synthetic_dir = ""  # cache of the written synthetic files; "" = <tmp>/mplug_jax_...
    c.input.train_size = v["train_size"]  # synthetic pairs
    c.input.eval_size = v["eval_size"]  # synthetic val and test pairs
    c.input.batch_size = v["batch_size"]  # global
    c.input.max_words = 30  # official pre_caption
    c.input.max_tokens = v["max_tokens"]
    common.finish_input(c.input, common.train_augment(tiny))

    c.optim = common.finetune_optim(v["lr"], vision_lr=v["lr2"], wd=0.05,  # paper 7.1
                                    warmup_steps=v["warmup_steps"], clip_norm=v["clip_norm"])

    # Eval split 'val' reads input.val_files, 'test' input.test_files (ALBEF's NLVR.py
    # evaluates val and test after every epoch and keeps the best val accuracy).
    common.classify_run(c, arg.mode, tiny)
    return c
