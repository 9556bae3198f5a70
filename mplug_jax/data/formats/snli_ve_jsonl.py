"""The original SNLI-VE files (`snli_ve_train.jsonl`, `snli_ve_dev.jsonl`, `snli_ve_test.jsonl`
of the SNLI-VE release): JSON lines, one (image, premise, hypothesis) triple per line, the SNLI
fields plus the Flickr30k image id:

    {"sentence1": "Two women are embracing ...", "sentence2": "The sisters are hugging ...",
     "Flikr30kID": "4705552913.jpg", "gold_label": "neutral", "pairID": ..., ...}

The ALBEF-format `ve_*.json` (docs/official-formats.md#snli-ve, read by `formats.snli_ve.read`)
keeps only the image, `sentence2` and the label; the paper feeds the text premise too (mPLUG
section 5.2.5: "the image premise, text premise and text hypothesis are fed to the encoder"),
so only these files can give it.

Records (as `formats.snli_ve.read`'s, plus the premise): image = `<image_root>/<id>.jpg` (the id
with or without its `.jpg`), premise = `pre_caption(sentence1, max_words)`, sentence =
`pre_caption(sentence2, max_words)` (the hypothesis), label entailment 2 / neutral 1 /
contradiction 0. The release is clean (pairs without a gold label were removed), so a line that
does not parse into such a record is an error naming the file and line, not a skip.
"""
from __future__ import annotations

import json
import os

from mplug_jax.data.formats import base, snli_ve
from mplug_jax.data.ops import text
from mplug_jax.data.ops.image import DataError

FIELDS = {"premise": "sentence1", "hypothesis": "sentence2", "image": "Flikr30kID",
          "label": "gold_label"}
LABELS = snli_ve.LABELS  # entailment 2, neutral 1, contradiction 0


def is_original(path: str) -> bool:
    """True if `path` holds JSON lines (the original release), False for a JSON array (the
    ALBEF format), judged by its first non-blank character.

    Raises:
      DataError: the file is missing or holds neither.
    """
    if not os.path.isfile(path):
        raise DataError(f"SNLI-VE annotation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                raise DataError(f"SNLI-VE annotation file {path} is empty")
            first = chunk.lstrip()[:1]
            if first:
                break
    if first == "{":
        return True
    if first == "[":
        return False
    raise DataError(f"{path}: neither the original SNLI-VE JSON lines (a record per line) nor "
                    f"the ALBEF-format JSON array (starts with {first!r})")


def _field(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} missing or not a non-empty string")
    return value


def parse_line(line: str, where: str, image_root: str, max_words: int = 30) -> dict:
    """One JSON line -> {'image', 'premise', 'sentence', 'label'} (see module docstring);
    `where` ("file line N") prefixes the error.

    Raises:
      DataError: not a JSON object, a field missing or empty, or a gold_label outside LABELS.
    """
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    label = raw.get(FIELDS["label"])
    if label not in LABELS:
        raise DataError(f"{where}: gold_label {label!r} is not one of "
                        f"{', '.join(sorted(LABELS))}")
    image = _field(raw, FIELDS["image"], where).strip()
    if image.lower().endswith(".jpg"):
        image = image[:-4]
    out = {"image": os.path.join(image_root, f"{image}.jpg"), "label": LABELS[label]}
    for name, key in (("premise", FIELDS["premise"]), ("sentence", FIELDS["hypothesis"])):
        out[name] = text.pre_caption(_field(raw, key, where), max_words)
        if not out[name]:
            raise DataError(f"{where}: field {key!r} is empty after normalisation")
    return out


def read(annotation: str, image_root: str, *, max_words: int = 30) -> base.RecordSource:
    """Every triple of an original SNLI-VE jsonl, in file order (blank lines ignored).

    Args:
      annotation: path of `snli_ve_<split>.jsonl`.
      image_root: the Flickr30k image folder (`<id>.jpg`).
      max_words: `pre_caption` word limit of premise and hypothesis (official 30).
    Returns:
      a RecordSource of {'image' path, 'premise', 'sentence' (hypothesis), 'label' int}.
    Raises:
      DataError: the file is missing, or a line is malformed (message: file, line, why).
    """
    annotation = os.fspath(annotation)
    if not os.path.isfile(annotation):
        raise DataError(f"SNLI-VE annotation file not found: {annotation}")
    records = []
    with open(annotation, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                records.append(parse_line(line, f"{annotation} line {n}", image_root,
                                          max_words))
    return base.RecordSource(records, name=f"snli_ve_jsonl[{annotation}]")
