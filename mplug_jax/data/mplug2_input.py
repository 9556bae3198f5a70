"""mPLUG-2 video QA input (official `dataset/video_downstream_datasets.py`), by
`config.input.dataset`:

- 'json': official MSRVTT-QA / MSVD-QA / TGIF jsonl (`sources.video_qa`): `input.annotations`
  (train) and `input.eval_annotations`, videos under `input.video_root` (frame folders or
  video files, `data.video.video_path`);
- 'synthetic': the built-in motion set (`data.synthetic_motion`), first written as real files
  (frame folders + jsonl) into `input.synthetic_dir` (a fresh temporary folder when empty)
  and then read exactly as 'json'.

Frames (official-formats.md 1.11, FORMAT.md 6.1): `num_frames` T per video; train: one random
frame per equal segment ('rand') and, when `input.augment.enabled`, `video.train_clip` (one
RandomResizedCrop / flip / RandAugment draw for all frames), else `video.eval_clip`; eval: the
segment middles and `video.eval_clip` (nearest resize, CLIP normalisation). Text: questions
`pre_question` to 30 words (train) / 50 (eval), tokenised to `input.max_question_tokens`
(official: 25, or 50 with add_ocr); the answer as "[CLS] answer [SEP]" padded to
`input.max_answer_tokens`, weight 1 (one answer per question, as the official data). A video
that cannot be used (missing, empty, undecodable) is skipped and counted as bad images are
(`pipeline` skip accounting, `input.max_skip_rate`).

Train batch (per process, B rows):
  video float32[B, T, R, R, 3]; question_ids / question_mask int32[B, Lq];
  answer_ids / answer_mask int32[B, La]; answer_weights float32[B]; idx int32[B].
Eval batch: video, question_ids, question_mask, idx (in order, no augmentation).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import grain
import numpy as np

from mplug_jax.data import pipeline, sources, text, tokenizer, video
from mplug_jax.data.transforms import BadRecord
from mplug_jax.data.vqa_input import encode_answers

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "json")
TRAIN_QUESTION_WORDS, EVAL_QUESTION_WORDS = 30, 50  # official pre_question limits


def synthetic_files(input_cfg, split: str, seed: int) -> tuple[str, str]:
    """(jsonl, frames root) of the built-in motion set's `split`, written on first use under
    `input.synthetic_dir/<split>` (kept: later runs with the same folder reuse it)."""
    from mplug_jax.data import synthetic_motion
    folder = input_cfg.get("synthetic_dir") or ""
    if not folder:
        folder = tempfile.mkdtemp(prefix="mplug2_motion_")
        input_cfg.synthetic_dir = folder  # train and eval of the run share one folder
    size = int(input_cfg.train_size if split == "train" else input_cfg.eval_size)
    sub = os.path.join(folder, f"{split}_{size}")
    ann = os.path.join(sub, "msrvtt_qa.jsonl")
    if not os.path.exists(ann):
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{split}_", dir=folder)
        synthetic_motion.write_motion_files(
            tmp, size, split=split, raw_frames=int(input_cfg.synthetic_raw_frames),
            image_size=int(input_cfg.synthetic_image_size), seed=seed)
        try:
            os.rename(tmp, sub)  # atomic: concurrent writers of one folder keep one copy
        except OSError:
            if not os.path.exists(ann):
                raise
    return ann, os.path.join(sub, "frames")


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
    return sources.video_qa(str(ann), str(root), max_skip_rate=float(input_cfg.max_skip_rate))


class _VideoQARecord:
    """(position, index) -> processed example (module docstring); picklable for grain."""

    def __init__(self, source, *, num_frames: int, image_size: int, max_question_tokens: int,
                 max_answer_tokens: int, seed: int, augment: dict | None, epoch_length: int,
                 train: bool):
        self.source, self.t, self.r, self.seed = source, num_frames, image_size, seed
        self.lq, self.la, self.augment = max_question_tokens, max_answer_tokens, augment
        self.epoch_length, self.train = epoch_length, train

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        epoch = position // max(self.epoch_length, 1)
        index = int(index)
        try:
            record = self.source[index]
            rng = np.random.default_rng([self.seed, epoch, index, 2])
            frames = video.load_frames(record["video"], self.t, train=self.train, rng=rng)
            if self.augment is not None:
                clip = video.train_clip(frames, self.r, rng, **self.augment)
            else:
                clip = video.eval_clip(frames, self.r)
            words = TRAIN_QUESTION_WORDS if self.train else EVAL_QUESTION_WORDS
            question = text.pre_question(record["question"], words)
        except BadRecord as e:
            logger.warning("skipping video QA record %d (%s): %s", index, e.reason, e)
            return {pipeline._SKIP_KEY: e.reason}
        except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
            logger.warning("skipping video QA record %d (bad_record): %r", index, e)
            return {pipeline._SKIP_KEY: "bad_record"}
        tok = tokenizer.get_tokenizer()
        q_ids, q_mask = tok.encode([question], max_length=self.lq, pad_to=self.lq)
        out = {"video": clip.astype(np.float32), "question_ids": q_ids[0],
               "question_mask": q_mask[0], "idx": np.int32(index)}
        if self.train:
            a_ids, a_mask = encode_answers([record["answer"]], 1, self.la)
            out.update(answer_ids=a_ids[0], answer_mask=a_mask[0],
                       answer_weights=np.float32(1.0))
        return out


def dataset(src, input_cfg, *, num_frames: int, image_size: int, batch_size: int,
            train: bool, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
            num_epochs: int | None = None, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of `src` (module docstring); a checkpointable iterator (grain state plus skip
    counters). `train`: answers, shuffling every epoch, per-process shards, 'rand' sampling and
    augmentation when `input.augment.enabled`."""
    n = len(src)
    per_shard = n // shard_count
    if train and per_shard < batch_size:
        raise ValueError(f"{n} video QA records over {shard_count} processes give {per_shard} "
                         f"per process, fewer than the batch of {batch_size}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    augment = None
    aug = input_cfg.get("augment")
    if train and aug is not None and aug.get("enabled"):
        augment = {k: v for k, v in aug.items() if k != "enabled"}
    ds = grain.MapDataset.range(n)
    if train:
        ds = ds.shuffle(seed=seed)[shard_index:per_shard * shard_count:shard_count]
    ds = ds.repeat(num_epochs).map_with_index(_VideoQARecord(
        src, num_frames=num_frames, image_size=image_size,
        max_question_tokens=int(input_cfg.max_question_tokens),
        max_answer_tokens=int(input_cfg.max_answer_tokens), seed=seed, augment=augment,
        epoch_length=per_shard if train else n, train=train))
    return pipeline.batched(ds, batch_size, drop_remainder=drop_remainder,
                            workers=int(input_cfg.get("workers", 0)) if train else 0,
                            max_skip_rate=float(input_cfg.max_skip_rate))


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    if inp.batch_size % process_count:
        raise ValueError(f"input.batch_size {inp.batch_size} is not divisible by the "
                         f"{process_count} processes")
    src = source(inp, "train", config.seed)
    ds = dataset(src, inp, num_frames=int(config.model.num_frames),
                 image_size=int(config.model.image_size),
                 batch_size=inp.batch_size // process_count, train=True, seed=inp.shuffle_seed,
                 shard_index=process_index, shard_count=process_count)
    return iter(ds), len(src)


def eval_batches(src, input_cfg, *, num_frames: int, image_size: int,
                 batch_size: int) -> list[dict]:
    """Every record of `src` in order, in batches of `batch_size` (the last may be shorter);
    unusable videos are left out (their `idx` is missing)."""
    return list(dataset(src, input_cfg, num_frames=num_frames, image_size=image_size,
                        batch_size=batch_size, train=False, num_epochs=1,
                        drop_remainder=False))
