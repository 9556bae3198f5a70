"""Pretraining image-caption json (official pretraining dataset files; CC / SBU / COCO / VG).

Records: image (absolute path), caption (str or list of str, raw: the pipeline applies
``pre_caption``). Several files are read as one set.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

from mplug_jax.data.formats import base

DESCRIPTION = "Image-caption pairs (official pretraining json; CC/SBU/COCO/VG)."
FEATURES = {"image": "image", "caption": "texts"}


def read(annotations: str | Sequence[str], image_root: str = "", *,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """Pretraining json files (records concatenated): image path, caption str or list."""
    def parse(raw, pos):
        return [{"image": os.path.join(image_root, base.str_field(raw, "image")),
                 "caption": base.caption_field(raw.get("caption"))}]

    files = base.as_list(annotations)
    return base.build(base.items(files), parse, f"pretrain{files}", max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Encoded image and the caption(s) as a list."""
    cap = record["caption"]
    return {"image": builder.image(record["image"]),
            "caption": [cap] if isinstance(cap, str) else list(cap)}


def prepare_reader(split: base.Split):
    """All files of the split read as one set under `split.image_root`."""
    return functools.partial(read, split.files, split.image_root,
                             max_skip_rate=split.max_skip_rate)
