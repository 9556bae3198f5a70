"""mPLUG-2 video QA input (official `dataset/video_downstream_datasets.py`), by
`config.input.dataset`:

- 'json': official MSRVTT-QA / MSVD-QA / TGIF jsonl (`formats.video_qa.read`): `input.annotations`
  (train) and `input.eval_annotations`, videos under `input.video_root` (frame folders or
  video files, `data.video.video_path`);
- 'synthetic': the built-in motion set (`data.synthetic_motion`), first written as real files
  (frame folders + jsonl) into `input.synthetic_dir` (a fresh temporary folder when empty)
  and then read exactly as 'json'.

Frames (docs/official-formats.md#video, docs/fixtures.md#mplug-2-frames): `num_frames` T per video;
train: one random frame per equal segment ('rand') and, when `input.augment.enabled`,
`video.train_clip` (one RandomResizedCrop / flip / RandAugment draw for all frames), else
`video.eval_clip`; eval: the segment middles and `video.eval_clip` (nearest resize, CLIP
normalisation). Text: questions `pre_question` to 30 words (train) / 50 (eval), tokenised to
`input.max_question_tokens` (official: 25, or 50 with add_ocr); the answer as "[CLS] answer [SEP]"
padded to `input.max_answer_tokens`, weight 1 (one answer per question, as the official data). A
video that cannot be used (missing, empty, undecodable) is skipped and counted as bad images are
(`pipeline` skip accounting, `input.max_skip_rate`).

Train batch (per process, B rows):
  video float32[B, T, R, R, 3]; question_ids / question_mask int32[B, Lq];
  answer_ids / answer_mask int32[B, La]; answer_weights float32[B]; idx int32[B].
Eval batch: video, question_ids, question_mask, idx (in order, no augmentation).

Video captioning (`caption_*` functions, same frames and skipping): the official caption jsonl
(train {video_id, caption}, one record per caption; test {video_id, golden_captions}) or the
built-in moving-shape captions (`data.synthetic_video`, 'synthetic'); training targets =
`pre_caption(caption, 80)` joined to `task.prompt` as `task.prompt_join` says (`caption_text`),
"[SEP]" appended, `[CLS] ...` truncated and padded to `input.max_caption_tokens`.
Caption train batch: video float32[B, T, R, R, 3]; caption_ids / caption_mask int32[B, Lc];
idx int32[B]; with `task.scst.enabled` the zero SCST fields (`mplug_jax.scst`).
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Any, Iterator

import grain
import numpy as np

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import video_caption as video_caption_format
from mplug_jax.data.inputs import caption as caption_input
from mplug_jax.data.formats import video_qa as video_qa_format
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import video
from mplug_jax.data.inputs.vqa import encode_answers

DATASETS = ("synthetic", "json")
TRAIN_QUESTION_WORDS, EVAL_QUESTION_WORDS = 30, 50  # official pre_question limits


def synthetic_folder(input_cfg, name: str, marker: str, write, *, prefix: str,
                     tmp_prefix: str) -> str:
    """`input.synthetic_dir/<name>`, written on first use (kept: later runs with the same
    folder reuse it) by `write(tmp)` into a temporary folder then renamed into place; done when
    it holds the file `marker`. An empty `input.synthetic_dir` becomes a fresh temporary folder
    (`prefix`), set in `input_cfg` so that train and eval of the run share it."""
    folder = input_cfg.get("synthetic_dir") or ""
    if not folder:
        folder = tempfile.mkdtemp(prefix=prefix)
        input_cfg.synthetic_dir = folder
    sub = os.path.join(folder, name)
    if not os.path.exists(os.path.join(sub, marker)):
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=folder)
        write(tmp)
        try:
            os.rename(tmp, sub)  # atomic: concurrent writers of one folder keep one copy
        except OSError:
            if not os.path.exists(os.path.join(sub, marker)):
                raise
    return sub


def synthetic_files(input_cfg, split: str, seed: int) -> tuple[str, str]:
    """(jsonl, frames root) of the built-in motion set's `split`, written on first use under
    `input.synthetic_dir` (`synthetic_folder`)."""
    from mplug_jax.data.synthetic import motion as synthetic_motion
    size = int(input_cfg.train_size if split == "train" else input_cfg.eval_size)
    variant = str(input_cfg.get("synthetic_variant", "standard"))
    raw = int(input_cfg.synthetic_raw_frames)

    def write(tmp):
        synthetic_motion.write_motion_files(
            tmp, size, split=split, raw_frames=raw,
            image_size=int(input_cfg.synthetic_image_size), seed=seed, variant=variant)

    # The variant and frame count in the name: a reused synthetic_dir never serves other data.
    sub = synthetic_folder(input_cfg, f"{split}_{size}_{variant}_{raw}", "msrvtt_qa.jsonl",
                           write, prefix="mplug2_motion_", tmp_prefix=f"{split}_")
    return os.path.join(sub, "msrvtt_qa.jsonl"), os.path.join(sub, "frames")


def source(input_cfg, split: str, seed: int = 0):
    """Random-access video QA records of `input.dataset` for `split` ('train' or 'heldout')."""
    kind = input_cfg.dataset
    if kind == "synthetic":
        ann, root = synthetic_files(input_cfg, split, seed)
    elif kind == "json":
        key = "annotations" if split == "train" else "eval_annotations"
        ann, root = input_cfg.get(key), input_cfg.get("video_root")
        if not ann or not root:
            raise ValueError(f"input.dataset='json' needs input.{key} (an official video QA "
                             "jsonl: video_id, question, answer) and input.video_root")
    else:
        raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")
    return video_qa_format.read(str(ann), str(root),
                                max_skip_rate=float(input_cfg.max_skip_rate))


def read_clip(path, num_frames: int, image_size: int, *, train: bool,
              rng: np.random.Generator, augment: dict | None) -> np.ndarray:
    """One video (frame folder or file) -> clip float[T, R, R, 3]: `num_frames` T frames
    (`video.load_frames`: 'rand' when `train`, else the segment middles), then
    `video.train_clip(**augment)` (one draw of `rng` for all frames) or, when `augment` is None,
    `video.eval_clip`. Raises BadRecord / OSError / ValueError ... for an unusable video."""
    frames = video.load_frames(path, num_frames, train=train, rng=rng)
    if augment is not None:
        return video.train_clip(frames, image_size, rng, **augment)
    return video.eval_clip(frames, image_size)


def clip_options(input_cfg, *, num_frames: int, image_size: int, train: bool,
                 frames_key: str = "num_frames") -> dict:
    """The clip options of every mPLUG-2 `to_example` (`read_clip`): frames, size, `train`
    and the augmentation of `input.augment` (training only; `video.train_clip` keys).
    `frames_key` names the frame count in errors."""
    if num_frames < 1:
        raise ValueError(f"{frames_key} must be >= 1, got {num_frames}")
    return dict(num_frames=num_frames, image_size=image_size, train=train,
                augment=pipeline.augment_options(input_cfg.get("augment")) if train else None)


def to_example(record: dict, rng: pipeline.RecordRng, *, num_frames: int, image_size: int,
               augment: dict | None, train: bool, max_question_tokens: int,
               max_answer_tokens: int) -> dict[str, Any]:
    """One video QA record -> example (module docstring; the answer only when `train`); the
    frames and augmentation drawn from stream 2 of `rng`. Raises BadRecord."""
    clip = read_clip(record["video"], num_frames, image_size, train=train, rng=rng.stream(2),
                     augment=augment)
    words = TRAIN_QUESTION_WORDS if train else EVAL_QUESTION_WORDS
    question = text.pre_question(record["question"], words)
    lq = max_question_tokens
    q_ids, q_mask = tokenizer.get_tokenizer().encode([question], max_length=lq, pad_to=lq)
    out = {"video": clip.astype(np.float32), "question_ids": q_ids[0],
           "question_mask": q_mask[0]}
    if train:
        a_ids, a_mask = encode_answers([record["answer"]], 1, max_answer_tokens)
        out.update(answer_ids=a_ids[0], answer_mask=a_mask[0], answer_weights=np.float32(1.0))
    return out


def example_fn(input_cfg, *, num_frames: int, image_size: int, train: bool):
    """Video QA `to_example` with the options of `input_cfg` bound (picklable)."""
    return functools.partial(
        to_example, max_question_tokens=int(input_cfg.max_question_tokens),
        max_answer_tokens=int(input_cfg.max_answer_tokens),
        **clip_options(input_cfg, num_frames=num_frames, image_size=image_size, train=train))


def dataset(src, input_cfg, *, num_frames: int, image_size: int, batch_size: int,
            train: bool, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
            num_epochs: int | None = None, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of `src` (module docstring) by `pipeline.dataset`: a checkpointable iterator
    (grain state plus skip counters). `train`: answers, shuffling every epoch, per-process
    shards, 'rand' sampling and augmentation when `input.augment.enabled`."""
    return pipeline.dataset(
        src, example_fn(input_cfg, num_frames=num_frames, image_size=image_size, train=train),
        batch_size=batch_size, seed=seed, shuffle=train, shard_index=shard_index,
        shard_count=shard_count, num_epochs=num_epochs, drop_remainder=drop_remainder,
        workers=int(input_cfg.get("workers", 0)) if train else 0,
        max_skip_rate=float(input_cfg.max_skip_rate), what="video QA")


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    fn = example_fn(inp, num_frames=int(config.model.num_frames),
                    image_size=int(config.model.image_size), train=True)
    return pipeline.train_batches(inp, source(inp, "train", config.seed), fn, process_index,
                                  process_count, what="video QA")


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Every record of `src` in order (`eval_loader.batches`), `config.model.num_frames`
    frames at `config.model.image_size`, in batches of `batch_size` (the last may be shorter);
    unusable videos are left out (their `idx` is missing)."""
    fn = example_fn(config.input, num_frames=int(config.model.num_frames),
                    image_size=int(config.model.image_size), train=False)
    return eval_loader.batches(src, fn, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, bad="skip", pad=None,
                               what="video QA")


# ---- video captioning (official `video_caption_mplug2.py` / `video_downstream_datasets.py`) ----

CAPTION_WORDS = 80  # official pre_caption(caption, 80) of training captions
PROMPT_JOINS = ("release", "space")


def caption_text(caption: str, prompt: str, join: str = "release") -> str:
    """Decoder target text of one training caption: `pre_caption(caption, 80)` joined to the
    prompt and "[SEP]" appended. join='release': `prompt + caption` with NO space, as the release
    (docs/fixtures.md#mplug-2-text: "a video of" + "an astronaut" -> "a video ofan astronaut" ->
    `of ##an`); 'space': `prompt + " " + caption` (the corrected form). Empty prompt: the caption
    alone."""
    if join not in PROMPT_JOINS:
        raise ValueError(f"prompt_join must be one of {PROMPT_JOINS}, got {join!r}")
    cap = text.pre_caption(caption, CAPTION_WORDS)
    sep = " " if join == "space" and prompt else ""
    return prompt + sep + cap + tokenizer.EOS


def prompt_length(prompt: str) -> int:
    """Leading decoder positions without a loss, as the release computes it:
    `len(tokenizer(prompt).input_ids) - 1` = [CLS] + prompt wordpieces - 1 (the repo tokenizer
    adds no [SEP]), so the LAST prompt word stays a target (quirk 6: "a video of" -> 3: [CLS],
    'a', 'video' masked, 'of' trained). 0 for an empty prompt."""
    if not prompt:
        return 0
    ids, _ = tokenizer.get_tokenizer().encode([prompt])
    return int(ids.shape[1]) - 1


def encode_captions(captions: list[str], prompt: str, join: str, max_tokens: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Training captions -> decoder ids / mask int32[N, max_tokens]: `caption_text`, tokenised
    as `[CLS] ...`, truncated to `max_tokens` ids (official max_length 20: a long caption loses
    its end, [SEP] included) and right-padded with 0."""
    if max_tokens <= prompt_length(prompt) + 1:
        raise ValueError(f"input.max_caption_tokens={max_tokens} leaves no caption token after "
                         f"the prompt {prompt!r} ({prompt_length(prompt) + 1} ids)")
    return tokenizer.get_tokenizer().encode([caption_text(c, prompt, join) for c in captions],
                                            max_length=max_tokens, pad_to=max_tokens)


def caption_synthetic_files(input_cfg, split: str, seed: int) -> dict:
    """`data.synthetic_video.write_video_files` paths of the built-in moving-shape captions
    ('train' or 'heldout'), written on first use under `input.synthetic_dir/caption_<split>_<n>`
    (frame folders; `input.refs_per_video` captions per video)."""
    from mplug_jax.data.synthetic import video as synthetic_video
    size = int(input_cfg.train_size if split == "train" else input_cfg.eval_size)
    kw = dict(split=split, num_frames=int(input_cfg.synthetic_raw_frames),
              image_size=int(input_cfg.synthetic_image_size), seed=seed, mp4=False,
              refs_per_video=int(input_cfg.get("refs_per_video", 5)))
    sub = synthetic_folder(input_cfg, f"caption_{split}_{size}", "video_caption_train.jsonl",
                           lambda tmp: synthetic_video.write_video_files(tmp, size, **kw),
                           prefix="mplug2_captions_", tmp_prefix=f"caption_{split}_")
    return {"train": os.path.join(sub, "video_caption_train.jsonl"),
            "test": os.path.join(sub, "video_caption.jsonl"),
            "frames_root": os.path.join(sub, "frames")}


def caption_source(input_cfg, split: str, seed: int = 0):
    """Video caption records of `input.dataset` for `split`: 'train' -> {video, video_id,
    caption} (one per caption), 'heldout' -> {video, video_id, gold_captions}."""
    kind, train = input_cfg.dataset, split == "train"
    if kind == "synthetic":
        paths = caption_synthetic_files(input_cfg, split, seed)
        ann, root = paths["train" if train else "test"], paths["frames_root"]
    elif kind == "json":
        key = "annotations" if train else "eval_annotations"
        ann, root = input_cfg.get(key), input_cfg.get("video_root")
        if not ann or not root:
            raise ValueError(f"input.dataset='json' needs input.{key} (an official mPLUG-2 "
                             "video caption jsonl: train {video_id, caption}, test {video_id, "
                             "golden_captions}) and input.video_root")
    else:
        raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")
    return video_caption_format.read(str(ann), str(root), train=train,
                                     max_skip_rate=float(input_cfg.max_skip_rate))


def caption_example(record: dict, rng: pipeline.RecordRng, *, num_frames: int,
                    image_size: int, augment: dict | None, train: bool, max_tokens: int,
                    prompt: str, join: str, placeholders: dict | None = None
                    ) -> dict[str, Any]:
    """One video caption record -> {video, caption_ids, caption_mask} (eval records: their
    first golden caption) and the zero SCST `placeholders` (`caption.scst_placeholders`);
    frames drawn from stream 3 of `rng`. Raises BadRecord."""
    clip = read_clip(record["video"], num_frames, image_size, train=train, rng=rng.stream(3),
                     augment=augment)
    caption = record["caption"] if train else record["gold_captions"][0]
    ids, mask = encode_captions([caption], prompt, join, max_tokens)
    return {"video": clip.astype(np.float32), "caption_ids": ids[0], "caption_mask": mask[0],
            **caption_input.placeholder_zeros(placeholders or {})}


def caption_example_fn(input_cfg, *, num_frames: int, image_size: int, prompt: str, join: str,
                       train: bool, placeholders: dict | None = None):
    """`caption_example` with the options of `input_cfg` bound (picklable); config errors
    raise here, before any worker starts."""
    max_tokens = int(input_cfg.max_caption_tokens)
    encode_captions(["x"], prompt, join, max_tokens)
    return functools.partial(caption_example, max_tokens=max_tokens, prompt=prompt, join=join,
                             placeholders=placeholders,
                             **clip_options(input_cfg, num_frames=num_frames,
                                            image_size=image_size, train=train))


def caption_dataset(src, input_cfg, *, num_frames: int, image_size: int, batch_size: int,
                    prompt: str, join: str, train: bool, seed: int = 0, shard_index: int = 0,
                    shard_count: int = 1, num_epochs: int | None = None,
                    drop_remainder: bool = True) -> grain.IterDataset:
    """Caption batches of `src` by `pipeline.dataset` (train: shuffled, sharded, 'rand'
    frames, augmentation when `input.augment.enabled`):
      video float32[B, T, R, R, 3]; caption_ids / caption_mask int32[B, input.max_caption_tokens]
      (`encode_captions`); idx int32[B]."""
    fn = caption_example_fn(input_cfg, num_frames=num_frames, image_size=image_size,
                            prompt=prompt, join=join, train=train)
    return pipeline.dataset(src, fn, batch_size=batch_size, seed=seed, shuffle=train,
                            shard_index=shard_index, shard_count=shard_count,
                            num_epochs=num_epochs, drop_remainder=drop_remainder,
                            workers=int(input_cfg.get("workers", 0)) if train else 0,
                            max_skip_rate=float(input_cfg.max_skip_rate), what="video caption")


def caption_train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's caption train batches, records per epoch);
    prompt and join from `config.task`, the SCST fields of `task.scst` (zeros)."""
    inp = config.input
    fn = caption_example_fn(inp, num_frames=int(config.model.num_frames),
                            image_size=int(config.model.image_size),
                            prompt=str(config.task.prompt), join=str(config.task.prompt_join),
                            train=True, placeholders=caption_input.scst_placeholders(config))
    return pipeline.train_batches(inp, caption_source(inp, "train", config.seed), fn,
                                  process_index, process_count, what="video caption")
