"""mPLUG-2 video caption jsonl: train {video_id, caption}, test {video_id, golden_captions}.

Records: video (frame folder or file, see :func:`video.video_path`), video_id; train: caption;
eval: gold_captions.
"""
from __future__ import annotations

import functools
import os

from mplug_jax.data.formats import base
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import BadRecord

DESCRIPTION = "mPLUG-2 video captions: train one record per caption, eval the golden captions."
FEATURES = {"frames": "frames", "frame_indices": "frame_indices", "video_id": "text",
            "captions": "texts"}


def read(annotation: str, video_root: str, *, train: bool = True,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """mPLUG-2 video caption jsonl: train {video_id, caption}; test {video_id, golden_captions}."""
    def parse(raw, pos):
        video_id = base.str_field(raw, "video_id")
        rec = {"video": video.video_path(video_root, video_id), "video_id": video_id}
        if train:
            rec["caption"] = base.str_field(raw, "caption")
        else:
            golds = raw.get("golden_captions")
            if not isinstance(golds, list) or not golds:
                raise BadRecord("bad_caption", "golden_captions missing")
            rec["gold_captions"] = [g for g in golds if isinstance(g, str)]
        return [rec]

    return base.build(base.items([os.fspath(annotation)]), parse,
                      f"video_caption[{annotation}]", max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Sampled encoded frames and their indices, video_id, the caption or golden captions."""
    caps = record["gold_captions"] if "gold_captions" in record else [record["caption"]]
    if not caps:
        raise BadRecord("bad_caption", "no golden caption is a string")
    return {**builder.frames(record["video"]), "video_id": record["video_id"],
            "captions": caps}


def prepare_reader(split: base.Split):
    """One jsonl per split; videos under `split.image_root` (--video-root)."""
    return functools.partial(read, split.one_file("video_caption"), split.image_root,
                             train=split.train, max_skip_rate=split.max_skip_rate)
