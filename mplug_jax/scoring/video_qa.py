"""Video QA exact-match accuracy, as the official mPLUG `videoqa_mplug.py cal_metric`.

Annotations: the MSRVTT-QA / MSVD-QA jsonl (`video_id`, `question`, `answer`), question id =
line index. Results: a JSON array of `{"question_id": int, "answer": str}` (what the official
evaluation builds and the `video_qa` evaluator writes as `video_qa_result.json`). A prediction
is correct iff it equals the annotated answer string exactly (no normalisation, as official).
"""
from __future__ import annotations

import json
from typing import Mapping

from mplug_jax.scoring import checks

RESULT_FILE = "video_qa_result.json"


def exact_match(predictions: Mapping[int, str], answers: Mapping[int, str]) -> dict:
    """{'acc': fraction of predictions equal to their answer, 'num_questions': predictions
    scored, 'num_unanswered': annotated questions without a prediction}.

    Raises ValueError for a prediction whose question id is not annotated, or for none at all.
    """
    unknown = sorted(set(predictions) - set(answers), key=str)
    if unknown:
        raise ValueError(f"{len(unknown)} results for question ids not in the annotations "
                         f"(e.g. {unknown[:3]})")
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(int(p == answers[q]) for q, p in predictions.items())
    return {"acc": hits / len(predictions), "num_questions": len(predictions),
            "num_unanswered": len(set(answers) - set(predictions))}


def load_answers(annotations_path: str) -> dict[int, str]:
    """{line index: answer} of a video QA jsonl (blank lines are not counted, as
    `data.formats.base.read_annotations`)."""
    out = {}
    with open(annotations_path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            out[i] = str(rec["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{annotations_path} line {i + 1}: not a video QA record with an "
                             f"'answer' ({e!r})") from e
    return out


def load_results(results_path: str) -> dict[int, str]:
    """{question_id: answer} of a result file (non-empty JSON array of {question_id: int,
    answer: str}, ids unique; `checks.ScoreInputError` otherwise)."""
    rows = checks.check_rows(results_path, checks.read_json(results_path),
                             {"question_id": checks.INT, "answer": checks.STR},
                             key="question_id", what="{question_id, answer} objects")
    return {r["question_id"]: r["answer"] for r in rows}


def score_file(results_path: str, annotations_path: str) -> dict:
    """Exact-match accuracy of a result file against a video QA jsonl (module docstring)."""
    return exact_match(load_results(results_path), load_answers(annotations_path))
