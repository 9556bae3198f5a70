"""SNLI-VE json (official `ve_*.json`): Flickr30k image id, hypothesis, label word.

Records: image (``<root>/<id>.jpg``), sentence (pre_caption), label (:data:`LABELS`:
entailment 2, neutral 1, contradiction 0).
"""
from __future__ import annotations

import functools
import os

from mplug_jax.data.formats import base
from mplug_jax.data.ops import text
from mplug_jax.data.ops.image import BadRecord

LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}
DESCRIPTION = ("SNLI-VE: Flickr30k image, hypothesis, label (entailment 2, neutral 1, "
               "contradiction 0).")
FEATURES = {"image": "image", "sentence": "text", "label": "int"}


def read(annotation: str, image_root: str, *, max_words: int = 30,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """SNLI-VE: image = root/<id>.jpg, sentence (pre_caption), label 2/1/0."""
    def parse(raw, pos):
        label = raw.get("label")
        if label not in LABELS:
            raise BadRecord("bad_record", f"label {label!r} not in {sorted(LABELS)}")
        return [{"image": os.path.join(image_root, f"{base.str_field(raw, 'image')}.jpg"),
                 "sentence": text.pre_caption(base.str_field(raw, "sentence"), max_words),
                 "label": LABELS[label]}]

    return base.build(base.items([os.fspath(annotation)]), parse, f"snli_ve[{annotation}]",
                      max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Encoded image, sentence, label."""
    return {"image": builder.image(record["image"]), "sentence": record["sentence"],
            "label": record["label"]}


def prepare_reader(split: base.Split):
    """One annotation file per split; images under `split.image_root`."""
    return functools.partial(read, split.one_file("snli_ve"), split.image_root,
                             max_skip_rate=split.max_skip_rate)
