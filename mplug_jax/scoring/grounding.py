"""Grounding box arithmetic and metrics of the official mPLUG RefCOCO code
(`vgTools/utils/box_utils.py`, `eval_utils.py`, `models/model_grounding_mplug.py`), in numpy.

Boxes are normalised to [0, 1]: `cxcywh` = (centre x, centre y, width, height), `xyxy` =
(x1, y1, x2, y2). A box is 4 coordinates predicted as 4 tokens of a 337-bin coordinate
vocabulary (`[unused340]` .. `[unused676]` = ids 345..681), quantised with the hard-coded 336
(quirk G1 in docs/fixtures.md#grounding-quirks).
"""
from __future__ import annotations

import numpy as np

PREFIX_ID = 344          # [unused339]: the decoder's start token
FIRST_COORD_ID = 345     # [unused340]: coordinate 0
COORD_RES = 336          # official `image_res` overwritten to 336 (G1): 337 bins
NUM_BINS = COORD_RES + 1
LAST_COORD_ID = FIRST_COORD_ID + COORD_RES
METRIC_EPS = 1e-16       # bbox_iou (the metric)
GIOU_EPS = 1e-5          # box_iou / generalized_box_iou (the training weights)


def _boxes(b, name: str) -> np.ndarray:
    a = np.asarray(b)
    if a.ndim < 1 or a.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must have a last axis of 4, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: boxes contain NaN or inf")
    return a


def cxcywh_to_xyxy(b) -> np.ndarray:
    """float[..., 4] (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2), same dtype."""
    b = _boxes(b, "cxcywh_to_xyxy")
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    half = b.dtype.type(0.5) if np.issubdtype(b.dtype, np.floating) else 0.5
    return np.stack([cx - half * w, cy - half * h, cx + half * w, cy + half * h], -1)


def xyxy_to_cxcywh(b) -> np.ndarray:
    """float[..., 4] (x1, y1, x2, y2) -> ((x1 + x2)/2, (y1 + y2)/2, x2 - x1, y2 - y1).

    Raises ValueError for a box with x2 < x1 or y2 < y1."""
    b = _boxes(b, "xyxy_to_cxcywh")
    x1, y1, x2, y2 = np.moveaxis(b, -1, 0)
    if np.any(x2 < x1) or np.any(y2 < y1):
        raise ValueError("xyxy_to_cxcywh: every box needs x2 >= x1 and y2 >= y1")
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def bbox_iou(pred_cxcywh, gt_cxcywh) -> np.ndarray:
    """The official metric IoU (`trans_vg_eval_*` / `bbox_iou`), row by row.

    Only the prediction is clamped to [0, 1] after the corner conversion (G9); the
    denominator gets +1e-16 (G10). Computed in the dtype of the inputs (float32 officially).

    Args:
      pred_cxcywh, gt_cxcywh: float[N, 4] normalised (cx, cy, w, h).
    Returns:
      float[N] IoU.
    """
    p = np.clip(cxcywh_to_xyxy(pred_cxcywh), 0, 1)
    g = cxcywh_to_xyxy(gt_cxcywh)
    if p.shape != g.shape:
        raise ValueError(f"bbox_iou: pred {p.shape} and gt {g.shape} differ")
    if np.any(g[..., 2] < g[..., 0]) or np.any(g[..., 3] < g[..., 1]):
        raise ValueError("bbox_iou: ground-truth boxes need w >= 0 and h >= 0")
    iw = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0, None)
    inter = iw * ih
    area_p = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    return inter / (area_p + area_g - inter + p.dtype.type(METRIC_EPS))


def accuracy_at(iou, threshold: float = 0.5) -> tuple[int, float]:
    """(number of IoU >= threshold, that count / N) as `evaluate()` (Acc@0.5)."""
    iou = np.asarray(iou).reshape(-1)
    if iou.size == 0:
        raise ValueError("accuracy_at: no IoU values")
    n = int(np.sum(iou >= threshold))
    return n, n / iou.size


def grounding_metrics(pred_cxcywh, gt_cxcywh) -> dict[str, float]:
    """{'miou', 'accu', 'accu_num'}: mean IoU and Acc@0.5 of N predictions (`val()` /
    `evaluate()` on one batch)."""
    iou = bbox_iou(pred_cxcywh, gt_cxcywh)
    n, acc = accuracy_at(iou)
    return {"miou": float(np.mean(iou)), "accu": acc, "accu_num": n}


def generalized_box_iou(b1_xyxy, b2_xyxy) -> np.ndarray:
    """Pairwise GIoU float[N, M] of corner boxes (official `generalized_box_iou`, eps 1e-5).

    Raises ValueError for an inverted box (the official code asserts)."""
    a, b = _boxes(b1_xyxy, "generalized_box_iou"), _boxes(b2_xyxy, "generalized_box_iou")
    for x in (a, b):
        if np.any(x[:, 2] < x[:, 0]) or np.any(x[:, 3] < x[:, 1]):
            raise ValueError("generalized_box_iou: every box needs x2 >= x1 and y2 >= y1")
    eps = a.dtype.type(GIOU_EPS)
    area1 = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area2 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / (union + eps)
    lt = np.minimum(a[:, None, :2], b[None, :, :2])
    rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    c = wh[..., 0] * wh[..., 1]
    return iou - (c - union) / (c + eps)


def coords_to_tokens(coords) -> np.ndarray:
    """Official `process_target`: int64 floor(clamp(c, 0, 1) * 336) + 345 (float32 product)."""
    c = np.asarray(coords, np.float32)
    if not np.all(np.isfinite(c)):
        raise ValueError("coords_to_tokens: coordinates contain NaN or inf")
    return np.floor(np.clip(c, 0, 1) * np.float32(COORD_RES)).astype(np.int64) + FIRST_COORD_ID


def tokens_to_coords(tokens) -> np.ndarray:
    """Coordinate token ids (345..681) -> float32 (id - 345) / 336.

    Raises ValueError for an id outside the coordinate vocabulary."""
    t = np.asarray(tokens)
    if t.size and (t.min() < FIRST_COORD_ID or t.max() > LAST_COORD_ID):
        raise ValueError(f"tokens_to_coords: ids must be in [{FIRST_COORD_ID}, "
                         f"{LAST_COORD_ID}], got [{t.min()}, {t.max()}]")
    return (t - FIRST_COORD_ID).astype(np.float32) / np.float32(COORD_RES)


def pixel_iou(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU of corner boxes in pixels, float64[N, 4] x 2 -> [N] (nothing clamped)."""
    iw = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = iw * ih
    union = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1]) + (g[:, 2] - g[:, 0]) * (
        g[:, 3] - g[:, 1]) - inter
    return inter / np.maximum(union, 1e-12)


def score_file(results_path: str, annotations_path: str, *, corners: bool | None = None,
               int_box: bool = False) -> dict:
    """Score a `grounding_result.json` against an official split file.

    Args:
      results_path: JSON list of {"id": position in the split file, "pred_box": [x1, y1, x2,
        y2] original-image pixels, ...} (what the `grounding` evaluator writes).
      annotations_path: the split file (`.pth` list of tuples, read safely, or `.json` list of
        the same): COCO-style (file, _, box, phrase, ...) or flickr (file, box, phrase).
      corners: the split's boxes are [x1, y1, x2, y2] (official for referit and flickr) rather
        than [x, y, w, h] (RefCOCO*); default: corners for flickr tuples only.
      int_box: truncate the box to ints first, as the official `pull_item` does (so x2 =
        int(x) + int(w)); the same switch as the training reader's.
    Returns:
      {'accu': Acc@0.5, 'accu_num', 'miou', 'num': boxes scored, 'num_missing': split records
      without a prediction} - IoU of the pixel boxes as given (the evaluator already clipped
      them to the image; the official metric's padded frame differs only where a prediction
      reaches into the padding).
    Raises:
      ValueError: malformed results, an id outside the split, a duplicate id, no results.
    """
    from mplug_jax.data.formats import grounding as grounding_format
    from mplug_jax.scoring import checks

    results = checks.check_rows(
        results_path, checks.read_json(results_path),
        {"id": checks.INT, "pred_box": checks.list_of(checks.NUMBER, 4)}, key="id",
        what='{"id", "pred_box"} objects')
    with checks.reading_annotations():
        split = grounding_format.load_split_file(annotations_path)
    pred, gt = [], []
    for n, r in enumerate(results):
        i = r["id"]
        if not 0 <= i < len(split):
            raise checks.ScoreInputError(f"{results_path} entry {n}: id {i!r} is not a "
                                         f"position in {annotations_path} ({len(split)} "
                                         "records)")
        rec = split[i]
        flickr = len(rec) == 3  # (file, box, phrase)
        g = [float(v) for v in (rec[1] if flickr else rec[2])]
        if int_box:
            g = [float(int(v)) for v in g]
        if not (flickr if corners is None else corners):
            g = [g[0], g[1], g[0] + g[2], g[1] + g[3]]
        p = _boxes([float(v) for v in r["pred_box"]], f"{results_path} entry {n} pred_box")
        if p[2] < p[0] or p[3] < p[1]:
            raise ValueError(f"{results_path} entry {n}: pred_box needs x2 >= x1, y2 >= y1")
        pred.append(p)
        gt.append(g)
    iou = pixel_iou(np.asarray(pred, np.float64), np.asarray(gt, np.float64))
    n_ok, acc = accuracy_at(iou)
    return {"accu": acc, "accu_num": n_ok, "miou": float(np.mean(iou)), "num": len(iou),
            "num_missing": len(split) - len(results)}
