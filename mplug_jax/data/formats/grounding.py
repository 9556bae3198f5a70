"""RefCOCO / RefCOCO+ / RefCOCOg grounding split files (TransVG `.pth` split tuples, or a
json / jsonl list of the same).

Records: image, bbox ([x, y, w, h] pixels), phrase (lower-cased, as official), id (the tuple's
position in the split file).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from mplug_jax.data.formats import base
from mplug_jax.data.ops.image import BadRecord, DataError

DESCRIPTION = "RefCOCO / RefCOCO+ / RefCOCOg phrases with [x, y, w, h] pixel boxes."
FEATURES = {"image": "image", "phrase": "text", "bbox": "box"}


def load_split_file(path: str) -> list:
    """The records of a TransVG split file: `.pth` (torch-saved list of tuples, read without
    torch and without running code from the file) or a json/jsonl list of the same."""
    if not path.endswith(".pth"):
        return base.read_annotations(path)
    from mplug_jax import safe_pickle
    if not os.path.isfile(path):
        raise DataError(f"grounding split file not found: {path}")
    try:
        records = safe_pickle.load(path)
    except safe_pickle.PickleReadError as e:
        raise DataError(f"grounding split file: {e}") from e
    if not isinstance(records, (list, tuple)):
        raise DataError(f"grounding split file {path} holds a {type(records).__name__}, not a "
                        "list of tuples")
    return list(records)


def read(split_file: str, image_dir: str, *, flickr: bool = False,
         corners: bool | None = None, int_box: bool = False,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """TransVG split tuples: (file, _, box, phrase, attrs) or flickr (file, box, phrase); the
    box is [x, y, w, h], or [x1, y1, x2, y2] with `corners` (default: `flickr`; official:
    referit and flickr). `int_box`: the box cast to int (truncated) first, as the official
    `pull_item` (so x2 = int(x) + int(w)). Boxes are returned as [x, y, w, h] pixels; phrases
    lower-cased (official); `id` = the tuple's position in the split file; empty phrases and
    boxes without area are skipped and counted."""
    corners = flickr if corners is None else corners

    def parse(raw, pos):
        file, box, phrase = (raw[0], raw[1], raw[2]) if flickr else (raw[0], raw[2], raw[3])
        nums = [float(v) for v in box]
        if int_box:
            nums = [float(int(v)) for v in nums]
        bbox = nums
        if corners and len(nums) == 4:
            bbox = [nums[0], nums[1], nums[2] - nums[0], nums[3] - nums[1]]
        if len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
            raise BadRecord("bad_record", f"degenerate box {box!r}")
        if not isinstance(phrase, str) or not isinstance(file, str):
            raise BadRecord("bad_record", "file or phrase is not a string")
        if not phrase.strip():
            raise BadRecord("bad_record", "empty referring expression")
        return [{"image": os.path.join(image_dir, file), "bbox": bbox, "phrase": phrase.lower(),
                 "id": pos}]

    # torch.load gives tuples, json gives lists.
    items = ((split_file, i, tuple(raw) if isinstance(raw, list) else raw)
             for i, raw in enumerate(load_split_file(split_file)))
    return base.build(items, parse, f"grounding[{split_file}]", max_skip_rate, kind=tuple)


def example(builder, record: dict, source, index: int) -> dict:
    """Encoded image, phrase, float32 box."""
    return {"image": builder.image(record["image"]), "phrase": record["phrase"],
            "bbox": np.asarray(record["bbox"], np.float32)}


def prepare_reader(split: base.Split):
    """One split file per split; `split.flickr` picks the flickr tuple layout."""
    return functools.partial(read, split.one_file("grounding"), split.image_root,
                             flickr=split.flickr, max_skip_rate=split.max_skip_rate)
