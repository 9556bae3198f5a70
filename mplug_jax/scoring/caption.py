"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) as the official evaluation computes
them, a pure-Python CIDEr-D for SCST rewards, and scoring of result files.

Official handling (docs/official-formats.md#caption-evaluation,
`language_evaluation.CocoEvaluator`): references are the lowercased raw Karpathy sentences, image id
= the index of the prediction, references and predictions go through the Stanford PTB tokenizer
(punctuation dropped), then pycocoevalcap's scorers; its `Cider` is CIDEr-D (sigma 6, clipped n-gram
counts) with document frequencies over the evaluated reference set. SPICE (also in the official
default list) is not computed: it needs a 1 GB Stanford CoreNLP download at first use, which this
package does not do. The PTB tokenizer and METEOR are Java programs: without `java` on the PATH they
raise `JavaMissingError` naming the metric.

`CiderD` is the SCST reward (docs/official-formats.md#scst): the same formula with document
frequencies from a fixed reference corpus (the *training* references, or the batch's:
`task.scst.cider_df`) and a Python tokenizer instead of PTB (`simple_tokenize`: lowercase,
punctuation split off and dropped; PTB also splits clitics such as "n't", which the shapes data
and most COCO captions never contain), or the PTB tokenizer itself (`ptb_tokenize`,
`task.scst.reward_tokenize='ptb'`).
"""
from __future__ import annotations

import atexit
import collections
import json
import math
import os
import re
import shutil
import threading
from typing import Iterable, Mapping, Sequence

import numpy as np

from mplug_jax.data.ops import tokenizer
from mplug_jax.scoring import checks

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
_JAVA_HELP = ("install a Java runtime (e.g. `apt-get install default-jre-headless`, or a JDK "
              "from adoptium.net) so that `java` is on the PATH")


class JavaMissingError(RuntimeError):
    """A Java-based metric (PTB tokenizer, METEOR) was asked for without a `java` binary."""


def decode_text(ids, prompt: str = "") -> str:
    """Generated ids ([CLS] first) -> caption text, official post-processing
    (docs/fixtures.md#post-processing, `Tokenizer.decode_official`), with a leading `prompt`
    removed."""
    text = tokenizer.get_tokenizer().decode_official([int(i) for i in ids])
    if prompt:
        p = prompt.lower().strip()
        if text.startswith(p + " ") or text == p:
            text = text[len(p):].strip()
    return text


def require_java(what: str) -> None:
    """Raise `JavaMissingError` naming `what` when `java` is not on the PATH."""
    if shutil.which("java") is None:
        raise JavaMissingError(f"{what} runs on Java, and no `java` executable is on the PATH: "
                               f"{_JAVA_HELP}; or pass metrics=('CIDEr', ...) with "
                               "tokenize='simple' to skip Java entirely")


# ---- pure-Python CIDEr-D ------------------------------------------------------------------

_PUNCT = re.compile(r"[.,!?;:\"'`()\[\]{}\-]+")


def simple_tokenize(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed (a Python stand-in for the PTB
    tokenizer followed by pycocoevalcap's punctuation filter)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _ngrams(words: Sequence[str], n: int = 4) -> collections.Counter:
    out = collections.Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            out[tuple(words[i:i + k])] += 1
    return out


class CiderD:
    """CIDEr-D (n = 1..4, sigma 6, x10) with document frequencies fixed at construction.

    Equal to pycocoevalcap's `Cider` when `references` is the set that `Cider` is given
    (pycocoevalcap recomputes the frequencies from the references it scores; SCST fixes them
    to the training references so that a batch's rewards do not depend on the batch).

    Args:
      references: the reference corpus: one list of (already tokenised, space-separated)
        sentences per image; only used for the document frequencies and log(#images).
      n: largest n-gram; sigma: width of the Gaussian length penalty.
    """

    def __init__(self, references: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.df: collections.Counter = collections.Counter()
        count = 0
        for refs in references:
            count += 1
            seen = set()
            for r in refs:
                seen.update(_ngrams(r.split(), n))
            self.df.update(seen)
        if not count:
            raise ValueError("CiderD needs at least one image's references")
        self.ref_len = math.log(float(count))

    def _vec(self, counts: collections.Counter):
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (self.ref_len - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[k][gram] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap counts bigrams as the "length" of a sentence
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, candidate: str, refs: Sequence[str]) -> float:
        """CIDEr-D of one tokenised candidate against its tokenised references."""
        if not refs:
            raise ValueError("CiderD.score needs at least one reference")
        vh, nh, lh = self._vec(_ngrams(candidate.split(), self.n))
        total = np.zeros(self.n)
        for r in refs:
            vr, nr, lr = self._vec(_ngrams(r.split(), self.n))
            penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0)
                          for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        return float(np.mean(total) / len(refs) * 10.0)

    def scores(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """float64[N] CIDEr-D of candidate i against refs[i]."""
        return np.array([self.score(c, r) for c, r in zip(candidates, refs, strict=True)])


# ---- official metrics (pycocoevalcap) ------------------------------------------------------

def _ptb(data: Mapping[int, list[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    require_java("the PTB tokenizer of the caption metrics")
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in data.items()})


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The captions `texts` through pycocoevalcap's PTB tokenizer (Java; lowercased,
    punctuation dropped), as the official metrics see them (space-separated tokens)."""
    if not texts:
        return []
    out = _ptb({i: [str(t)] for i, t in enumerate(texts)})
    return [out[i][0] for i in range(len(texts))]


def evaluate(predictions: Sequence[str], references: Sequence[Sequence[str]],
             metrics: Sequence[str] = METRICS, tokenize: str = "ptb") -> dict[str, float]:
    """Corpus metrics of predictions[i] against references[i] (official `CocoEvaluator`).

    Args:
      predictions: one caption per image.
      references: the image's reference captions (lowercased here, as the official).
      metrics: a subset of `METRICS`.
      tokenize: 'ptb' (official, Java) or 'simple' (`simple_tokenize`, no Java).
    Returns:
      {metric: value} (fractions, CIDEr unscaled as pycocoevalcap returns it).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; valid: {METRICS} "
                         "(SPICE is not computed, see mplug_jax.scoring.caption)")
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one reference list per prediction and at least one: "
                         f"{len(predictions)} predictions, {len(references)} reference lists")
    if any(not r for r in references):
        raise ValueError("every image needs at least one reference caption")
    gts = {i: [str(r).lower() for r in refs] for i, refs in enumerate(references)}
    res = {i: [str(p)] for i, p in enumerate(predictions)}
    if tokenize == "ptb":
        gts, res = _ptb(gts), _ptb(res)
    elif tokenize == "simple":
        gts = {k: [simple_tokenize(c) for c in v] for k, v in gts.items()}
        res = {k: [simple_tokenize(c) for c in v] for k, v in res.items()}
    else:
        raise ValueError(f"tokenize must be 'ptb' or 'simple', got {tokenize!r}")
    out: dict[str, float] = {}
    bleu = [m for m in metrics if m.startswith("Bleu_")]
    if bleu:
        from pycocoevalcap.bleu.bleu import Bleu
        score, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"Bleu_{i + 1}": float(s) for i, s in enumerate(score)
                    if f"Bleu_{i + 1}" in bleu})
    if "METEOR" in metrics:
        require_java("METEOR")
        out["METEOR"] = meteor_score(gts, res)
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


_METEOR: dict = {"scorer": None}
_METEOR_LOCK = threading.Lock()


def meteor_score(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> float:
    """pycocoevalcap's corpus METEOR of tokenized `res` against `gts`, through one METEOR JVM
    kept for the process: starting it loads its paraphrase tables (~5 s on 2 cores), which
    every evaluation of a training run would pay again. Each request carries all of its
    statistics, so the reply does not depend on earlier requests; a JVM that died is
    started again, and one that failed mid-request is ended (its pipe is out of step)."""
    from pycocoevalcap.meteor.meteor import Meteor
    with _METEOR_LOCK:
        scorer = _METEOR["scorer"]
        if scorer is None or scorer.meteor_p.poll() is not None:
            scorer = _METEOR["scorer"] = Meteor()
        try:
            return float(scorer.compute_score(gts, res)[0])
        except BaseException:
            _METEOR["scorer"] = None
            if scorer.lock.locked():  # compute_score does not release it on errors
                scorer.lock.release()
            scorer.meteor_p.kill()
            raise


@atexit.register
def _end_meteor() -> None:
    scorer, _METEOR["scorer"] = _METEOR["scorer"], None
    if scorer is not None:
        scorer.meteor_p.kill()


# ---- result files --------------------------------------------------------------------------

def _image_key(value) -> str:
    """Join key of an image: the file name, or the COCO integer id parsed from it."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    m = re.search(r"(\d+)\.\w+$", str(value))
    return str(int(m.group(1))) if m else str(value)


def read_results(results_path: str) -> dict[str, str]:
    """{image key: caption} from an official result file (`question_id` = file name,
    `pred_caption`) or a COCO-server file (`image_id` int, `caption`).

    Raises `checks.ScoreInputError` for an empty file, a null/NaN/non-string caption, or two
    results for one image (the same id, or a file name and its COCO id)."""
    rows = checks.nonempty_list(results_path, checks.read_json(results_path),
                                "caption results")
    out: dict[str, str] = {}
    seen = checks.Unique(results_path, "image")
    for i, r in enumerate(rows):
        if isinstance(r, dict) and "pred_caption" in r and "question_id" in r:
            spec = {"question_id": checks.ID, "pred_caption": checks.STR}
        elif isinstance(r, dict) and "caption" in r and "image_id" in r:
            spec = {"image_id": checks.ID, "caption": checks.STR}
        else:
            raise checks.ScoreInputError(
                f"{results_path} entry {i}: expected {{'question_id', 'pred_caption'}} or "
                f"{{'image_id', 'caption'}}, got {r!r:.100}")
        checks.check_entry(results_path, i, r, spec)
        key, cap = (r[k] for k in spec)
        seen.add(i, _image_key(key))
        out[_image_key(key)] = cap
    return out


def read_references(annotations_path: str) -> dict[str, list[str]]:
    """{image key: lowercased raw sentences} from a Karpathy-format annotation file
    (docs/official-formats.md#coco-caption: `filename`, `sentences[].raw`)."""
    rows = checks.read_json(annotations_path, "annotations")
    if not isinstance(rows, list):
        raise checks.ScoreInputError(f"{annotations_path}: expected a JSON array of Karpathy "
                                     "entries")
    out = {}
    for i, r in enumerate(rows):
        try:
            out[_image_key(r["filename"])] = [s["raw"].lower() for s in r["sentences"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{annotations_path} entry {i} is not a Karpathy entry "
                             f"(filename, sentences[].raw): {e!r}") from e
    return out


def score_file(results_path: str, annotations_path: str, **kwargs) -> dict[str, float]:
    """Metrics of a caption result file against Karpathy-format annotations.

    Every result must name an annotated image; annotated images without a result are an
    error too (a partial file would silently score a different set). `kwargs` go to
    `evaluate` (metrics, tokenize).
    """
    preds, refs = read_results(results_path), read_references(annotations_path)
    unknown = sorted(set(preds) - set(refs))
    missing = sorted(set(refs) - set(preds))
    if unknown or missing:
        raise ValueError(f"{results_path} vs {annotations_path}: {len(unknown)} results for "
                         f"images not in the annotations (e.g. {unknown[:3]}), {len(missing)} "
                         f"annotated images without a result (e.g. {missing[:3]})")
    keys = sorted(refs)
    out = evaluate([preds[k] for k in keys], [refs[k] for k in keys], **kwargs)
    out["num_images"] = len(keys)
    return out


def result_rows(image_ids: Sequence[str], predictions: Sequence[str],
                references: Sequence[Sequence[str]] | None = None,
                form: str = "official") -> list[dict]:
    """Rows of a result file: 'official' `[{"question_id": file name, "pred_caption",
    "gold_caption"}]` or 'coco' `[{"image_id": int, "caption"}]` (id parsed from the name)."""
    if form == "official":
        refs = references if references is not None else [[] for _ in image_ids]
        return [{"question_id": i, "pred_caption": p, "gold_caption": list(r)}
                for i, p, r in zip(image_ids, predictions, refs, strict=True)]
    if form != "coco":
        raise ValueError(f"form must be 'official' or 'coco', got {form!r}")
    rows = []
    for i, p in zip(image_ids, predictions, strict=True):
        key = _image_key(i)
        if not key.isdigit():
            raise ValueError(f"COCO-server results need numeric image ids; {i!r} has none")
        rows.append({"image_id": int(key), "caption": p})
    return rows


def write_results(path: str, image_ids: Sequence[str], predictions: Sequence[str],
                  references: Sequence[Sequence[str]] | None = None,
                  form: str = "official") -> None:
    """Write `result_rows(...)` as a JSON file at `path`."""
    rows = result_rows(image_ids, predictions, references, form)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f)
