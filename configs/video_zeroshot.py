r"""mplug-jax evaluate --config=configs/video_zeroshot.py:msrvtt_qa --checkpoint=VQA_WORKDIR \
  --config.evals.msrvtt_qa.annotations=data/msrvtt_qa/txt/test.jsonl \
  --config.evals.msrvtt_qa.video_root=videos/msrvtt --out=DIR

Zero-shot transfer of mPLUG (v1) to video (paper section 5.4.2; official `retrieval_vid_mplug.py`,
`videoqa_mplug.py`, `videocap_mplug.py`): no training, only `mplug-jax evaluate` on an image
checkpoint. n frames are sampled uniformly per video, encoded by the image encoder (each with
the image positional embeddings, no temporal embedding) and their tokens concatenated into
one sequence. `get_config("BENCHMARK[,size=tiny|base|large][,task=...]")`:

- `msrvtt_retrieval`: text-to-video retrieval on MSRVTT 1k-A (BLIP's msrvtt_test.jsonl), 8
  frames at 224 px, ITM logit + similarity over the top k_test=128; checkpoint: a pretraining
  workdir / official mPLUG checkpoint (`task=pretrain`, default) or a retrieval fine-tuning
  workdir (`task=retrieval`, the paper's "finetuned on COCO" row);
  mplug-jax evaluate --config=configs/video_zeroshot.py:msrvtt_retrieval,size=large \
    --checkpoint=mplug_large.pth --config.init.config_bert=config_bert.json \
    --config.evals.msrvtt_retrieval.annotations=msrvtt_test.jsonl \
    --config.evals.msrvtt_retrieval.video_root=MSRVTT/videos/all --out=DIR
- `msrvtt_qa` / `msvd_qa`: video QA by answer generation from a VQA workdir, 16 frames,
  exact-match accuracy, result file [{question_id, answer}];
- `vatex_caption`: VATEX public test captions from a caption (or pretraining) workdir, 8
  frames, prefix prompt "a video of" through the text encoder + fusion, beam 10 / min 15 /
  max 25 (official script), submission {videoID: caption} and BLEU/METEOR/ROUGE-L/CIDEr.

The config is the checkpoint's task config (`task.name` = pretrain | retrieval | vqa | caption,
so `evaluate` builds that task and its predict fns) at the benchmark's frame resolution (the
positional embeddings are resampled on load) with one eval block. Frame resolutions (official
configs, docs/official-formats.md#video): retrieval 224; QA 480 for base (the official base config;
16 frames x 901 tokens, batch 1 there), 336 for large (the large VQA resolution: no official
large video QA config is documented); VATEX 448. `size=tiny` evaluates the tiny models on the
built-in synthetic videos (`data.synthetic_video`: moving shapes, written as frame folders and
the official annotation files); base/large read the official files (`dataset='json'`).
"""
import ml_collections

from configs import caption as caption_config
from configs import common
from configs import pretrain as pretrain_config
from configs import retrieval as retrieval_config
from configs import vqa as vqa_config

BENCHMARKS = ("msrvtt_retrieval", "msrvtt_qa", "msvd_qa", "vatex_caption")
SIZES = ("tiny", "base", "large")
# Task (and so checkpoint kind) each benchmark reads by default, and the ones it accepts.
TASKS = {"msrvtt_retrieval": ("pretrain", "retrieval"), "msrvtt_qa": ("vqa",),
         "msvd_qa": ("vqa",), "vatex_caption": ("caption",)}
# Frame resolution per benchmark and size (module docstring).
IMAGE_SIZE = {"msrvtt_retrieval": dict(tiny=64, base=224, large=224),
              "msrvtt_qa": dict(tiny=64, base=480, large=336),
              "msvd_qa": dict(tiny=64, base=480, large=336),
              "vatex_caption": dict(tiny=64, base=448, large=448)}
# Frames per video: paper section 5.4.2 (8 retrieval / 16 QA / 8 caption). The official
# retrieval script's config samples 12 (`num_frm_test`); the paper's 8 is used here.
NUM_FRAMES = {"msrvtt_retrieval": 8, "msrvtt_qa": 16, "msvd_qa": 16, "vatex_caption": 8}


def _task_config(task: str, size: str) -> ml_collections.ConfigDict:
    if task == "pretrain":
        return pretrain_config.get_config(size)
    if task == "retrieval":
        return retrieval_config.get_config({"tiny": "tiny", "base": "coco_base",
                                            "large": "coco_large"}[size] + ",mode=zeroshot")
    if task == "vqa":
        return vqa_config.get_config(size)
    return caption_config.get_config(f"{size},mode=zeroshot")


def _data(tiny: bool, num_frames: int) -> dict:
    """Data keys of an eval block (`data.video_input.eval_source`)."""
    return dict(dataset="synthetic" if tiny else "json", annotations="", video_root="",
                num_frames=4 if tiny else num_frames, limit=0, workers=4, log_every=10,
                max_skip_rate=0.01, synthetic_size=24, synthetic_frames=12,
                synthetic_image_size=64, synthetic_video="frames", synthetic_dir="")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Zero-shot video config; `arg` is `BENCHMARK[,size=tiny|base|large][,task=NAME]`."""
    arg = common.parse_arg(arg, variant="msrvtt_qa", size="base", task="")
    bench, size = arg.variant, arg.size
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown video benchmark {bench!r}; valid: {', '.join(BENCHMARKS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    task = arg.task or TASKS[bench][0]
    if task not in TASKS[bench]:
        raise ValueError(f"{bench} reads a checkpoint of task {' or '.join(TASKS[bench])}, not "
                         f"{task!r}")
    tiny = size == "tiny"
    c = _task_config(task, size)
    c.benchmark = bench
    c.model.image_size = IMAGE_SIZE[bench][size]
    c.model.dropout_rate = 0.0
    data = _data(tiny, NUM_FRAMES[bench])
    c.evals = ml_collections.ConfigDict()
    if bench == "msrvtt_retrieval":
        c.evals[bench] = dict(type="video_retrieval", **data, batch_size=8 if tiny else 32,
                              max_text_tokens=35, k_test=16 if tiny else 128,
                              sim_chunk=8 if tiny else 256, itm_batch_size=16 if tiny else 128,
                              add_similarity=True, log_every_batches=50, top_n=10)
    elif bench in ("msrvtt_qa", "msvd_qa"):
        c.evals[bench] = dict(type="video_qa", **data, batch_size=8,
                              max_question_tokens=40, beam_size=5, min_length=1, max_length=10,
                              num_examples_shown=5)
    else:
        c.task.zero_shot_prompt = "a video of"
        # Official VATEX script: --beam_size 10 --min_length 15 --max_length 25.
        c.task.generation = dict(beam_size=3 if tiny else 10, min_length=2 if tiny else 15,
                                 max_length=12 if tiny else 25, alpha=0.6)
        c.evals[bench] = dict(type="video_caption", **data, format="vatex_caption",
                              batch_size=8, metrics=("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4",
                                                     "METEOR", "ROUGE_L", "CIDEr"),
                              tokenize="ptb", num_examples_shown=5)
    return c
