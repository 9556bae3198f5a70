"""NLVR2 scoring: accuracy (overall and per class) of an `nlvr2_result.json` ([{"id", "pred",
"label"}], written by the `classify` evaluator) against an official NLVR2 annotation json
(docs/official-formats.md#nlvr2). `id` is the record's index among the annotation's valid records in
file order, as `formats.nlvr2.read` reads them (records it skips get no id); the label is "True" or
anything else (= "False"), as the official reader.

    mplug-jax score --task nlvr2 --results nlvr2_result.json --annotations nlvr2_dev.json
"""
from __future__ import annotations

from mplug_jax.data.formats import nlvr2 as nlvr2_format
from mplug_jax.data.inputs.nlvr2 import LABELS
from mplug_jax.scoring import checks, classify


def load_gold(annotation: str) -> dict[int, str]:
    """{record index: "False" | "True"} of an official NLVR2 json (images are not needed)."""
    with checks.reading_annotations():
        src = nlvr2_format.read(annotation, "", max_skip_rate=1.0)
    return {i: LABELS[r["label"]] for i, r in enumerate(src)}


def score_file(results: str, annotations: str) -> dict:
    """Accuracy metrics (`scoring.classify.score_rows`: acc, n, acc_/n_/pred_<class>,
    unscored, unanswered) of a result file."""
    return classify.score_rows(classify.load_rows(results), load_gold(annotations), LABELS,
                              results)
