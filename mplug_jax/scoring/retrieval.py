"""Image-text retrieval: the official re-ranked score matrices and recall metrics.

Official evaluation (`retrieval_img_mplug.py evaluation()` / `itm_eval()`,
docs/fixtures.md#retrieval-evaluation): cosine similarities between the ITC features select the
`k_test` candidates of every query (top-k texts of each image, top-k images of each text); each
candidate pair is re-scored by the fusion encoder + ITM head and its raw class-1 logit is the
ranking score (no softmax, similarity not added); non-candidates keep -100. Ranks are the
0-based positions of the ground truth in the descending order of a query's scores; an image
with several captions counts its best-ranked one.

Everything here works on precomputed numpy arrays, so the model side (features, ITM logits)
can come from any implementation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mplug_jax.scoring import checks

NON_CANDIDATE_SCORE = -100.0
METRIC_NAMES = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                "img_r_mean", "r_mean")


def topk_candidates(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row, descending (as `torch.topk`).

    Args:
      sims: float[N, M] similarities (row = query).
      k: candidates per query, 1 <= k <= M.
    Returns:
      (float[N, k] the top similarities, int64[N, k] their column indices).
    """
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be 2-D [queries, items], got shape {sims.shape}")
    if not 1 <= int(k) <= sims.shape[1]:
        raise ValueError(f"k_test={k} must be in [1, {sims.shape[1]}] (number of items)")
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :int(k)].astype(np.int64)
    return np.take_along_axis(sims, idx, 1), idx


def score_matrix(topk_idx: np.ndarray, itm_logits: np.ndarray, num_items: int) -> np.ndarray:
    """The official re-ranked score matrix of one direction.

    Args:
      topk_idx: int[N, k] candidate items of each query (from `topk_candidates`).
      itm_logits: float[N, k, 2] ITM head logits of each (query, candidate) pair.
      num_items: M, number of columns.
    Returns:
      float32[N, M]: the raw class-1 ITM logit at the candidates, -100 elsewhere.
    """
    topk_idx, itm_logits = np.asarray(topk_idx), np.asarray(itm_logits)
    if itm_logits.shape != topk_idx.shape + (2,):
        raise ValueError(f"itm_logits shape {itm_logits.shape} must be topk_idx shape "
                         f"{topk_idx.shape} + (2,)")
    if topk_idx.size and (topk_idx.min() < 0 or topk_idx.max() >= num_items):
        raise ValueError(f"candidate indices must lie in [0, {num_items})")
    out = np.full((topk_idx.shape[0], num_items), NON_CANDIDATE_SCORE, np.float32)
    np.put_along_axis(out, topk_idx.astype(np.int64), itm_logits[..., 1].astype(np.float32), 1)
    return out


def _ground_truth_lists(img2txt, num_images: int) -> list[list[int]]:
    gt = [list(map(int, np.ravel(t))) for t in img2txt]
    if len(gt) != num_images:
        raise ValueError(f"img2txt has {len(gt)} entries for {num_images} images")
    if any(not t for t in gt):
        raise ValueError("every image needs at least one ground-truth text in img2txt")
    return gt


def retrieval_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Sequence[int],
                    img2txt: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the ground truth, as the official `itm_eval`.

    Args:
      scores_i2t: float[NI, NT] image -> text scores.
      scores_t2i: float[NT, NI] text -> image scores.
      txt2img: int[NT] the image of each text.
      img2txt: NI sequences of text indices (an int[NI, C] array works too).
    Returns:
      (int64[NI] best rank among each image's texts, int64[NT] rank of each text's image).
    """
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    ni, nt = scores_i2t.shape if scores_i2t.ndim == 2 else (None, None)
    if ni is None or scores_t2i.shape != (nt, ni):
        raise ValueError(f"scores_i2t {scores_i2t.shape} and scores_t2i {scores_t2i.shape} "
                         "must be [NI, NT] and [NT, NI]")
    txt2img = np.asarray(txt2img).reshape(-1)
    if txt2img.shape[0] != nt:
        raise ValueError(f"txt2img has {txt2img.shape[0]} entries for {nt} texts")
    gt = _ground_truth_lists(img2txt, ni)
    i2t = np.empty(ni, np.int64)
    for i in range(ni):
        # Official order: ascending argsort reversed (equal scores: numpy's default sort order).
        pos = np.empty(nt, np.int64)
        pos[np.argsort(scores_i2t[i])[::-1]] = np.arange(nt)
        i2t[i] = min(pos[t] for t in gt[i])
    t2i = np.empty(nt, np.int64)
    for t in range(nt):
        inds = np.argsort(scores_t2i[t])[::-1]
        t2i[t] = int(np.nonzero(inds == txt2img[t])[0][0])
    return i2t, t2i


def recall_metrics(i2t_rank: np.ndarray, t2i_rank: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent) and their means from the ranks of `retrieval_ranks`.

    `txt_*` is text retrieval (image queries), `img_*` image retrieval (text queries);
    `r_mean` = (txt_r_mean + img_r_mean) / 2. Python double arithmetic as the official code.
    """
    i2t_rank, t2i_rank = np.asarray(i2t_rank), np.asarray(t2i_rank)
    if i2t_rank.size == 0 or t2i_rank.size == 0:
        raise ValueError("recall needs at least one image and one text")
    out = {}
    for side, ranks in (("txt", i2t_rank), ("img", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = 100.0 * int(np.sum(ranks < k)) / len(ranks)
        out[f"{side}_r_mean"] = (out[f"{side}_r1"] + out[f"{side}_r5"] + out[f"{side}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {k: out[k] for k in METRIC_NAMES}


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Sequence[int],
             img2txt: Sequence[Sequence[int]]) -> dict[str, float]:
    """The official `itm_eval`: recall metrics of two score matrices (see `retrieval_ranks`,
    `recall_metrics`); keys in the official order `METRIC_NAMES`."""
    return recall_metrics(*retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt))


# ---- result files ---------------------------------------------------------------------------
# `retrieval_result.json` (written by the `retrieval` evaluator):
#   {"format": RESULT_FORMAT, "top_n": n, "k_test": {"i2t": k, "t2i": k},
#    "i2t": [{"image": IMAGE, "texts": [TEXT, ...]}],          one per image query
#    "t2i": [{"text": TEXT, "caption": str, "images": [IMAGE, ...]}]}   one per text query
# IMAGE = the record's "image" field as written in the eval json; TEXT = "IMAGE#j", the j-th
# caption of that record; each list holds the top n items, best first, in the order of the
# official ranking (`ranked`). Recalls at K <= n follow from the lists alone.

RESULT_FORMAT = "mplug-jax-retrieval-v1"


def text_key(image_key: str, j: int) -> str:
    """Result-file key of caption j of the eval record whose image field is `image_key`."""
    return f"{image_key}#{j}"


def ranked(scores: np.ndarray, n: int) -> np.ndarray:
    """int64[Q, n]: per row, the n best columns in the official order of `retrieval_ranks`
    (descending; ties in the order of numpy's ascending argsort, reversed)."""
    scores = np.asarray(scores)
    return np.stack([np.argsort(row)[::-1][:n] for row in scores]).astype(np.int64) \
        if len(scores) else np.zeros((0, n), np.int64)


def result_file(scores_i2t: np.ndarray, scores_t2i: np.ndarray, image_keys: list[str],
                text_keys: list[str], captions: list[str], k_test: dict,
                top_n: int = 10) -> dict:
    """The result-file object (format above) of two score matrices [NI, NT] / [NT, NI]."""
    if top_n < 10:
        raise ValueError(f"top_n must be >= 10 (R@10), got {top_n}")
    n_i, n_t = min(top_n, len(text_keys)), min(top_n, len(image_keys))
    i2t = ranked(scores_i2t, n_i)
    t2i = ranked(scores_t2i, n_t)
    return {"format": RESULT_FORMAT, "top_n": int(top_n), "k_test": dict(k_test),
            "i2t": [{"image": image_keys[i], "texts": [text_keys[int(t)] for t in row]}
                    for i, row in enumerate(i2t)],
            "t2i": [{"text": text_keys[t], "caption": captions[t],
                     "images": [image_keys[int(i)] for i in row]}
                    for t, row in enumerate(t2i)]}


def _annotation_keys(annotations_path: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({image key: its text keys}, {text key: image key}) of an official eval json."""
    records = checks.read_json(annotations_path, "annotations")
    if not isinstance(records, list):
        raise ValueError(f"{annotations_path}: expected a JSON array of eval records "
                         "({'image', 'caption': [...]})")
    img2txt: dict[str, list[str]] = {}
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("image"), str):
            continue
        caps = r.get("caption")
        caps = [caps] if isinstance(caps, str) else caps if isinstance(caps, list) else []
        caps = [c for c in caps if isinstance(c, str) and c.strip()]  # as formats.retrieval.read
        img2txt.setdefault(r["image"], []).extend(
            text_key(r["image"], j) for j in range(len(caps)))
    txt2img = {t: i for i, ts in img2txt.items() for t in ts}
    return img2txt, txt2img


def score_file(results_path: str, annotations_path: str) -> dict:
    """Recalls of a `retrieval_result.json` against the official eval json it was made from.

    Every query of the result file must be in the annotations; the recalls are over the
    result's queries (an evaluation drops images whose file is missing, and their captions).
    Returns `METRIC_NAMES` plus num_images, num_texts and missing_queries (annotation queries
    absent from the result file)."""
    res = checks.read_json(results_path)
    if not isinstance(res, dict) or res.get("format") != RESULT_FORMAT:
        raise checks.ScoreInputError(f"{results_path}: not a retrieval result file (format "
                                     f"{RESULT_FORMAT!r})")
    top_n = res.get("top_n")
    if not checks.INT[0](top_n) or top_n < 1:
        raise checks.ScoreInputError(f"{results_path}: 'top_n' must be a positive integer, "
                                     f"got {top_n!r:.40}")
    checks.check_rows(results_path, res.get("i2t"), {"image": checks.STR,
                                                     "texts": checks.list_of(checks.STR)},
                      key="image", what="image queries", label="i2t entry")
    checks.check_rows(results_path, res.get("t2i"), {"text": checks.STR,
                                                     "images": checks.list_of(checks.STR)},
                      key="text", what="text queries", label="t2i entry")
    img2txt, txt2img = _annotation_keys(annotations_path)
    i2t_rank, t2i_rank = [], []
    for q in res["i2t"]:
        if q["image"] not in img2txt:
            raise checks.ScoreInputError(f"{results_path}: result image {q['image']!r} is not "
                                         f"in {annotations_path}")
        pos = [j for j, t in enumerate(q["texts"]) if t in set(img2txt[q["image"]])]
        i2t_rank.append(pos[0] if pos else top_n)
    for q in res["t2i"]:
        if q["text"] not in txt2img:
            raise checks.ScoreInputError(f"{results_path}: result text {q['text']!r} is not in "
                                         f"{annotations_path}")
        pos = [j for j, i in enumerate(q["images"]) if i == txt2img[q["text"]]]
        t2i_rank.append(pos[0] if pos else top_n)
    out = recall_metrics(np.asarray(i2t_rank), np.asarray(t2i_rank))
    out.update(num_images=len(i2t_rank), num_texts=len(t2i_rank),
               missing_queries=len(img2txt) - len(i2t_rank) + len(txt2img) - len(t2i_rank))
    return out
