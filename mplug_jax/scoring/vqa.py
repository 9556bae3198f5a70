"""VQA accuracy as the official VQA evaluation (`vqaTools/vqaEval.py`, shipped with mPLUG).

Per question, with the 10 human answers g_1..g_10 and a predicted answer a:
  acc(a) = mean over i of min(1, #{j != i : g_j == a} / 3)
(the mean over the 10 leave-one-out subsets of 9 answers). Normalisation, exactly as that file:
- the prediction: newlines/tabs -> spaces, strip, `process_punctuation`, `process_digit_article`
  (lower-case, number words -> digits, drop a/an/the, contractions like "dont" -> "don't");
- the human answers: only `process_punctuation`, and only when they are not all identical
  (the VQA v2 annotations are already normalised, so e.g. a human "two" never matches).
Overall and per-answer-type accuracies are means over questions (fractions; the official prints
100 x, rounded to 2 decimals).

Annotation files `score_file` reads (format detected from the content):
- VQA v2 annotations: {"annotations": [{"question_id", "answer_type", "answers": [{"answer"}]}]}
  (what `mplug_jax.data.synthetic.shapes.write_vqa_files` writes as `vqa_annotations.json`);
- the official mPLUG VQA json (`vqa_minival_ocr.json`): [{"question_id", "answer": [10 strings],
  "answer_type"?}] -> the same VQA accuracy;
- LXMERT-style labels (`minival.json`): [{"question_id", "label": {answer: score}}] -> the
  official in-loop score label.get(answer, 0) (raw generated answer, no normalisation).
Result files: [{"question_id", "answer"}] (what the VQA evaluator writes as vqa_result.json).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from mplug_jax.scoring import checks

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # Official typo kept: "somebody'd" maps to "somebodyd".
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
# Official regex, typo included: "(?!<=\d)" is a lookahead, so every "." not followed by a
# digit is removed ("2.5" keeps its point, "3." and "u.s." lose theirs).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official passes re.UNICODE (= 32) as `count` of `sub`: at most 32 periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a mark next to a space (or anywhere in a text with a
    digit,digit comma) is deleted, otherwise replaced by a space; then periods not followed by
    a digit are deleted."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case words, number words -> digits, articles
    dropped, known contractions restored ("dont" -> "don't"), words joined by one space."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """Official accuracy of one predicted answer against the human answers (see module doc).

    Args:
      answer: the predicted answer (raw; normalised here).
      gt_answers: the human answers of the question (10 in VQA v2; any number >= 1 works).
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(answer)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(g) for g in gts]
    matches = [g == pred for g in gts]
    total = sum(matches)
    # Leave-one-out: answer i's subset holds every other answer (by position, as the official
    # compares answer records, whose answer_id makes equal strings distinct).
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


def type_key(answer_type: str) -> str:
    """Metric-name form of an answer type: 'yes/no' -> 'yes_no'."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", answer_type).strip("_") or "unknown"


def evaluate(predictions: Mapping[Any, str], annotations: Mapping[Any, dict]) -> dict:
    """Accuracy of `predictions` {question_id: answer} over the annotated questions they answer.

    Args:
      predictions: {question_id: predicted answer}; every id must be annotated.
      annotations: {question_id: {'answers': [str] | 'label': {answer: score},
        'answer_type': str (optional)}} (`load_annotations`).
    Returns:
      {'acc': overall, 'acc_<type>': per answer type, 'n': questions scored, 'n_<type>',
       'unanswered': annotated questions without a prediction (not scored),
       'per_question': {question_id: accuracy}}.
    """
    unknown = [q for q in predictions if q not in annotations]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted question ids are not in the annotations, "
                         f"e.g. {unknown[:5]}")
    per_q, by_type = {}, {}
    for qid, answer in predictions.items():
        ann = annotations[qid]
        if not isinstance(answer, str):
            raise ValueError(f"question {qid}: answer must be a string, got {answer!r}")
        if "answers" in ann:
            acc = vqa_accuracy(answer, ann["answers"])
        else:
            acc = float(ann["label"].get(answer, 0.0))
        per_q[qid] = acc
        if ann.get("answer_type"):
            by_type.setdefault(type_key(ann["answer_type"]), []).append(acc)
    out: dict[str, Any] = {"acc": sum(per_q.values()) / len(per_q) if per_q else 0.0,
                           "n": len(per_q), "unanswered": len(annotations) - len(per_q)}
    for key, accs in sorted(by_type.items()):
        out[f"acc_{key}"] = sum(accs) / len(accs)
        out[f"n_{key}"] = len(accs)
    out["per_question"] = per_q
    return out


def annotations_from_records(records: Sequence[Mapping]) -> dict:
    """{question_id: annotation} from official-format VQA records (10-answer 'answer' lists,
    optional 'answer_type') or LXMERT-style label records ('label')."""
    out = {}
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "question_id" not in r:
            raise ValueError(f"annotation record {i} has no question_id: {r!r:.80}")
        qid = r["question_id"]
        if qid in out:
            raise ValueError(f"question_id {qid} annotated twice")
        if isinstance(r.get("label"), Mapping):
            ann = {"label": {str(k): float(v) for k, v in r["label"].items()}}
        elif isinstance(r.get("answer"), list) and r["answer"]:
            ann = {"answers": [str(a) for a in r["answer"]]}
        elif isinstance(r.get("answers"), list) and r["answers"]:  # VQA v2 annotation entry
            ann = {"answers": [str(a["answer"] if isinstance(a, Mapping) else a)
                               for a in r["answers"]]}
        else:
            raise ValueError(f"annotation record {i} (question {qid}) has neither a 'label' "
                             "dict nor a list of human answers ('answer' / 'answers')")
        if r.get("answer_type"):
            ann["answer_type"] = str(r["answer_type"])
        out[qid] = ann
    return out


def load_annotations(path: str) -> dict:
    """{question_id: annotation} of an annotation file in any format of the module doc."""
    data = checks.read_json(path, "annotations")
    if isinstance(data, Mapping):
        if not isinstance(data.get("annotations"), list):
            raise ValueError(f"{path}: a JSON object must be VQA v2 annotations with an "
                             "'annotations' list")
        data = data["annotations"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of annotation records")
    return annotations_from_records(data)


def load_results(path: str) -> dict:
    """{question_id: answer} of a result file [{"question_id", "answer"}] (non-empty, ids
    unique, answers strings; `checks.ScoreInputError` otherwise)."""
    rows = checks.check_rows(path, checks.read_json(path), {"question_id": checks.ID,
                                                             "answer": checks.STR},
                             key="question_id", what="{question_id, answer} objects")
    return {r["question_id"]: r["answer"] for r in rows}


def score_file(results_path: str, annotations_path: str) -> dict:
    """Score a result file against an annotation file (formats in the module doc).

    Returns `evaluate`'s dict without 'per_question' (the CLI prints it)."""
    out = evaluate(load_results(results_path), load_annotations(annotations_path))
    out.pop("per_question")
    return out
