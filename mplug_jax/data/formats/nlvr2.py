"""NLVR2 json (official `nlvr_*.json` as ALBEF / mPLUG read them).

Records: images (two absolute paths; train sub-folders flattened as official), sentence
(pre_caption), label (1 iff the string "True").
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

from mplug_jax.data.formats import base
from mplug_jax.data.ops import text
from mplug_jax.data.ops.image import BadRecord

DESCRIPTION = "NLVR2 image pairs with a sentence and a 0/1 label."
FEATURES = {"image0": "image", "image1": "image", "sentence": "text", "label": "int"}


def read(annotations: str | Sequence[str], image_root: str, *, max_words: int = 30,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """NLVR2: two images, sentence (pre_caption), label 1 iff the string "True"."""
    def parse(raw, pos):
        images = raw.get("images")
        if not (isinstance(images, list) and len(images) == 2
                and all(isinstance(p, str) for p in images)):
            raise BadRecord("bad_record", "images must be a list of two paths")
        if "train" in images[0]:  # official: flatten the train sub-folders
            images = [f"train/{os.path.basename(p)}" for p in images]
        return [{"images": [os.path.join(image_root, p) for p in images],
                 "sentence": text.pre_caption(base.str_field(raw, "sentence"), max_words),
                 "label": int(raw.get("label") == "True")}]

    files = base.as_list(annotations)
    return base.build(base.items(files), parse, f"nlvr2{files}", max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Both encoded images, sentence, label."""
    first, second = record["images"]
    return {"image0": builder.image(first), "image1": builder.image(second),
            "sentence": record["sentence"], "label": record["label"]}


def prepare_reader(split: base.Split):
    """Images under `split.image_root`."""
    return functools.partial(read, split.files, split.image_root,
                             max_skip_rate=split.max_skip_rate)
