"""Retrieval parity with the official fixture (../shared/fixtures-tasks/retrieval-tiny): the
official evaluation (similarity top-k + ITM re-ranking), itm_eval recalls and the training
forward; plus hand-computed recall cases and a corrupted expected array."""
import numpy as np
import pytest

from mplug_jax.parity import retrieval as retrieval_parity
from mplug_jax.scoring import retrieval as R
from task_fixtures import check_entry_point, task_fixture

needs_fixture, computed = task_fixture(retrieval_parity)


@needs_fixture
def test_retrieval_parity_on_official_fixture(computed, monkeypatch):
    # Through the generic entry point (dispatch on meta.json task), reusing the computed arrays;
    # the given arrays are inputs, not outputs.
    check_entry_point(retrieval_parity, computed, monkeypatch,
                      required={"tokenizer:eval_texts", "tokenizer:train_texts",
                                "preprocess:image"}, given=retrieval_parity._GIVEN)
    meta, got, _ = computed
    metrics = dict(zip(R.METRIC_NAMES, got["metrics"]))
    assert metrics == meta["metrics"]
    assert float(got["train_loss_ita"]) == pytest.approx(3.2627, abs=1e-4)
    assert float(got["train_loss_itm"]) == pytest.approx(0.737343, abs=1e-6)


@needs_fixture
def test_corrupted_expected_arrays_fail_their_rows(computed):
    meta, got, expected = computed
    bad = dict(expected)
    tol = meta["float64_check"]["suggested_atol"]
    cand = int(expected["i2t_topk_idx"][0, 0])
    bad["score_matrix_i2t"] = expected["score_matrix_i2t"].copy()
    bad["score_matrix_i2t"][0, cand] += 3 * tol["score_matrix_i2t"]
    bad["t2i_rank"] = expected["t2i_rank"].copy()
    bad["t2i_rank"][0] += 1
    bad["metrics"] = expected["metrics"] + np.eye(9)[4] * 1e-6
    bad["train_loss_itm"] = expected["train_loss_itm"] + 3 * tol["train_loss_itm"]
    # Text b for image b: same idx, weight 0, a draw multinomial cannot make.
    bad["train_neg_text_idx"] = np.arange(len(expected["train_neg_text_idx"]))
    rows = retrieval_parity.check_retrieval_outputs(got, bad, meta)
    failed = {r.name for r in rows if not r.ok}
    assert failed == {"score_matrix_i2t", "t2i_rank", "metrics", "train_loss_itm",
                      "train_neg_text_idx"}


def test_recall_several_captions_per_image_hand_computed():
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    s_i2t = np.array([[0.1, 0.9, 0.5, 0.3, 0.2, 0.0],    # order t1 ...: best GT t1 at 0
                      [0.8, 0.7, 0.1, 0.6, 0.2, 0.3],    # t0 t1 t3 t5 t4 t2: t3 at 2, t2 at 5
                      [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])   # t4 at 4, t5 at 5
    s_t2i = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.2], [0.3, 0.2, 0.1],
                      [0.1, 0.5, 0.2], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3]])
    i2t, t2i = R.retrieval_ranks(s_i2t, s_t2i, txt2img, img2txt)
    assert i2t.tolist() == [0, 2, 4]
    assert t2i.tolist() == [0, 2, 1, 0, 2, 0]
    m = R.itm_eval(s_i2t, s_t2i, txt2img, np.array(img2txt))
    assert list(m) == list(R.METRIC_NAMES)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == m["txt_r10"] == 100.0
    assert m["img_r1"] == 50.0 and m["img_r5"] == m["img_r10"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["r_mean"] == pytest.approx(((100 / 3 + 200) / 3 + 250 / 3) / 2)


def test_recall_at_5_and_10_hand_computed():
    s_i2t = np.tile(-np.arange(12.0), (2, 1))  # texts in index order for both images
    txt2img = [0] * 12
    txt2img[10] = 1
    s_t2i = np.tile([1.0, 0.0], (12, 1))       # image 0 always first
    i2t, t2i = R.retrieval_ranks(s_i2t, s_t2i, txt2img, [[5, 11], [10]])
    assert i2t.tolist() == [5, 10] and t2i.tolist() == [0] * 10 + [1, 0]
    m = R.recall_metrics(i2t, t2i)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (0.0, 0.0, 50.0)
    assert m["img_r1"] == pytest.approx(1100 / 12) and m["img_r5"] == 100.0


def test_official_score_matrix_from_candidates():
    sims = np.array([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.1]], np.float32)
    top_sim, top_idx = R.topk_candidates(sims, 2)
    assert top_idx.tolist() == [[0, 3], [1, 2]]
    np.testing.assert_array_equal(top_sim, np.float32([[0.9, 0.7], [0.8, 0.3]]))
    logits = np.array([[[5.0, -1.0], [0.0, 2.0]], [[1.0, 3.0], [0.0, -4.0]]])
    s = R.score_matrix(top_idx, logits, 4)
    # Raw class-1 logit at the candidates only (the similarity is not added), -100 elsewhere.
    np.testing.assert_array_equal(s, [[-1.0, -100, -100, 2.0], [-100, 3.0, -4.0, -100]])
    assert s.dtype == np.float32
    with pytest.raises(ValueError, match="k_test=5"):
        R.topk_candidates(sims, 5)
    with pytest.raises(ValueError, match="itm_logits shape"):
        R.score_matrix(top_idx, logits[..., :1], 4)
    with pytest.raises(ValueError, match="img2txt has 1 entries for 2 images"):
        R.retrieval_ranks(sims, sims.T, [0, 0, 1, 1], [[0]])
