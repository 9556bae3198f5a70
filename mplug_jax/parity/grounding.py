"""Grounding (`task == "grounding"`, docs/fixtures.md#grounding-fixtures): the official checkpoint
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.interop.convert import Converted, load_official
from mplug_jax.interop.official_keys import HEADS_ABSENT_IN_TASK_CHECKPOINTS
from mplug_jax.parity.rows import Row, compare_arrays, nhwc


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
        vis, img, txt, f_img, f_txt = _grounding_states(model, params, nhwc(inputs["image"]),
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
