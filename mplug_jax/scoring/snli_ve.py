"""SNLI-VE scoring: three-way accuracy (overall and per class) of a `snli_ve_result.json`
([{"id", "pred", "label"}], written by the `classify` evaluator) against the official annotation
json (docs/official-formats.md#snli-ve) or the original SNLI-VE jsonl
(`formats.snli_ve_jsonl`). `id` is the record's index among the annotation's valid
records in file order, as the readers give them (records `formats.snli_ve.read` skips get no id).

    mplug-jax score --task snli_ve --results snli_ve_result.json --annotations snli_ve_test.jsonl
"""
from __future__ import annotations

from mplug_jax.data.formats import snli_ve as snli_ve_format
from mplug_jax.data.formats import snli_ve_jsonl
from mplug_jax.scoring import checks, classify

LABELS = tuple(sorted(snli_ve_format.LABELS, key=snli_ve_format.LABELS.get))


def load_gold(annotation: str) -> dict[int, str]:
    """{record index: class name} of an official SNLI-VE json or jsonl (images are not
    needed)."""
    with checks.reading_annotations():
        if snli_ve_jsonl.is_original(annotation):
            src = snli_ve_jsonl.read(annotation, "")
        else:
            src = snli_ve_format.read(annotation, "", max_skip_rate=1.0)
    return {i: LABELS[r["label"]] for i, r in enumerate(src)}


def score_file(results: str, annotations: str) -> dict:
    """Accuracy metrics (`scoring.classify.score_rows`) of a result file."""
    return classify.score_rows(classify.load_rows(results), load_gold(annotations), LABELS,
                              results)
