r"""python -m mplug_jax.main --config=configs/snli_ve.py:tiny --workdir=/tmp/mplug_snli_ve_tiny \
  --config.init.checkpoint=/tmp/mplug_pretrain_tiny

SNLI-VE fine-tuning (paper 5.2.5 and Table 11; no official script): three-way visual entailment
(entailment / neutral / contradiction) with the encoders only: image, text premise + hypothesis
(`task.premise=True`, the default: paper 5.2.5, "the image premise, text premise and text
hypothesis are fed to the encoder"), fusion, and an MLP head on the fused text [CLS],
cross-entropy (mplug_jax/tasks/snli_ve.py). The premise is only in the original SNLI-VE jsonl
(`snli_ve_{train,dev,test}.jsonl`); ALBEF's `ve_*.json` has the hypothesis alone and needs
`--config.task.premise=False` (the input of hypothesis-only models such as ALBEF's). Evaluated
by the shared `classify` evaluator: accuracy overall and per class, and `snli_ve_result.json`
([{"id", "pred", "label"}]) under <workdir>/results/. Variants: `tiny` (the built-in synthetic
SNLI-VE, mplug_jax/data/synthetic/snli_ve.py, on a 2-core CPU, starting from the
`configs/pretrain.py:tiny` workdir), `base` (ViT-B/16) and `large` (ViT-L/14), both at 336 px
with the paper's values (lr 2e-5, batch 64, 5 epochs). base and large refuse the synthetic
data and random initialisation unless asked (`input.allow_synthetic`, `init.allow_scratch`):

  python -m mplug_jax.main --config=configs/snli_ve.py:base --workdir=DIR \
    --config.init.checkpoint=mplug_base.pth --config.init.config_bert=config_bert_stride3.json \
    --config.input.dataset=json --config.input.train_file=snli_ve_train.jsonl \
    --config.input.val_file=snli_ve_dev.jsonl --config.input.test_file=snli_ve_test.jsonl \
    --config.input.image_root=flickr30k-images/
  (hypothesis only, ALBEF's files: --config.task.premise=False
    --config.input.train_file=ve_train.json ... --config.input.max_text_tokens=40)
  python -m mplug_jax.main --config=configs/snli_ve.py:large --workdir=DIR ... (as base, with
    mplug_large_v2.pth and config_bert.json)
  python -m mplug_jax.main --config=configs/snli_ve.py:tiny,mode=smoke --workdir=DIR \
    --config.init.checkpoint=PRETRAIN_WORKDIR
  mplug-jax evaluate --config configs/snli_ve.py:base --checkpoint DIR \
    --config.input.dataset=json ... --config.evals.val.split=test
  mplug-jax score --task snli_ve --results snli_ve_result.json --annotations snli_ve_test.jsonl

Choices (the paper gives lr, batch, epochs, 336 px, RandAugment, AdamW wd 0.05 and a cosine
schedule; the rest is ours): one learning rate for every parameter (Table 11 lists a single
value for SNLI-VE); 400 warm-up steps from 0 (as the VQA configs); bias and BERT-side LayerNorm
scales without weight decay (official `create_two_optimizer`); text `[CLS] premise [SEP]
hypothesis` (the paper does not say how the two are joined: the BERT sentence-pair layout) up
to 80 tokens, the longer part cut first (pre_caption keeps 30 words of each); hypothesis only:
40 tokens is enough; ALBEF's VE augmentation (crop 0.5-1, flip, RandAugment 2/7).
Learning-rate schedule: ours (`optim.schedule='cosine'`) for every variant; no official SNLI-VE
script was released, so there is no official schedule to reproduce.
"""
import ml_collections

from configs import common

_VARIANTS = {
    # tiny: the shapes scenes at the tiny pretraining model's 64 px; no augmentation (a crop
    # could cut away the object or the cover a label depends on).
    "tiny": dict(batch_size=32, lr=3e-4, warmup_steps=30, total_steps=400, image_size=64,
                 max_text_tokens=20, train_size=8000, eval_size=512, clip_norm=0.0),
    # Paper Table 11: lr 2e-5, batch 64, 5 epochs; 336 x 336 images (section 7.1).
    "base": dict(batch_size=64, lr=2e-5, warmup_steps=400, total_steps=0, image_size=336,
                 max_text_tokens=80, train_size=0, eval_size=0, clip_norm=0.0),
    "large": dict(batch_size=64, lr=2e-5, warmup_steps=400, total_steps=0, image_size=336,
                  max_text_tokens=80, train_size=0, eval_size=0, clip_norm=0.0),
}
# Parameters MPLUG's setup creates though no encoder stage reads them.
UNUSED = r"^(mlm_bias|temp)(/|$)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """SNLI-VE config; `arg` is `VARIANT[,mode=smoke]`."""
    arg, c, v, tiny = common.begin_finetune(arg, _VARIANTS, default="base", name="snli_ve",
                                            epochs=5.0)
    # True: `[CLS] premise [SEP] hypothesis` (paper 5.2.5; needs the original jsonl); False:
    # `[CLS] hypothesis` (ALBEF's json works too).
    c.task.premise = True

    c.input = common.new_input(tiny)  # dataset 'synthetic' (built-in, official files) | 'json'
    # Official single files: snli_ve_{train,dev,test}.jsonl (original release, with premises)
    # or, with task.premise=False, ALBEF's ve_{train,dev,test}.json.
    c.input.train_file = ""
    c.input.val_file = ""
    c.input.test_file = ""
    c.input.image_root = ""  # Flickr30k images, <id>.jpg
    c.input.synthetic_dir = ""  # cache of the written synthetic files; "" = <tmp>/mplug_jax_...
    c.input.train_size = v["train_size"]  # synthetic records
    c.input.eval_size = v["eval_size"]  # synthetic val and test records
    c.input.batch_size = v["batch_size"]  # global
    c.input.max_words = 30  # official pre_caption
    c.input.max_text_tokens = v["max_text_tokens"]
    common.finish_input(c.input, common.train_augment(tiny))

    c.optim = common.finetune_optim(v["lr"], wd=0.05,  # paper 7.1
                                    warmup_steps=v["warmup_steps"], clip_norm=v["clip_norm"],
                                    frozen=UNUSED)

    # Eval split 'val' reads input.val_file, 'test' input.test_file (ALBEF's VE.py evaluates
    # val and test after every epoch and keeps the best val accuracy).
    common.classify_run(c, arg.mode, tiny)
    return c
