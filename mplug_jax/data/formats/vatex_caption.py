"""VATEX caption json as mPLUG v1 reads `vatex_public_test_english_v1.1.json` (zero-shot
evaluation only; `prepare` does not write it).

Records: video (frame folder or file, see :func:`video.video_path`), video_id (`videoID`),
gold_captions (the `enCap` English references).
"""
from __future__ import annotations

import os

from mplug_jax.data.formats import base
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import BadRecord


def read(annotation: str, video_root: str, *, max_skip_rate: float = 0.01) -> base.RecordSource:
    """VATEX caption json: an array of {`videoID`, `enCap`: [English references]} -> video,
    video_id, gold_captions."""
    def parse(raw, pos):
        video_id = base.str_field(raw, "videoID")
        caps = raw.get("enCap")
        golds = [c for c in caps if isinstance(c, str) and c.strip()] \
            if isinstance(caps, list) else []
        if not golds:
            raise BadRecord("bad_caption", "enCap missing or without a usable reference")
        return [{"video": video.video_path(video_root, video_id), "video_id": video_id,
                 "gold_captions": golds}]

    return base.build(base.items([os.fspath(annotation)]), parse,
                      f"vatex_caption[{annotation}]", max_skip_rate)
