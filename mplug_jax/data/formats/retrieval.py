"""COCO / Flickr30k image-text retrieval json (ALBEF format, as mPLUG reads it).

Records: train: image, caption (pre_caption'ed), image_index (the ITC positive id); eval: one
record per image with image and image_index, the source also carrying ``texts``, ``txt2img``
and ``img2txt``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

from mplug_jax.data.formats import base
from mplug_jax.data.ops import text
from mplug_jax.data.ops.image import BadRecord

DESCRIPTION = ("COCO / Flickr30k retrieval: train (caption, image_index), eval (image, its "
               "captions).")
FEATURES = {"image": "image", "captions": "texts", "image_index": "int"}


def read(annotations: str | Sequence[str], image_root: str, *, train: bool = True,
         max_words: int = 30, max_skip_rate: float = 0.01) -> base.RecordSource:
    """COCO / Flickr30k retrieval (ALBEF format).

    Train: ``image_index`` is ``image_id`` mapped to 0..K-1 in order of first appearance (the
    ITC positive id). Eval: one record per image; the returned source also carries ``texts``
    (pre_caption'ed), ``txt2img`` (int per text) and ``img2txt`` (list of text indices per image).
    """
    files = base.as_list(annotations)
    if train:
        ids: dict[Any, int] = {}

        def parse(raw, pos):
            image_id = raw.get("image_id")
            if image_id is None or isinstance(image_id, (list, dict)):
                raise BadRecord("bad_record", "image_id missing or not hashable")
            cap = raw.get("caption")
            if not isinstance(cap, str) or not text.pre_caption(cap, max_words):
                raise BadRecord("bad_caption", f"caption {cap!r:.60}")
            image = os.path.join(image_root, base.str_field(raw, "image"))
            index = ids.setdefault(image_id, len(ids))
            return [{"image": image, "caption": text.pre_caption(cap, max_words),
                     "image_index": index}]

        return base.build(base.items(files), parse, f"retrieval{files}", max_skip_rate)

    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []

    def parse_eval(raw, pos):
        image = os.path.join(image_root, base.str_field(raw, "image"))
        caps = base.caption_field(raw.get("caption"))
        caps = [caps] if isinstance(caps, str) else caps
        img_index = len(img2txt)
        img2txt.append([])
        for cap in caps:
            img2txt[img_index].append(len(texts))
            texts.append(text.pre_caption(cap, max_words))
            txt2img.append(img_index)
        return [{"image": image, "image_index": img_index}]

    src = base.build(base.items(files), parse_eval, f"retrieval{files}", max_skip_rate)
    src.texts, src.txt2img, src.img2txt = texts, txt2img, img2txt
    return src


def example(builder, record: dict, source, index: int) -> dict:
    """Encoded image, its caption (train) or all its captions (eval), image_index."""
    if "caption" in record:
        caps = [record["caption"]]
    else:
        caps = [source.texts[t] for t in source.img2txt[record["image_index"]]]
    return {"image": builder.image(record["image"]), "captions": caps,
            "image_index": record["image_index"]}


def prepare_reader(split: base.Split):
    """Images under `split.image_root`."""
    return functools.partial(read, split.files, split.image_root, train=split.train,
                             max_skip_rate=split.max_skip_rate)
