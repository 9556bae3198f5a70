"""Classification accuracy shared by the classification tasks (SNLI-VE, NLVR2): the `classify`
evaluator and each task's `score_file` use the same code.

Result rows (the evaluator's `<task>_result.json`): [{"id": record index, "pred": class name,
"label": class name}], names from the task input module's `LABELS`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mplug_jax.scoring import checks


def accuracy(pred: Sequence[int], gold: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy of class ids `pred` against `gold` (equal length).

    Returns:
      {'acc': fraction correct, 'n': examples, and per class name c: 'n_<c>' gold examples of
       c, 'pred_<c>' predictions of c, 'acc_<c>' accuracy on the gold examples of c (recall;
       absent when n_<c> = 0)}.
    """
    pred, gold = np.asarray(pred, np.int64).reshape(-1), np.asarray(gold, np.int64).reshape(-1)
    if pred.shape != gold.shape:
        raise ValueError(f"{pred.size} predictions for {gold.size} labels")
    if not pred.size:
        raise ValueError("no examples to score")
    k = len(labels)
    for name, ids in (("prediction", pred), ("label", gold)):
        bad = ids[(ids < 0) | (ids >= k)]
        if bad.size:
            raise ValueError(f"{name} class ids {sorted(set(bad.tolist()))[:5]} out of range "
                             f"for {k} classes {list(labels)}")
    hit = pred == gold
    out: dict = {"acc": float(hit.mean()), "n": int(pred.size)}
    for c, name in enumerate(labels):
        of_c = gold == c
        out[f"n_{name}"] = int(of_c.sum())
        out[f"pred_{name}"] = int((pred == c).sum())
        if of_c.any():
            out[f"acc_{name}"] = float(hit[of_c].mean())
    return out


def result_rows(idx: Sequence[int], pred: Sequence[int], gold: Sequence[int],
                labels: Sequence[str]) -> list[dict]:
    """Result-file rows [{"id", "pred", "label"}] sorted by id."""
    rows = [{"id": int(i), "pred": labels[int(p)], "label": labels[int(y)]}
            for i, p, y in zip(idx, pred, gold)]
    return sorted(rows, key=lambda r: r["id"])


def score_rows(rows: Sequence[Mapping], gold: Mapping[int, str], labels: Sequence[str],
               source: str = "results") -> dict:
    """`accuracy` of result rows against gold {id: class name} (the annotation file).

    Rows whose id the annotation lacks are counted in 'unscored'; annotation ids without a row
    in 'unanswered' (an evaluation of the first N records leaves the rest unanswered).
    `source` names the rows in errors (the result file's path).

    Raises:
      ValueError: a row is malformed, names an unknown class, repeats an id, or carries a
        'label' that disagrees with the annotation (a result file of another annotation file).
    """
    index = {name: c for c, name in enumerate(labels)}
    pred, ref, seen, unscored, disagree = [], [], set(), 0, []
    for n, r in enumerate(rows):
        if not isinstance(r, Mapping) or "id" not in r or "pred" not in r:
            raise ValueError(f"result row {n} is not an object with 'id' and 'pred': {r!r:.80}")
        if r["pred"] not in index:
            raise ValueError(f"result row {n}: pred {r['pred']!r} not in {list(labels)}")
        i = int(r["id"])
        if i in seen:
            raise ValueError(f"result row {n}: id {i} appears twice")
        seen.add(i)
        if i not in gold:
            unscored += 1
            continue
        if "label" in r and r["label"] != gold[i]:
            disagree.append(i)
        pred.append(index[r["pred"]])
        ref.append(index[gold[i]])
    if not pred:
        raise checks.ScoreInputError(f"{source}: none of the {len(rows)} result rows has an "
                                     f"id of the annotation file ({len(gold)} records): "
                                     "nothing to score")
    if disagree:
        raise ValueError(f"{len(disagree)} result rows carry a label that disagrees with the "
                         f"annotation file (ids {disagree[:5]}): scored against another file?")
    out = accuracy(pred, ref, labels)
    out.update(unscored=unscored, unanswered=sum(1 for i in gold if i not in seen))
    return out


def load_rows(path: str) -> list[dict]:
    """A result file: a non-empty JSON array of {id: int, pred: str, label?: str} rows with
    unique ids (`checks.ScoreInputError` otherwise)."""
    rows = checks.check_rows(path, checks.read_json(path), {"id": checks.INT,
                                                            "pred": checks.STR},
                             key="id", what="{id, pred, label} rows")
    for i, r in enumerate(rows):
        if "label" in r:
            checks.check_entry(path, i, r, {"label": checks.STR})
    return rows
