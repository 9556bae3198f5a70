"""MSRVTT-QA / MSVD-QA / TGIF-QA jsonl (as mPLUG-2 reads them): video_id, question, answer.

Records: video (frame folder or file, see :func:`video.video_path`), video_id, question,
answer, question_id (the line index).
"""
from __future__ import annotations

import functools
import os

from mplug_jax.data.formats import base
from mplug_jax.data.ops import video

DESCRIPTION = "MSRVTT-QA / MSVD-QA / TGIF-QA: sampled frames, question, answer, question_id."
FEATURES = {"frames": "frames", "frame_indices": "frame_indices", "video_id": "text",
            "question": "text", "answer": "text", "question_id": "int"}


def read(annotation: str, video_root: str, *, max_skip_rate: float = 0.01) -> base.RecordSource:
    """MSRVTT/MSVD/TGIF QA jsonl: video_id, question, answer; question_id = line index."""
    def parse(raw, pos):
        video_id = base.str_field(raw, "video_id")
        return [{"video": video.video_path(video_root, video_id), "video_id": video_id,
                 "question": base.str_field(raw, "question"),
                 "answer": base.str_field(raw, "answer"), "question_id": pos}]

    return base.build(base.items([os.fspath(annotation)]), parse, f"video_qa[{annotation}]",
                      max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Sampled encoded frames and their indices, video_id, question, answer, question_id."""
    return {**builder.frames(record["video"]), "video_id": record["video_id"],
            "question": record["question"], "answer": record["answer"],
            "question_id": record["question_id"]}


def prepare_reader(split: base.Split):
    """One jsonl per split; videos under `split.image_root` (--video-root)."""
    return functools.partial(read, split.one_file("video_qa"), split.image_root,
                             max_skip_rate=split.max_skip_rate)
