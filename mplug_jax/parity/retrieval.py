"""Retrieval parity with the official task fixtures
(docs/fixtures.md#retrieval-and-grounding-fixtures).

Retrieval (`meta.json task == "retrieval"`, docs/fixtures.md#retrieval-fixtures): the official
checkpoint (no decoder) is loaded into our MPLUG, and we re-run
  * preprocessing: image test transform, `pre_caption(., 30)`, tokenisation (30 ids at
    evaluation, longest padding in training), the text/image numbering;
  * the official `evaluation()` (docs/fixtures.md#retrieval-evaluation): features, cosine
    similarities, top-k candidates, ITM re-scoring, score matrices, then `itm_eval`
    (docs/fixtures.md#retrieval-evaluation) on them and on the synthetic metric case;
  * the training forward (docs/fixtures.md#retrieval-training-forward) on the stored weights and
    queues, with the recorded hard-negative draws injected: momentum update, ITC with idx positives
    and distillation, queue update, ITM with hard negatives.
Every expected array is compared within `meta.json float64_check.suggested_atol` (the arrays in
`float64_check.exact` exactly), giving one `Row` each.
"""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.data.ops import text as text_norm
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.interop.convert import Converted, load_official
from mplug_jax.interop.official_keys import HEADS_ABSENT_IN_TASK_CHECKPOINTS
from mplug_jax.parity.rows import Row, compare_arrays, image_row, nhwc
from mplug_jax.scoring import retrieval as R

# A retrieval checkpoint has no text decoder (and no MLM head): those keep their fresh init.
RETRIEVAL_ALLOW_MISSING = HEADS_ABSENT_IN_TASK_CHECKPOINTS + r"|^decoder(/|$)"
EVAL_MAX_LEN = 30
OFFICIAL_MOMENTUM = 0.995  # hard-coded in the official init_distill (quirk R9)
# Arrays of expected.npz that are inputs of the check, not outputs
# (docs/fixtures.md#retrieval-arrays).
_GIVEN = ("metric_case_scores_i2t", "metric_case_scores_t2i", "metric_case_img2txt",
          "metric_case_txt2img")


@functools.partial(jax.jit, static_argnums=0)
def _image_side(model, params, image):
    """CLIP output float32[B, T, Wv], image states [B, T, H], ITC feature [B, E]."""
    def f(m, x):
        vis = m.vision(x)
        states = m.visn_ln(m.visn_fc(vis)) if m.has_visn_fc else vis
        return vis, states, m.itc_project(states[:, 0], states[:, 0])[0]
    return model.apply({"params": params}, image, method=f)


@functools.partial(jax.jit, static_argnums=0)
def _text_side(model, params, ids, mask):
    """Text states float32[B, L, H] and ITC feature [B, E]."""
    def f(m, ids, mask):
        states = m.encode_text(ids, mask)
        return states, m.itc_project(states[:, 0], states[:, 0])[1]
    return model.apply({"params": params}, ids, mask, method=f)


@functools.partial(jax.jit, static_argnums=0)
def _pair_side(model, params, img, txt, mask):
    """Fusion text CLS float32[P, H] and ITM logits [P, 2] of P (image, text) pairs."""
    def f(m, img, txt, mask):
        cls = m.fuse(img, txt, mask)[1][:, 0]
        return cls, m.itm_logits(cls)
    return model.apply({"params": params}, img, txt, mask, method=f)


@jax.jit
def _ema(params_m, params, momentum):
    return jax.tree.map(lambda pm, p: pm * momentum + p * (1.0 - momentum), params_m, params)


def _encode(model, params, image, ids, mask) -> dict[str, jax.Array]:
    """Image / text states and normalised ITC features of one parameter set."""
    vis, img_s, img_f = _image_side(model, params, image)
    txt_s, txt_f = _text_side(model, params, ids, mask)
    return dict(visual_ln_post=vis, image_states=img_s, image_feat=img_f, text_states=txt_s,
                text_feat=txt_f)


def _fused_cls_and_itm(model, params, img_states, txt_states, txt_mask, img_rows, txt_rows,
                       chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Fusion text CLS float32[P, H] and ITM logits float32[P, 2] of the pairs
    (image img_rows[p], text txt_rows[p]), in chunks of `chunk` pairs (the last one padded,
    so that every call has the same shape and compiles once)."""
    n = len(img_rows)
    pad = -n % chunk
    img_rows = np.concatenate([np.asarray(img_rows), np.zeros(pad, np.int64)])
    txt_rows = np.concatenate([np.asarray(txt_rows), np.zeros(pad, np.int64)])
    cls_out, logit_out = [], []
    for s in range(0, n + pad, chunk):
        ir, tr = img_rows[s:s + chunk], txt_rows[s:s + chunk]
        cls, logits = _pair_side(model, params, img_states[ir], txt_states[tr], txt_mask[tr])
        cls_out.append(np.asarray(cls, np.float32))
        logit_out.append(np.asarray(logits, np.float32))
    return np.concatenate(cls_out)[:n], np.concatenate(logit_out)[:n]


def retrieval_evaluation(model, params, image: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                         k_test: int) -> dict[str, np.ndarray]:
    """The official retrieval `evaluation()` (docs/fixtures.md#retrieval-evaluation), all rows in
    one process.

    Args:
      model, params: our MPLUG (large-style vision, quirk R1) and its params.
      image: float32[NI, 3, R, R] test-transformed images (official NCHW layout).
      ids, mask: int[NT, L] evaluation text ids / attention mask.
      k_test: candidates per query (<= NI and <= NT).
    Returns:
      numpy arrays named as in docs/fixtures.md#retrieval-arrays (features, `sims_matrix`,
      `{i2t,t2i}_topk_sim`, `_topk_idx`, `_fusion_cls`, `_itm_logits`, `score_matrix_{i2t,t2i}`).
    """
    if not model.has_visn_fc:
        raise ValueError("the official retrieval evaluation needs a large-style model "
                         "(visn_fc + visn_layer_norm; docs/fixtures.md#retrieval-quirks, R1)")
    ni, nt = image.shape[0], ids.shape[0]
    if not 1 <= k_test <= min(ni, nt):
        raise ValueError(f"k_test={k_test} must be in [1, min(#images={ni}, #texts={nt})]")
    mask_j = jnp.asarray(mask, jnp.int32)
    enc = _encode(model, params, nhwc(image), jnp.asarray(ids, jnp.int32), mask_j)
    out = {k: np.asarray(v, np.float32) for k, v in enc.items()}
    sims = out["image_feat"] @ out["text_feat"].T
    out["sims_matrix"] = sims
    img_s, txt_s = enc["image_states"], enc["text_states"]
    for name, mat, n_items in (("i2t", sims, nt), ("t2i", sims.T, ni)):
        top_sim, top_idx = R.topk_candidates(mat, k_test)
        queries = np.repeat(np.arange(mat.shape[0]), k_test)
        items = top_idx.reshape(-1)
        img_rows, txt_rows = (queries, items) if name == "i2t" else (items, queries)
        cls, logits = _fused_cls_and_itm(model, params, img_s, txt_s, mask_j, img_rows, txt_rows)
        out[f"{name}_topk_sim"], out[f"{name}_topk_idx"] = top_sim, top_idx
        out[f"{name}_fusion_cls"] = cls.reshape(mat.shape[0], k_test, -1)
        out[f"{name}_itm_logits"] = logits.reshape(mat.shape[0], k_test, 2)
        out[f"score_matrix_{name}"] = R.score_matrix(top_idx, out[f"{name}_itm_logits"], n_items)
    return out


def retrieval_train_forward(model, params, params_m, queues: dict[str, np.ndarray],
                            image: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                            idx: np.ndarray, alpha: float, neg_image_idx: np.ndarray,
                            neg_text_idx: np.ndarray,
                            momentum: float = OFFICIAL_MOMENTUM) -> dict[str, np.ndarray]:
    """The official retrieval `MPLUG.forward(image, text, alpha, idx)` in eval mode
    (docs/fixtures.md#retrieval-training-forward), with the hard negatives given instead of drawn.

    Args:
      params, params_m: plain (unboxed) main and momentum param trees.
      queues: `Converted.queues()` layout: image_queue/text_queue float32[Q, E], idx_queue
        int[Q], queue_ptr int[].
      image: float32[bs, 3, R, R]; ids, mask: int[bs, L]; idx: int[bs] image ids.
      alpha: distillation weight; neg_image_idx / neg_text_idx: int[bs] recorded draws.
    Returns:
      numpy arrays named as the `train_*` arrays of docs/fixtures.md#retrieval-arrays (without the
      prefix), queues in the official [E, Q] layout.
    """
    f32 = jnp.float32
    bs = image.shape[0]
    q = queues["image_queue"].shape[0]
    if q % bs:
        raise ValueError(f"queue size {q} must be a multiple of the batch size {bs} "
                         "(the official _dequeue_and_enqueue asserts it)")
    ptr = int(queues["queue_ptr"])
    x, ids_j, mask_j = nhwc(image), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    idx_j = jnp.asarray(idx, jnp.int32)
    main = _encode(model, params, x, ids_j, mask_j)
    # Momentum update first, then the momentum features (R9). Unpaired params (fusion, heads)
    # are identical in both trees and unused by the momentum side.
    params_m = _ema(params_m, params, momentum)
    mom = _encode(model, params_m, x, ids_j, mask_j)
    temp = jnp.asarray(params["temp"], f32).reshape(())  # not clamped in this model (R10)
    idx_all = jnp.concatenate([idx_j, jnp.asarray(queues["idx_queue"], jnp.int32)])
    pos = (idx_j[:, None] == idx_all[None, :]).astype(f32)
    sim_targets = pos / pos.sum(1, keepdims=True)
    img_all = jnp.concatenate([mom["image_feat"], jnp.asarray(queues["image_queue"], f32)])
    txt_all = jnp.concatenate([mom["text_feat"], jnp.asarray(queues["text_queue"], f32)])
    o = {}
    o["sim_i2t_m"] = mom["image_feat"] @ txt_all.T / temp
    o["sim_t2i_m"] = mom["text_feat"] @ img_all.T / temp
    o["sim_i2t_targets"] = alpha * jax.nn.softmax(o["sim_i2t_m"], 1) + (1 - alpha) * sim_targets
    o["sim_t2i_targets"] = alpha * jax.nn.softmax(o["sim_t2i_m"], 1) + (1 - alpha) * sim_targets
    o["sim_i2t"] = main["image_feat"] @ txt_all.T / temp
    o["sim_t2i"] = main["text_feat"] @ img_all.T / temp
    o["loss_i2t"] = -jnp.mean(jnp.sum(jax.nn.log_softmax(o["sim_i2t"], 1)
                                      * o["sim_i2t_targets"], 1))
    o["loss_t2i"] = -jnp.mean(jnp.sum(jax.nn.log_softmax(o["sim_t2i"], 1)
                                      * o["sim_t2i_targets"], 1))
    o["loss_ita"] = (o["loss_i2t"] + o["loss_t2i"]) / 2
    o["sim_targets"] = sim_targets
    # Enqueue after the ITC loss (R12).
    o["image_queue_after"] = jnp.asarray(queues["image_queue"], f32).at[ptr:ptr + bs].set(
        mom["image_feat"]).T
    o["text_queue_after"] = jnp.asarray(queues["text_queue"], f32).at[ptr:ptr + bs].set(
        mom["text_feat"]).T
    o["idx_queue_after"] = np.asarray(queues["idx_queue"], np.int64).copy().reshape(1, -1)
    o["idx_queue_after"][0, ptr:ptr + bs] = np.asarray(idx)
    o["queue_ptr_after"] = np.array([(ptr + bs) % q], np.int64)
    # ITM with hard negatives: masked softmax weights (not renormalised, R11).
    same = idx_j[:, None] == idx_j[None, :]
    o["weights_i2t"] = jnp.where(same, 0.0, jax.nn.softmax(o["sim_i2t"][:, :bs], 1))
    o["weights_t2i"] = jnp.where(same, 0.0, jax.nn.softmax(o["sim_t2i"][:, :bs], 1))
    neg_img, neg_txt = np.asarray(neg_image_idx), np.asarray(neg_text_idx)
    img_s, txt_s = main["image_states"], main["text_states"]
    rows = np.arange(bs)
    cls_pos, logit_pos = _fused_cls_and_itm(model, params, img_s, txt_s, mask_j, rows, rows)
    cls_neg, logit_neg = _fused_cls_and_itm(
        model, params, img_s, txt_s, mask_j, np.concatenate([neg_img, rows]),
        np.concatenate([rows, neg_txt]))
    o["fusion_cls_pos"], o["fusion_cls_neg"] = cls_pos, cls_neg
    logits = np.concatenate([logit_pos, logit_neg])
    labels = np.concatenate([np.ones(bs, np.int64), np.zeros(2 * bs, np.int64)])
    o["itm_logits"], o["itm_labels"] = logits, labels
    lj = jnp.asarray(logits)
    o["loss_itm"] = jnp.mean(jax.nn.logsumexp(lj, 1) - lj[np.arange(3 * bs), labels])
    for name in ("image_states", "image_feat", "text_feat"):
        o[name] = main[name]
    o["image_states_m"] = mom["image_states"]
    o["image_feat_m"], o["text_feat_m"] = mom["image_feat"], mom["text_feat"]
    return {k: np.asarray(v) for k, v in o.items()}


def _drawn_from_weights(weights: np.ndarray, drawn: np.ndarray) -> int:
    """Number of recorded multinomial draws that had zero weight (impossible draws)."""
    drawn = np.asarray(drawn).reshape(-1)
    if drawn.shape[0] != weights.shape[0] or drawn.min() < 0 or drawn.max() >= weights.shape[1]:
        return max(1, drawn.shape[0])
    return int(np.sum(weights[np.arange(len(drawn)), drawn] <= 0))


def _check_retrieval_text(fixture_text: dict, inputs: dict) -> list[Row]:
    """Caption normalisation, tokenisation and numbering of
    docs/fixtures.md#retrieval-files-and-preprocessing."""
    tok = get_tokenizer()
    rows = []
    ev = fixture_text.get("eval_texts", [])
    bad = sum(text_norm.pre_caption(t["raw"], EVAL_MAX_LEN) != t["pre_caption_30"]
              or t["fed_to_tokenizer"] != t["pre_caption_30"] for t in ev)
    rows.append(Row("text:pre_caption", (len(ev),), float(bad), 0.0, bad == 0,
                    "mismatching strings"))
    want = inputs["text_input_ids"]
    ids, mask = tok.encode([t["fed_to_tokenizer"] for t in ev], max_length=EVAL_MAX_LEN,
                           pad_to=want.shape[1])
    bad = int(np.sum(np.any(ids != want, 1) | np.any(mask != inputs["text_attention_mask"], 1)))
    rows.append(Row("tokenizer:eval_texts", tuple(want.shape), float(bad), 0.0, bad == 0,
                    "mismatching rows"))
    # Numbering: texts image by image, caption by caption (re_eval_dataset).
    txt2img, img2txt = [], []
    for i, rec in enumerate(fixture_text.get("annotation_test_json", [])):
        caps = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        img2txt.append(list(range(len(txt2img), len(txt2img) + len(caps))))
        txt2img += [i] * len(caps)
    ok = (txt2img == inputs["txt2img"].tolist() and img2txt == inputs["img2txt"].tolist())
    rows.append(Row("text:txt2img/img2txt", tuple(inputs["txt2img"].shape), float(not ok), 0.0,
                    ok, "numbering differs"))
    tr = fixture_text.get("train_texts", [])
    if tr and "train_text_input_ids" in inputs:
        want = inputs["train_text_input_ids"]
        ids, mask = tok.encode([t["fed_to_tokenizer"] for t in tr])  # longest, no truncation
        bad = int(ids.shape != want.shape) or int(
            np.sum(np.any(ids != want, 1) | np.any(mask != inputs["train_text_attention_mask"],
                                                   1)))
        rows.append(Row("tokenizer:train_texts", tuple(want.shape), float(bad), 0.0, bad == 0,
                        "mismatching rows"))
    return rows


def retrieval_outputs(fixture: str, conv: Converted | None = None) -> dict[str, np.ndarray]:
    """Everything our code computes for a retrieval fixture, named as in expected.npz.

    `conv`: the fixture checkpoint already loaded (loaded from the folder when None).
    """
    def path(*p):
        return os.path.join(fixture, *p)
    inputs = dict(np.load(path("inputs.npz"), allow_pickle=False))
    expected = dict(np.load(path("expected.npz"), allow_pickle=False))
    if conv is None:
        conv = load_official(path("model.safetensors"), path("config_bert.json"),
                             path("config.yaml"), allow_missing=RETRIEVAL_ALLOW_MISSING)
    params = nn.meta.unbox(conv.params)
    got: dict[str, np.ndarray] = {}
    with jax.default_matmul_precision("highest"):
        got.update(retrieval_evaluation(conv.model, params, inputs["image"],
                                        inputs["text_input_ids"], inputs["text_attention_mask"],
                                        int(inputs["k_test"])))
        got["i2t_rank"], got["t2i_rank"] = R.retrieval_ranks(
            got["score_matrix_i2t"], got["score_matrix_t2i"], inputs["txt2img"],
            inputs["img2txt"])
        got["metrics"] = np.array(list(R.recall_metrics(got["i2t_rank"], got["t2i_rank"])
                                       .values()), np.float64)
        if "metric_case_scores_i2t" in expected:
            r = R.retrieval_ranks(expected["metric_case_scores_i2t"],
                                  expected["metric_case_scores_t2i"],
                                  expected["metric_case_txt2img"], expected["metric_case_img2txt"])
            got["metric_case_i2t_rank"], got["metric_case_t2i_rank"] = r
            got["metric_case_metrics"] = np.array(list(R.recall_metrics(*r).values()),
                                                  np.float64)
        if "train_image" in inputs:
            if conv.momentum is None:
                raise ValueError(f"{fixture}: the checkpoint has no momentum (*_m) copies, "
                                 "which the training forward needs (quirk R8)")
            train = retrieval_train_forward(
                conv.model, params, nn.meta.unbox(conv.momentum), conv.queues(),
                inputs["train_image"], inputs["train_text_input_ids"],
                inputs["train_text_attention_mask"], inputs["train_idx"],
                float(inputs["train_alpha"]), expected["train_neg_image_idx"],
                expected["train_neg_text_idx"])
            got.update({f"train_{k}": v for k, v in train.items()})
    return got


def check_retrieval_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                            meta: dict) -> list[Row]:
    """Compare `retrieval_outputs` with expected.npz (tolerances / exact list of meta.json);
    the recorded hard-negative draws (inputs for us) are checked to have non-zero weight."""
    f64 = meta["float64_check"]
    exact = set(f64.get("exact", ()))
    draws = ("train_neg_image_idx", "train_neg_text_idx")
    rows = compare_arrays(got, expected, f64["suggested_atol"], exact,
                          skip=set(_GIVEN) | set(draws))
    for name, w in zip(draws, ("train_weights_t2i", "train_weights_i2t")):
        if name in expected and w in got:
            bad = _drawn_from_weights(got[w], expected[name])
            rows.append(Row(name, tuple(expected[name].shape), float(bad), 0.0, bad == 0,
                            "drawn where our weight is 0"))
    return rows


def run_retrieval_parity(fixture: str, meta: dict, image_atol: float = 1e-4,
                         conv: Converted | None = None) -> list[Row]:
    """All retrieval checks of one fixture folder (docs/fixtures.md#retrieval-fixtures and
    #checking-and-tolerances)."""
    return retrieval_parity_rows(fixture, meta, retrieval_outputs(fixture, conv), image_atol)


def retrieval_parity_rows(fixture: str, meta: dict, got: dict[str, np.ndarray],
                          image_atol: float = 1e-4) -> list[Row]:
    """Preprocessing checks of the fixture folder plus the comparison of `got` (the output of
    `retrieval_outputs`) with its expected.npz."""
    def path(*p):
        return os.path.join(fixture, *p)
    inputs = dict(np.load(path("inputs.npz"), allow_pickle=False))
    expected = dict(np.load(path("expected.npz"), allow_pickle=False))
    with open(path("text.json")) as f:
        rows = _check_retrieval_text(json.load(f), inputs)
    rows.append(image_row(fixture, meta["images"], inputs["image"], image_atol))
    if "train_image" in inputs:
        err = float(np.abs(inputs["image"][inputs["train_image_index"]]
                           - inputs["train_image"]).max())
        rows.append(Row("preprocess:train_image", tuple(inputs["train_image"].shape), err,
                        image_atol, err <= image_atol))
    return rows + check_retrieval_outputs(got, expected, meta)
