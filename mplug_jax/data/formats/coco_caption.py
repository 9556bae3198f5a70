"""COCO caption, Karpathy split json (official `coco_karpathy_*.json` style entries).

Records: image (absolute path), image_id (the file name), object_labels when present; train:
caption (one record per sentence, lower-cased); eval: gold_captions (one record per image).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

from mplug_jax.data.formats import base
from mplug_jax.data.ops.image import BadRecord

DESCRIPTION = "COCO Karpathy captions: train one record per sentence, eval one per image."
FEATURES = {"image": "image", "image_id": "text", "captions": "texts"}


def _coco_folder(filepath: str) -> str:
    # Official quirk: train2014/val2014 images live in `train2014_img` / `val2014_img`.
    return {"train2014": "train2014_img", "val2014": "val2014_img"}.get(filepath, filepath)


def read(annotations: str | Sequence[str], coco_root: str, *, train: bool = True,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """Karpathy-split entries: train = one record per sentence, eval = one per image."""
    def parse(raw, pos):
        filename = base.str_field(raw, "filename")
        image = os.path.join(coco_root, _coco_folder(base.str_field(raw, "filepath")), filename)
        sents = raw.get("sentences")
        if not isinstance(sents, list):
            raise BadRecord("bad_caption", "sentences missing")
        caps = [s["raw"].lower() for s in sents
                if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()]
        if not caps:
            raise BadRecord("bad_caption", "no usable sentence")
        rec = {"image": image, "image_id": filename}
        if isinstance(raw.get("object_label"), str):
            rec["object_labels"] = " ".join(dict.fromkeys(raw["object_label"].split("&&")))
        if train:
            return [{**rec, "caption": c} for c in caps]
        return [{**rec, "gold_captions": caps}]

    files = base.as_list(annotations)
    return base.build(base.items(files), parse, f"coco_caption{files}", max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Encoded image, image_id, the caption (train) or the gold captions (eval)."""
    caps = record.get("gold_captions") or [record["caption"]]
    return {"image": builder.image(record["image"]), "image_id": record["image_id"],
            "captions": caps}


def prepare_reader(split: base.Split):
    """Images under `split.image_root` (the COCO root holding `train2014_img/`, ...)."""
    return functools.partial(read, split.files, split.image_root, train=split.train,
                             max_skip_rate=split.max_skip_rate)
