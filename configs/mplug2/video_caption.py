r"""python -m mplug_jax.main --config=configs/mplug2/video_caption.py:tiny --workdir=/tmp/m2cap_tiny

mPLUG-2 video captioning fine-tuning (paper section 4.2.2, MSRVTT / MSVD captioning; release
`video_caption_mplug2.py`, `configs_video/VideoCaption_msrvtt_large.yaml`): the shared decoder
reads the video's image_embeds (after the universal layers) and is trained with the release's
token-mean caption loss on "a video of" + caption (`task.prompt_join`: 'release' glues the two
without a space, as the release and the paper's numbers; 'space' is the corrected form);
evaluation = the official beam search (5 / min 4 / max 20) from [CLS], the prompt split off the
output, BLEU-1..4 / METEOR / ROUGE-L / CIDEr (`scoring.caption`, METEOR and the PTB tokenizer
need java). Variants:

  tiny   `mplug2_tiny` at 32 px (8 px patches), 4 frames, from scratch on the built-in moving
         shape captions (`data.synthetic_video`: "a red circle moving left on a black
         background", 5 per video), eval on 32 held-out videos
  base   `mplug2_base` (the paper's base model; no official checkpoint), the large recipe
  large  the release: `mplug2_large`, 224 px, 16 frames, batch 4 per GPU x 8 GPUs x 2
         accumulated = 64 per update (here: global batch 64 in 2 micro-batches), lr 2e-5
         (vision 2e-6), wd 0.02, per-step cosine with 200 warm-up steps to min lr 1e-6,
         10 epochs, dropout 0.1, captions pre_caption(80) tokenised to 20, train augmentation
         RandomResizedCrop(0.5-1) + flip + RandAugment(2, 5) shared by all frames

  python -m mplug_jax.main --config=configs/mplug2/video_caption.py:large --workdir=DIR \
    --config.init.checkpoint=MPLUG2_CONVERTED_DIR --config.input.dataset=json \
    --config.input.annotations=msrvtt_caption/train.jsonl --config.input.video_root=msrvtt/videos \
    --config.evals.val.annotations=msrvtt_caption/test.jsonl \
    --config.evals.val.video_root=msrvtt/videos
  mplug-jax evaluate --config=configs/mplug2/video_caption.py:large --checkpoint=DIR \
    --config.evals.val.annotations=msrvtt_caption/test.jsonl \
    --config.evals.val.video_root=msrvtt/videos --out=DIR/eval
  python -m mplug_jax.main --config=configs/mplug2/video_caption.py:large_paper,mode=scst \
    --workdir=DIR2 --config.init.checkpoint=DIR --config.input.dataset=json \
    --config.input.annotations=msrvtt_caption/train.jsonl --config.input.video_root=msrvtt/videos \
    --config.evals.val.annotations=msrvtt_caption/test.jsonl \
    --config.evals.val.video_root=msrvtt/videos
  python -m mplug_jax.main --config=configs/mplug2/video_caption.py:tiny,mode=smoke --workdir=DIR
  python -m mplug_jax.main --config=configs/mplug2/video_caption.py:tiny --workdir=DIR \
    --config.task.prompt_join=space --config.task.prompt_loss=all     (the corrected form)

MSVD: the same with the MSVD jsonl (`.avi` videos are found by `data.video.video_path`).
Annotation format (docs/official-formats.md#video): train jsonl {"video_id", "caption"} one line per
caption; test jsonl {"video_id", "golden_captions": [...]}. Result files of the `val` eval
(`<workdir>/results/val_step<N>/`): `video_caption_result.json` (the release's
[{"video_id", "pred_caption", "gold_caption"}]) and `caption_results.json` (ours, scored by
`mplug-jax score --task caption`).

Deviations (documented): the warm-up ramps from 0 (official: from warmup_lr 1e-6); no apex AMP
(base / large compute in bfloat16 with float32 params). Learning-rate schedule: ours
(`optim.schedule='cosine'`) for every variant; the mPLUG-2 release uses a per-iteration cosine
(`cosine_step`), not mPLUG's stair-and-epoch schedule ('epoch_cosine').

Release vs paper (docs/recipes.md, value by value): `large` is the release
(configs_video/VideoCaption_msrvtt_large.yaml + scripts/run_videocaption.sh) and `base` its
recipe on the base model; `base_paper` / `large_paper` take the values the mPLUG-2 paper states
where they differ (appendix B.2.3, for both model sizes): global batch 128 (accumulation kept:
2 micro-batches of 64), the prompt "What does the video describe?" (written lower-case: the
tokenizer is uncased, and the release's `.split(prompt)` of the decoded, lower-case output
would not find the capitalised form) and max generation length 25. With `mode=full` (the
default) they are the paper's cross-entropy stage.

SCST (`mode=scst`, mplug_jax/scst.py): the paper then optimises CIDEr for 5 more epochs at lr
1e-6 with batch 16 (appendix B.2.3). The release has no SCST for mPLUG-2 (its caption model's
SCST path calls a function that does not exist: docs/fixtures.md#mplug-2-release-quirks, 15),
so `mode=scst` exists for the paper presets only (`base_paper`, `large_paper`; `base` / `large` refuse it) and for
`tiny` (ours: 200 updates of 16 at 5e-5, the options below as ours). From the paper: 5 epochs,
lr 1e-6 (every group: it states one), global batch 16 (no accumulation), the prompt and max
length 25 of its CE stage (the search uses `task.generation`: beam 5, min 4 as the release's
caption generation). Where the paper is silent, the mPLUG release's SCST
(`configs/caption.py:large,mode=scst`, `task.scst`): the K = 5 beam hypotheses per video,
baseline = their mean reward, CIDEr-D rewards on PTB tokens with the batch's document
frequencies, loss / (generated tokens + 1), the search with dropout. Ours: the lr is constant
(the mPLUG-2 release's schedule at lr = warmup_lr = min_lr, so no warm-up and no decay; the
mPLUG release's SCST stairs from 1e-5 are mPLUG's schedule, not taken); the run starts from
the cross-entropy workdir's best checkpoint (`init.checkpoint=` that workdir,
`init.select='best'`: val CIDEr, as the release's checkpoint_best.pth; `latest` for a
converted or official checkpoint), evaluates after every epoch as that stage does and keeps
the best val CIDEr. Without `init.checkpoint` it refuses to start (`init.allow_scratch`
overrides).
"""
import shutil

import ml_collections

from configs import common
from configs.mplug2 import models
from configs.mplug2.models import RELEASE_VIDEO, TINY, variant_model

# base and large: the release's MSRVTT caption settings.
_MSRVTT = dict(RELEASE_VIDEO, batch_size=64, max_caption_tokens=20, accum=2)
_VARIANTS = {
    # tiny SCST (ours): 200 updates of 16 at a constant 5e-5.
    "tiny": dict(TINY, total_steps=400, max_caption_tokens=20, accum=1, scst_batch_size=16,
                 scst_lr=5e-5, scst_steps=200),
    "base": dict(_MSRVTT, model="mplug2_base"),
    "large": dict(_MSRVTT, model="mplug2_large"),
}
# mPLUG-2 paper appendix B.2.3 (base and large): cross-entropy stage batch 128, prompt, max
# generation length 25; then SCST ("CIDEr optimization") for 5 epochs at lr 1e-6, batch 16.
_PAPER = dict(batch_size=128, prompt="what does the video describe?", max_length=25,
              scst_batch_size=16, scst_lr=1e-6, scst_epochs=5.0)
PAPER = {"base": _PAPER, "large": _PAPER}
_VARIANTS = common.with_paper(_VARIANTS, PAPER)
MODES = ("full", "smoke", "scst")
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """mPLUG-2 video caption config; `arg` is `VARIANT[,mode=full|smoke|scst]` (tiny, base, large,
    base_paper, large_paper; scst: tiny and the paper presets only)."""
    arg, c, v, tiny = common.begin_finetune(
        arg, _VARIANTS, default="large", name="mplug2.video_caption", epochs="total_epochs",
        model=variant_model, modes=MODES)
    scst = arg.mode == "scst"
    if scst and "scst_lr" not in v:
        raise ValueError(f"{arg.variant},mode=scst: the mPLUG-2 release has no SCST; the "
                         "paper's SCST stage is base_paper,mode=scst or large_paper,mode=scst "
                         "(tiny,mode=scst: ours, at tiny dims)")
    if scst:
        c.total_steps = v.get("scst_steps", 0)
        c.total_epochs = 0.0 if c.total_steps else v["scst_epochs"]
    c.task.prompt = v.get("prompt", "a video of")  # official config `prompt`
    # 'release': prompt + caption glued without a space (the release, the paper's numbers and
    # the released checkpoint); 'space': the corrected join. Generation is the same for both.
    c.task.prompt_join = "release"
    # 'release': the first len(tokenizer(prompt)) - 1 = 3 positions carry no loss ('of' does);
    # 'all': every prompt token is a target, so the decoder learns to start with the prompt
    # (the search starts at [CLS] alone and the prompt is split off afterwards).
    c.task.prompt_loss = "release"
    # Official argparse defaults of video_caption_mplug2.py; alpha is hard-coded there.
    c.task.generation = dict(beam_size=5, min_length=4, max_length=v.get("max_length", 20),
                             alpha=0.6)
    # The paper states no SCST details: the mPLUG release's (its K = 5 beam hypotheses of the
    # search above, mean-reward baseline, loss / (n + 1), search with dropout, PTB-tokenised
    # CIDEr-D rewards with the batch's document frequencies); tiny: ours.
    c.task.scst = common.scst_block(scst, tiny)

    # dataset: 'synthetic' (built-in moving shapes) | 'json' (official)
    c.input = common.new_input(tiny)
    c.input.annotations = ""  # official train jsonl (video_id, caption)
    c.input.eval_annotations = ""
    c.input.video_root = ""  # frame folders <root>/<video_id>/ or <root>/<video_id>.mp4
    c.input.synthetic_dir = ""  # where the synthetic set is written ('' = a temporary folder)
    c.input.synthetic_raw_frames = 8
    c.input.synthetic_image_size = 32
    c.input.train_size = 600  # synthetic videos (refs_per_video captions each)
    c.input.eval_size = 32
    c.input.refs_per_video = 5
    c.input.batch_size = v["scst_batch_size"] if scst else v["batch_size"]  # global
    c.input.max_caption_tokens = v["max_caption_tokens"]  # official max_length 20
    # tiny: no augmentation (a flip would contradict "moving left / right").
    common.finish_input(c.input, common.train_augment(tiny, randaug=(2, 5),
                                                      backend=models.VIDEO_AUGMENT_BACKEND))

    # SCST: one lr for every group (the paper states one; the mPLUG release's SCST too), held
    # constant (no warm-up, end_lr = lr): the release's schedule at lr = warmup_lr = min_lr.
    lr, lr2 = (v["scst_lr"], v["scst_lr"]) if scst else (v["lr"], v["lr2"])
    c.optim = common.finetune_optim(lr, vision_lr=lr2, wd=0.02,
                                    warmup_steps=0 if scst else v["warmup_steps"], frozen="",
                                    end_lr=lr if scst else (1e-5 if tiny else 1e-6),
                                    accum_steps=1 if scst else v["accum"])

    common.finetune_run(c, tiny, allow_scratch=tiny and not scst,
                        ckpt_every_steps=200 if tiny else 2000)
    if scst:  # from the cross-entropy run's best/ (val CIDEr, the release's checkpoint_best)
        c.init.select = "best"

    # METEOR and the PTB tokenizer need java; tiny falls back to the rest without it.
    java = shutil.which("java") is not None
    # Cadence (release video_caption_mplug2.py main): val before training and after every
    # epoch (caption_result_epoch<E>.json), checkpoint_best.pth when CIDEr is >= the best so
    # far (the value before training included; here the first evaluation after step 0 is
    # always kept); tiny: once, after training.
    c.eval_at_start = not tiny
    c.evals.val = dict(
        type="video_caption", format="video_caption", every_steps=0,
        every_epochs=0.0 if tiny else 1.0,
        dataset="synthetic" if tiny else "json", annotations="", video_root="",
        num_frames=v["num_frames"], batch_size=16 if tiny else 8, limit=0,
        workers=1 if tiny else 4, log_every=0 if tiny else 50, num_examples_shown=5,
        max_skip_rate=0.01, resize="nearest",  # docs/fixtures.md#mplug-2-frames (release's resize)
        prompt_strip="split", prompt=c.task.prompt,  # the release's `.split(prompt)[-1]`
        metrics=METRICS if java or not tiny else tuple(m for m in METRICS if m != "METEOR"),
        tokenize="ptb" if java or not tiny else "simple",
        synthetic_size=32, synthetic_frames=8, synthetic_image_size=32, synthetic_video="frames")
    c.best = dict(eval="val", metric="CIDEr", mode="max")

    if arg.mode == "smoke":
        common.smoke_run(c, batch_size=8)
        c.optim.accum_steps = 1  # 8 clips do not split into 8 devices x 2 micro-batches
        c.input.train_size = 16
        c.evals.val.synthetic_size = 8
        c.evals.val.batch_size = 8
        c.task.generation.max_length = 8 if tiny else c.task.generation.max_length
    return c
