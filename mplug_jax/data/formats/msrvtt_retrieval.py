"""MSRVTT retrieval jsonl as mPLUG v1 reads BLIP's `msrvtt_test.jsonl` (zero-shot evaluation
only; `prepare` does not write it).

Records: video (frame folder or file, see :func:`video.video_path`), video_id (`clip_name`),
caption (pre_caption); the caption of line i belongs to the video of line i.
"""
from __future__ import annotations

import os

from mplug_jax.data.formats import base
from mplug_jax.data.ops import text
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import BadRecord


def read(annotation: str, video_root: str, *, max_words: int = 40,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """MSRVTT retrieval jsonl as mPLUG v1 reads BLIP's `msrvtt_test.jsonl`: one line per
    video, `clip_name` and `caption` (pre_caption to `max_words`, official 40); the caption of
    line i belongs to the video of line i (txt2video is the identity)."""
    def parse(raw, pos):
        clip = base.str_field(raw, "clip_name")
        cap = raw.get("caption")
        if not isinstance(cap, str) or not text.pre_caption(cap, max_words):
            raise BadRecord("bad_caption", f"caption {cap!r:.60}")
        return [{"video": video.video_path(video_root, clip), "video_id": clip,
                 "caption": text.pre_caption(cap, max_words)}]

    return base.build(base.items([os.fspath(annotation)]), parse,
                      f"msrvtt_retrieval[{annotation}]", max_skip_rate)
