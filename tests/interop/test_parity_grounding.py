"""Grounding parity with the official fixture (../shared/fixtures-tasks/grounding-tiny): the
RefCOCO eval transform, the forward, the greedy decode restricted to the coordinate tokens,
IoU / Acc@0.5 and the training loss; plus hand-computed box cases and a corrupted array."""
import numpy as np
import pytest

from mplug_jax.parity import grounding as grounding_parity
from mplug_jax.scoring import grounding as G
from task_fixtures import check_entry_point, task_fixture

needs_fixture, computed = task_fixture(grounding_parity)


@needs_fixture
def test_grounding_parity_on_official_fixture(computed, monkeypatch):
    # Through the generic entry point (dispatch on meta.json task), reusing the computed arrays.
    check_entry_point(grounding_parity, computed, monkeypatch,
                      required={"preprocess:image", "preprocess:gt_box", "tokenizer:phrases"})
    meta, got, _ = computed
    res = meta["results"]
    np.testing.assert_allclose(got["pred_box"], res["pred_box"], atol=1e-7)
    assert float(got["accuracy"]) == pytest.approx(res["accuracy"], abs=1e-12)
    assert float(got["train_loss"]) == pytest.approx(res["train_loss_seq"], abs=2e-6)


@needs_fixture
def test_corrupted_expected_arrays_fail_their_rows(computed):
    meta, got, expected = computed
    tol = meta["float64_check"]["suggested_atol"]
    bad = dict(expected)
    bad["decode_tokens"] = expected["decode_tokens"].copy()
    bad["decode_tokens"][1, 2] += 1
    bad["iou"] = expected["iou"] + np.eye(len(expected["iou"]))[2] * 3 * tol["iou"]
    bad["train_loss"] = expected["train_loss"] + 3 * tol["train_loss"]
    bad["decode_step_scores_raw"] = expected["decode_step_scores_raw"].copy()
    bad["decode_step_scores_raw"][0, 0, 7] += 3 * tol["decode_step_scores_raw"]
    rows = grounding_parity.check_grounding_outputs(got, bad, meta)
    failed = {r.name for r in rows if not r.ok}
    assert failed == {"decode_tokens", "iou", "train_loss", "decode_step_scores_raw"}


def test_box_conversions_and_iou_hand_computed():
    box = np.array([[0.5, 0.5, 0.4, 0.2]], np.float32)
    xyxy = G.cxcywh_to_xyxy(box)
    np.testing.assert_allclose(xyxy, [[0.3, 0.4, 0.7, 0.6]], atol=1e-7)
    np.testing.assert_allclose(G.xyxy_to_cxcywh(xyxy), box, atol=1e-7)
    # gt [0, 0, 0.5, 0.5] (area 0.25) vs pred [0.25, 0, 0.75, 0.5]: inter 0.125, union 0.375.
    gt = np.array([[0.25, 0.25, 0.5, 0.5]])
    pred = np.array([[0.5, 0.25, 0.5, 0.5]])
    assert G.bbox_iou(pred, gt)[0] == pytest.approx(1 / 3)
    # Only the prediction is clamped: [0.8, 0, 1.2, 0.4] -> [0.8, 0, 1, 0.4] (area 0.08);
    # gt [0.9, 0, 1.1, 0.4] (area 0.08, outside the frame kept): inter 0.04, IoU 0.04 / 0.12.
    iou = G.bbox_iou([[1.0, 0.2, 0.4, 0.4]], [[1.0, 0.2, 0.2, 0.4]])
    assert iou[0] == pytest.approx(1 / 3)
    assert G.bbox_iou([[0.1, 0.1, 0.1, 0.1]], [[0.9, 0.9, 0.1, 0.1]])[0] == 0.0
    n, acc = G.accuracy_at([0.5, 0.49, 0.7, 0.0])
    assert (n, acc) == (2, 0.5)
    m = G.grounding_metrics(np.vstack([pred, gt]), np.vstack([gt, gt]))
    assert m["miou"] == pytest.approx((1 / 3 + 1) / 2) and m["accu_num"] == 1
    # GIoU of the disjoint pair above: enclosing box 0.9 x 0.9, union 0.02.
    giou = G.generalized_box_iou(G.cxcywh_to_xyxy(np.array([[0.1, 0.1, 0.1, 0.1]])),
                                 G.cxcywh_to_xyxy(np.array([[0.9, 0.9, 0.1, 0.1]])))
    assert giou[0, 0] == pytest.approx(-(0.81 - 0.02) / 0.81, abs=1e-4)
    with pytest.raises(ValueError, match="last axis of 4"):
        G.bbox_iou([[0.5, 0.5, 0.1]], [[0.5, 0.5, 0.1]])
    with pytest.raises(ValueError, match="x2 >= x1"):
        G.xyxy_to_cxcywh([[0.5, 0.1, 0.4, 0.2]])
    with pytest.raises(ValueError, match="w >= 0"):
        G.bbox_iou([[0.5, 0.5, 0.1, 0.1]], [[0.5, 0.5, -0.1, 0.1]])
    with pytest.raises(ValueError, match="NaN"):
        G.cxcywh_to_xyxy([[np.nan, 0, 0, 0]])


def test_coordinate_token_quantisation():
    # floor(c * 336) + 345, clamped to [0, 1]; back: (id - 345) / 336.
    t = G.coords_to_tokens([0.0, 1.0, 0.5, -0.2, 1.7, 0.999])
    assert t.tolist() == [345, 681, 513, 345, 681, 345 + 335]
    np.testing.assert_allclose(G.tokens_to_coords(t[:3]), [0.0, 1.0, 0.5])
    # Round trip: every bin centre maps back to its own token.
    ids = np.arange(G.FIRST_COORD_ID, G.LAST_COORD_ID + 1)
    c = G.tokens_to_coords(ids)
    assert c.dtype == np.float32 and len(c) == 337
    # (the last bin: 1 + half a bin is clamped to 1 -> 681)
    assert G.coords_to_tokens(c + np.float32(0.5 / 336)).tolist() == ids.tolist()
    with pytest.raises(ValueError, match=r"ids must be in \[345, 681\]"):
        G.tokens_to_coords([344])
