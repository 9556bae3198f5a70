"""Parity with the official task fixtures described in
docs/fixtures.md#retrieval-and-grounding-fixtures.

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

Grounding (`task == "grounding"`, docs/fixtures.md#grounding-fixtures): the official checkpoint
(text encoder cut to `stride_layer` layers, G4) is loaded into our MPLUG, and we re-run the RefCOCO
eval transform and phrase ids (docs/fixtures.md#grounding-preprocessing), the forward
(docs/fixtures.md#grounding-forward-and-decode), the 4-step greedy decode restricted to the
coordinate tokens by `bbox_prob_mask` (docs/fixtures.md#grounding-forward-and-decode), IoU / Acc@0.5
/ val means (docs/fixtures.md#grounding-metrics) and the teacher-forced training loss with the
official weight broadcasting (docs/fixtures.md#grounding-training-loss, G7).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.data.ops import text as text_norm
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.data.ops.image import load_image
from mplug_jax.interop.convert import Converted, load_official
from mplug_jax.interop.official_keys import HEADS_ABSENT_IN_TASK_CHECKPOINTS
from mplug_jax.interop.parity_rows import Row
from mplug_jax.scoring import retrieval as R

TASKS = ("retrieval", "grounding")
# A retrieval checkpoint has no text decoder (and no MLM head): those keep their fresh init.
RETRIEVAL_ALLOW_MISSING = HEADS_ABSENT_IN_TASK_CHECKPOINTS + r"|^decoder(/|$)"
EVAL_MAX_LEN = 30
OFFICIAL_MOMENTUM = 0.995  # hard-coded in the official init_distill (quirk R9)
# Arrays of expected.npz that are inputs of the check, not outputs
# (docs/fixtures.md#retrieval-arrays).
_GIVEN = ("metric_case_scores_i2t", "metric_case_scores_t2i", "metric_case_img2txt",
          "metric_case_txt2img")


def _nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x, jnp.float32).transpose(0, 2, 3, 1)


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
    enc = _encode(model, params, _nhwc(image), jnp.asarray(ids, jnp.int32), mask_j)
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
    x, ids_j, mask_j = _nhwc(image), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
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


def compare_arrays(got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                   tols: dict[str, float], exact: Any = (), default_tol: float = 1e-5,
                   skip: Any = ()) -> list[Row]:
    """One Row per expected array: max |got - expected| <= tols[name] (default_tol when not
    listed), or exact equality for names in `exact` (integer arrays: count of mismatches)."""
    rows = []
    for name, want in expected.items():
        if name in skip:
            continue
        is_exact = name in exact
        tol = 0.0 if is_exact else float(tols.get(name, default_tol))
        if name not in got:
            rows.append(Row(name, tuple(want.shape), float("inf"), tol, False, "not computed"))
            continue
        g = np.asarray(got[name])
        if g.shape != want.shape:
            rows.append(Row(name, tuple(want.shape), float("inf"), tol, False,
                            f"shape {g.shape}"))
            continue
        if is_exact:
            bad = float(np.sum(g != want))
            rows.append(Row(name, tuple(want.shape), bad, 0.0, bad == 0, "mismatching entries"))
            continue
        err = float(np.abs(g.astype(np.float64) - want).max()) if want.size else 0.0
        rows.append(Row(name, tuple(want.shape), err, tol, bool(err <= tol)))
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
    res = inputs["image"].shape[-1]
    images = meta["images"]
    errs = [np.abs(load_image(path(e["file"]), res).transpose(2, 0, 1) - inputs["image"][i]).max()
            for i, e in enumerate(images[:inputs["image"].shape[0]])]
    err = float(max(errs))
    rows.append(Row("preprocess:image", tuple(inputs["image"].shape), err, image_atol,
                    err <= image_atol))
    if "train_image" in inputs:
        err = float(np.abs(inputs["image"][inputs["train_image_index"]]
                           - inputs["train_image"]).max())
        rows.append(Row("preprocess:train_image", tuple(inputs["train_image"].shape), err,
                        image_atol, err <= image_atol))
    return rows + check_retrieval_outputs(got, expected, meta)


def run_task_parity(fixture: str, meta: dict, image_atol: float = 1e-4) -> list[Row]:
    """Dispatch on `meta.json task` for the fixtures-tasks format."""
    task = meta.get("task")
    if task == "retrieval":
        return run_retrieval_parity(fixture, meta, image_atol)
    if task == "grounding":
        return run_grounding_parity(fixture, meta, image_atol)
    raise ValueError(f"{fixture}: no parity check for task {task!r} (known: {TASKS})")


# ----------------------------------------------------------------------------------------
# Grounding (docs/fixtures.md#grounding-fixtures): coordinate tokens decoded by a prefix decoder.
# ----------------------------------------------------------------------------------------

# The grounding checkpoint has the decoder but none of the ITM / MLM heads.
GROUNDING_ALLOW_MISSING = HEADS_ABSENT_IN_TASK_CHECKPOINTS
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # eval normalisation (quirk G2)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def grounding_eval_image(path: str, res: int) -> tuple[np.ndarray, np.ndarray, float, int, int]:
    """The official RefCOCO eval transform (docs/fixtures.md#grounding-preprocessing) of one photo.

    Returns (image float32[3, R, R], pad mask int64[R, R] (1 = padding), ratio, left, top):
    aspect-preserving bilinear resize of the longer side to R, ImageNet mean/std, zero padding
    centred (top = dh // 2, left = dw // 2)."""
    from PIL import Image
    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    ratio = res / max(w, h)
    new_w, new_h = round(w * ratio), round(h * ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    x = (np.asarray(img, np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    top, left = round((res - new_h) / 2 - 0.1), round((res - new_w) / 2 - 0.1)
    out = np.zeros((3, res, res), np.float32)
    out[:, top:top + new_h, left:left + new_w] = x.transpose(2, 0, 1)
    pad = np.ones((res, res), np.int64)
    pad[top:top + new_h, left:left + new_w] = 0
    return out, pad, ratio, left, top


def grounding_gt_box(xywh_pixels, ratio: float, left: int, top: int, res: int) -> np.ndarray:
    """Pixel [x, y, w, h] -> transformed normalised float32 (cx, cy, w, h)
    (docs/fixtures.md#grounding-preprocessing)."""
    x, y, w, h = xywh_pixels
    box = np.array([x, y, x + w, y + h], np.float32) * np.float32(ratio)
    box[[0, 2]] += left
    box[[1, 3]] += top
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0],
                     box[3] - box[1]], np.float32) / np.float32(res)


def grounding_text_ids(phrase: str, max_query_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] tokenize(phrase.lower())[:L - 2] [SEP]` zero-padded to L (quirk G5): int64[L] x 2."""
    from mplug_jax.data.ops.tokenizer import CLS_ID, PAD_ID, SEP_ID
    ids, _ = get_tokenizer().encode([phrase.lower()])
    body = [int(i) for i in ids[0, 1:] if i != PAD_ID][:max_query_len - 2]
    seq = [CLS_ID] + body + [SEP_ID]
    out = np.zeros(max_query_len, np.int64)
    out[:len(seq)] = seq
    return out, (out != 0).astype(np.int64)


@functools.partial(jax.jit, static_argnums=0)
def _grounding_states(model, params, image, ids, mask):
    """Image / text / fusion states and the decoder memory of
    docs/fixtures.md#grounding-forward-and-decode."""
    def f(m, image, ids, mask):
        vis = m.vision(image)
        img = m.visn_ln(m.visn_fc(vis)) if m.has_visn_fc else vis
        txt = m.encode_text(ids, mask)
        f_img, f_txt = m.fuse(img, txt, mask)
        return vis, img, txt, f_img, f_txt
    return model.apply({"params": params}, image, ids, mask, method=f)


@functools.partial(jax.jit, static_argnums=0)
def _grounding_dec(model, params, seq, states, smask):
    """Raw LM-head scores float32[B, len(seq), V]: causal self-attention only (G6)."""
    return model.apply({"params": params}, seq, jnp.ones_like(seq), states, smask,
                       method=lambda m, *a: m.decode(*a)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _grounding_greedy(model, params, states, smask):
    """`generate.coordinate_greedy` without the cache, with the raw step scores."""
    from mplug_jax import generate
    from mplug_jax.scoring import grounding as G
    return generate.coordinate_greedy(model, params, states, smask, first_id=G.FIRST_COORD_ID,
                                      num_bins=G.NUM_BINS, prefix_id=G.PREFIX_ID,
                                      use_cache=False, return_scores=True)


def grounding_outputs(fixture: str, conv: Converted | None = None) -> dict[str, np.ndarray]:
    """Everything our code computes for a grounding fixture, named as in expected.npz:
    the forward and the restricted greedy decode (docs/fixtures.md#grounding-forward-and-decode),
    the metrics (docs/fixtures.md#grounding-metrics), the training loss
    (docs/fixtures.md#grounding-training-loss) and the synthetic metric case."""
    from mplug_jax.scoring import grounding as G
    from mplug_jax.tasks.grounding import coordinate_loss

    def path(*p):
        return os.path.join(fixture, *p)
    inputs = dict(np.load(path("inputs.npz"), allow_pickle=False))
    expected = dict(np.load(path("expected.npz"), allow_pickle=False))
    if conv is None:
        conv = load_grounding_checkpoint(fixture)
    params = nn.meta.unbox(conv.params)
    model = conv.model
    vocab = model.vocab_size
    if "bbox_prob_mask" in conv.extras:
        prob_mask = np.asarray(conv.extras["bbox_prob_mask"], np.float32).reshape(-1)
    else:
        prob_mask = np.full(vocab, -10000.0, np.float32)
        prob_mask[G.FIRST_COORD_ID:G.LAST_COORD_ID + 1] = 0.0
    coords = slice(G.FIRST_COORD_ID, G.LAST_COORD_ID + 1)
    got: dict[str, np.ndarray] = {}
    gt = inputs["gt_box"].astype(np.float32)
    b = gt.shape[0]
    with jax.default_matmul_precision("highest"):
        ids = jnp.asarray(inputs["text_input_ids"], jnp.int32)
        mask = jnp.asarray(inputs["text_attention_mask"], jnp.int32)
        vis, img, txt, f_img, f_txt = _grounding_states(model, params, _nhwc(inputs["image"]),
                                                        ids, mask)
        if model.has_visn_fc:
            got["visual_ln_post"] = np.asarray(vis)
        got["image_embeds"], got["text_embeds"] = np.asarray(img), np.asarray(txt)
        got["fusion_image"], got["fusion_text"] = np.asarray(f_img), np.asarray(f_txt)
        states = jnp.concatenate([f_img, f_txt], 1)
        smask = jnp.concatenate([jnp.ones(f_img.shape[:2], jnp.int32), mask], 1)
        # Greedy decode restricted to the coordinate vocabulary (generate.coordinate_greedy).
        # The official model recomputes the whole prefix each step (no KV cache); so do we
        # here (use_cache=False), which keeps the step-wise raw scores exactly comparable.
        toks, raw = _grounding_greedy(model, params, states, smask)
        raw = np.asarray(raw)
        seq = np.concatenate([np.full((b, 1), G.PREFIX_ID, np.int64), np.asarray(toks)], 1)
        got["decode_step_scores_raw"] = raw
        got["decode_step_coord_logits"] = (raw + prob_mask)[..., coords]
        got["decode_tokens"] = seq[:, 1:]
        pred = G.tokens_to_coords(seq[:, 1:])
        got["pred_box"] = pred
        got["iou"] = G.bbox_iou(pred, gt)
        n, acc = G.accuracy_at(got["iou"])
        got["accu_num"], got["accuracy"] = np.array(n, np.int64), np.array(acc, np.float64)
        # val(): per-batch means weighted by batch size, in batches of batch_size_train.
        bs = int(_yaml_value(fixture, "batch_size_train", b))
        miou = accu = 0.0
        for s in range(0, b, bs):
            it = got["iou"][s:s + bs]
            miou += float(np.mean(it, dtype=np.float32)) * len(it)
            accu += float(np.float32(np.sum(it >= 0.5)) / np.float32(len(it))) * len(it)
        got["val_miou"], got["val_accu"] = np.array(miou / b), np.array(accu / b)
        # Training loss (docs/fixtures.md#grounding-training-loss), teacher-forced on [344, t].
        t = G.coords_to_tokens(gt)
        dec_in = np.concatenate([np.full((b, 1), G.PREFIX_ID, np.int64), t], 1)
        got["train_target_tokens"], got["train_decoder_input_ids"] = t, dec_in
        got["train_image_embeds"] = got["image_embeds"]
        got["train_fusion_image"], got["train_fusion_text"] = got["fusion_image"], \
            got["fusion_text"]
        raw_t = np.asarray(_grounding_dec(model, params, jnp.asarray(dec_in, jnp.int32), states,
                                          smask))
        masked = raw_t + prob_mask
        got["train_decoder_scores_raw"] = raw_t
        got["train_decoder_coord_logits"] = masked[..., coords]
        # The task's loss (tasks.grounding.coordinate_loss) on the masked coordinate columns.
        loss, aux = coordinate_loss(jnp.asarray(masked[:, :4, coords]), jnp.asarray(gt),
                                    weighting="official")
        aux = {k: np.asarray(v) for k, v in aux.items()}
        got["train_token_nll"] = nll = aux["nll"].astype(np.float32)
        got["train_argmax_tokens"] = aux["argmax"].astype(np.int64) + G.FIRST_COORD_ID
        got["train_pred_box"] = tp = aux["pred"]
        got["train_l1"] = aux["l1"]
        got["train_weight_bbox"] = wb = aux["weight_bbox"]
        got["train_giou_matrix"] = G.generalized_box_iou(G.cxcywh_to_xyxy(tp),
                                                         G.cxcywh_to_xyxy(gt))
        got["train_weight_giou"] = wg = aux["weight_giou"]
        # Official broadcasting (G7), shown term by term: B x 1 x 4 * B x 4 * B x 1.
        terms = nll[:, None, :] * wb[None, :, :] * wg[None, :, None]
        got["train_weighted_terms"] = terms
        got["train_loss"] = np.asarray(loss, np.float32)
    if "metric_case_pred_box" in expected:
        mp, mg = expected["metric_case_pred_box"], expected["metric_case_gt_box"]
        got["metric_case_pred_box"], got["metric_case_gt_box"] = mp, mg
        got["metric_case_iou"] = G.bbox_iou(mp, mg)
        n, acc = G.accuracy_at(got["metric_case_iou"])
        got["metric_case_accu_num"], got["metric_case_accu"] = np.array(n), np.array(acc)
        got["metric_case_giou_diag"] = np.diag(G.generalized_box_iou(G.cxcywh_to_xyxy(mp),
                                                                     G.cxcywh_to_xyxy(mg)))
    return got


def _yaml_value(fixture: str, key: str, default):
    import yaml
    with open(os.path.join(fixture, "config.yaml")) as f:
        return yaml.safe_load(f).get(key, default)


def load_grounding_checkpoint(fixture: str) -> Converted:
    """The official grounding checkpoint in our MPLUG: the text encoder keeps only
    min(text_encoder_layers, stride_layer) layers (quirk G4)."""
    with open(os.path.join(fixture, "config_bert.json")) as f:
        bert = json.load(f)
    kept = min(int(bert["text_encoder_layers"]), int(bert.get("stride_layer",
                                                              bert["text_encoder_layers"])))
    return load_official(os.path.join(fixture, "model.safetensors"),
                         os.path.join(fixture, "config_bert.json"),
                         os.path.join(fixture, "config.yaml"), overrides={"text_layers": kept},
                         allow_missing=GROUNDING_ALLOW_MISSING)


def check_grounding_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                            meta: dict) -> list[Row]:
    """Compare `grounding_outputs` with expected.npz (tolerances / exact list of meta.json)."""
    f64 = meta["float64_check"]
    return compare_arrays(got, expected, f64["suggested_atol"], set(f64.get("exact", ())),
                          default_tol=1e-6)


def grounding_parity_rows(fixture: str, meta: dict, got: dict[str, np.ndarray],
                          image_atol: float = 1e-4) -> list[Row]:
    """Preprocessing checks (image transform, pad mask, gt box, ids) plus the comparison of
    `got` with expected.npz."""
    def path(*p):
        return os.path.join(fixture, *p)
    inputs = dict(np.load(path("inputs.npz"), allow_pickle=False))
    expected = dict(np.load(path("expected.npz"), allow_pickle=False))
    with open(path("text.json")) as f:
        samples = json.load(f)["samples"]
    res = inputs["image"].shape[-1]
    max_len = inputs["text_input_ids"].shape[1]
    img_err, gt_err, pad_bad, ids_bad = 0.0, 0.0, 0, 0
    for i, s in enumerate(samples):
        x, pad, ratio, left, top = grounding_eval_image(path(s["image"]), res)
        img_err = max(img_err, float(np.abs(x - inputs["image"][i]).max()))
        pad_bad += int(np.sum(pad != inputs["image_pad_mask"][i]))
        box = grounding_gt_box(s["bbox_xywh_pixels"], ratio, left, top, res)
        gt_err = max(gt_err, float(np.abs(box - inputs["gt_box"][i]).max()))
        ids, mask = grounding_text_ids(s["phrase_raw"], max_len)
        ids_bad += int(np.any(ids != inputs["text_input_ids"][i])
                       or np.any(mask != inputs["text_attention_mask"][i]))
    rows = [Row("preprocess:image", tuple(inputs["image"].shape), img_err, image_atol,
                img_err <= image_atol),
            Row("preprocess:image_pad_mask", tuple(inputs["image_pad_mask"].shape),
                float(pad_bad), 0.0, pad_bad == 0, "mismatching pixels"),
            Row("preprocess:gt_box", tuple(inputs["gt_box"].shape), gt_err, 1e-6,
                gt_err <= 1e-6),
            Row("tokenizer:phrases", tuple(inputs["text_input_ids"].shape), float(ids_bad), 0.0,
                ids_bad == 0, "mismatching rows")]
    return rows + check_grounding_outputs(got, expected, meta)


def run_grounding_parity(fixture: str, meta: dict, image_atol: float = 1e-4,
                         conv: Converted | None = None) -> list[Row]:
    """All grounding checks of one fixture folder (docs/fixtures.md#grounding-fixtures and
    #checking-and-tolerances)."""
    return grounding_parity_rows(fixture, meta, grounding_outputs(fixture, conv), image_atol)
