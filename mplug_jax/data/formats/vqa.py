"""VQA v2 / Visual Genome / GQA question json (official `vqa_*.json`, `vg_qa.json`, ...).

Records: image (under the root of the record's `dataset` tag: vqa / vg / gqa), question (raw,
as official v1), question_id, dataset, answers + weights (train: :func:`answer_weights`),
ocr and object_label when present. :func:`question_text` builds the tokenizer input.
"""
from __future__ import annotations

import collections
import functools
import os
from typing import Sequence

import numpy as np

from mplug_jax.data.formats import base
from mplug_jax.data.ops import text
from mplug_jax.data.ops.image import BadRecord

DESCRIPTION = "VQA v2 / VG / GQA questions with official answer weights."
FEATURES = {"image": "image", "question": "text", "question_id": "text", "dataset": "text",
            "answers": "texts", "weights": "floats", "ocr_tokens": "texts",
            "object_label": "text"}


def answer_weights(record: dict) -> tuple[list[str], list[float]]:
    """Official train targets: vqa -> distinct answers weighted count/len; vg/gqa -> weight 0.5."""
    answer = record.get("answer")
    if record.get("dataset", "vqa") == "vqa":
        if isinstance(answer, str):
            answer = [answer]
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str)
                                                                 for a in answer):
            raise BadRecord("bad_record", f"vqa answers must be a list of strings: {answer!r:.60}")
        counts = collections.Counter(answer)
        return list(counts), [n / len(answer) for n in counts.values()]
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, str):
        raise BadRecord("bad_record", f"{record.get('dataset')} answer must be a string")
    return [answer], [0.5]


def question_text(record: dict, add_ocr: bool = True, add_object: bool = True) -> str:
    """Question fed to the tokenizer: raw question [+ " [SEP] " OCR] [+ " [SEP] " objects]."""
    question = record["question"]
    ocr = record.get("ocr")
    if add_ocr and ocr:
        tokens = " ".join(str(t[1]) for t in ocr if isinstance(t, (list, tuple)) and len(t) > 1)
        question = question + " [SEP] " + text.pre_question(tokens, 30)
    labels = record.get("object_label")
    if add_object and labels:
        question = question + " [SEP] " + " ".join(labels.split("&&"))
    return question


def read(annotations: str | Sequence[str], roots: dict[str, str], *, train: bool = True,
         max_skip_rate: float = 0.01) -> base.RecordSource:
    """VQA / VG / GQA json: image under ``roots[record['dataset']]`` (official vqa/vg/gqa_root)."""
    def parse(raw, pos):
        tag = raw.get("dataset", "vqa")
        if tag not in roots:
            raise BadRecord("bad_record",
                            f"dataset tag {tag!r} has no root; roots: {sorted(roots)}")
        rec = {"image": os.path.join(roots[tag], base.str_field(raw, "image")),
               "question": base.str_field(raw, "question"), "dataset": tag}
        if "question_id" in raw:
            rec["question_id"] = raw["question_id"]
        elif not train:
            raise BadRecord("bad_record", "evaluation record without question_id")
        if train:
            rec["answers"], rec["weights"] = answer_weights(raw)
        for key in ("ocr", "object_label"):
            if raw.get(key):
                rec[key] = raw[key]
        return [rec]

    files = base.as_list(annotations)
    return base.build(base.items(files), parse, f"vqa{files}", max_skip_rate)


def example(builder, record: dict, source, index: int) -> dict:
    """Encoded image, question, answers and weights, OCR tokens, object labels."""
    ocr = [str(t[1]) for t in record.get("ocr", []) if isinstance(t, (list, tuple))
           and len(t) > 1]
    return {"image": builder.image(record["image"]), "question": record["question"],
            "question_id": str(record.get("question_id", "")), "dataset": record["dataset"],
            "answers": record.get("answers", []),
            "weights": np.asarray(record.get("weights", []), np.float32),
            "ocr_tokens": ocr, "object_label": record.get("object_label", "")}


def prepare_reader(split: base.Split):
    """`split.image_root` is the 'vqa' root; `split.roots` adds 'vg', 'gqa', ..."""
    roots = {"vqa": split.image_root, **split.roots}
    return functools.partial(read, split.files, roots, train=split.train,
                             max_skip_rate=split.max_skip_rate)
