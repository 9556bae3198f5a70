"""Parity with the official VQA / caption fixtures (`mplug-jax parity --fixture DIR`).

A fixture (see docs/fixtures.md#vqa-and-caption-fixtures) holds official configs, an official state
dict, raw images and strings, the official preprocessing results and the official model outputs.
We load it through the real import path, re-run tokenisation and image preprocessing, run our
model in float32 with the highest matmul precision, and compare every expected array. Where the
fixture has generation outputs (generation.npz / generation.json,
docs/fixtures.md#generation-outputs), the official beam search is re-run on our decoder states for
every run of meta.json and its ids, traces, scores and post-processed texts are compared too.
"""
from __future__ import annotations

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate
from mplug_jax.data.ops import text as text_norm
from mplug_jax.data.ops.tokenizer import CLS_ID, PAD_ID, SEP_ID, get_tokenizer
from mplug_jax.interop.convert import load_official
from mplug_jax.parity.rows import Row, compare_arrays, image_row


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token NLL float32[N, L-1] of logits[:, :-1] vs labels[:, 1:] and its validity mask
    (labels of -100 are ignored, as the official loss)."""
    targets = labels[:, 1:]
    valid = targets != -100
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid


def official_forward(model, params, inputs: dict, task: str) -> dict[str, np.ndarray]:
    """The official eval-mode forward (docs/fixtures.md#forward) on fixture inputs."""
    image = jnp.asarray(inputs["image"]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    ids, mask = jnp.asarray(inputs["text_input_ids"], jnp.int32), jnp.asarray(
        inputs["text_attention_mask"], jnp.int32)
    tgt, tgt_mask = jnp.asarray(inputs["target_input_ids"], jnp.int32), jnp.asarray(
        inputs["target_attention_mask"], jnp.int32)
    labels = jnp.asarray(inputs["target_labels"], jnp.int32)
    v = {"params": params}
    out = {}
    ln_post = model.apply(v, image, method=lambda m, x: m.vision(x))
    img = model.apply(v, image, method="encode_image")
    if model.has_visn_fc:
        out["visual_ln_post"] = ln_post
    txt = model.apply(v, ids, mask, method="encode_text")
    f_img, f_txt = model.apply(v, img, txt, mask, method="fuse")
    out.update(image_embeds=img, text_embeds=txt, fusion_image=f_img, fusion_text=f_txt)
    if task == "vqa":
        rows = np.repeat(np.arange(img.shape[0]), np.asarray(inputs["k"]))
        states = jnp.concatenate([f_img, f_txt], 1)[rows]
        states_mask = jnp.concatenate([jnp.ones(f_img.shape[:2], jnp.int32), mask], 1)[rows]
    elif task == "caption":
        states, states_mask = img, jnp.ones(img.shape[:2], jnp.int32)
    else:
        raise ValueError(f"unknown fixture task {task!r} (expected 'vqa' or 'caption')")
    logits = model.apply(v, tgt, tgt_mask, states, states_mask, method="decode")
    nll, valid = token_nll(logits, labels)
    out["decoder_logits"] = logits
    # Official quirk: VQA loss is a per-answer SUM of token NLLs, weighted and divided by the
    # number of images; the caption loss is a token MEAN.
    if task == "vqa":
        answer_nll = nll.sum(1)
        out["answer_nll"] = answer_nll
        out["loss"] = (jnp.asarray(inputs["weights"]) * answer_nll).sum() / img.shape[0]
    else:
        out["loss"] = nll.sum() / valid.sum()
    return {k: np.asarray(v) for k, v in out.items()}


def _check_text(fx: str, meta_text: dict) -> list[Row]:
    tok = get_tokenizer()
    rows = []
    calls = meta_text.get("tokenizer_calls", {})
    for group, items in meta_text.items():
        if not isinstance(items, list) or not items or "input_ids" not in items[0]:
            continue
        call = calls.get(group.rstrip("s"), "")
        m = re.search(r"max_length=(\d+)", call)
        max_len = int(m.group(1)) if m else None
        bad = 0
        for it in items:
            ids, _ = tok.encode([it["fed_to_tokenizer"]], max_length=max_len)
            bad += ids[0].tolist() != it["input_ids"]
            if "pre_question" in it:
                bad += text_norm.pre_question(it["raw"]) != it["pre_question"]
                if "input_ids_of_pre_question" in it:
                    ids, _ = tok.encode([it["pre_question"]], max_length=max_len)
                    bad += ids[0].tolist() != it["input_ids_of_pre_question"]
            if "pre_caption" in it:
                bad += text_norm.pre_caption(it["raw"]) != it["pre_caption"]
                if "input_ids_of_pre_caption_plus_eos" in it:
                    ids, _ = tok.encode([it["pre_caption"] + "[SEP]"], max_length=max_len)
                    bad += ids[0].tolist() != it["input_ids_of_pre_caption_plus_eos"]
        rows.append(Row(f"tokenizer:{group}", (len(items),), float(bad), 0.0, bad == 0,
                        "mismatching strings"))
    return rows


def _ids_mismatch(got_ids, got_len, want_ids, want_len) -> int:
    """Rows whose valid length or valid ids differ (ids [..., L] padded anyhow after len)."""
    got_ids, want_ids = got_ids.reshape(-1, got_ids.shape[-1]), want_ids.reshape(
        -1, want_ids.shape[-1])
    bad = 0
    for g, gl, w, wl in zip(got_ids, np.ravel(got_len), want_ids, np.ravel(want_len)):
        bad += int(gl != wl or g[:gl].tolist() != w[:wl].tolist())
    return bad


def check_generation(fixture: str, meta: dict, model, params, got: dict,
                     inputs: dict) -> list[Row]:
    """docs/fixtures.md#comparing-generation for every run of meta.json `generation.runs`: the
    official beam search (settings of meta.json `generation.settings`) on our decoder states (VQA:
    [fusion image; fusion question], caption: image states; docs/fixtures.md#generation-settings),
    with the run's [SEP]-bias weight change; ids / lengths / traces / end steps / stored hypotheses
    exactly, scores within the run's suggested_atol, post-processed texts exactly."""
    gen = dict(np.load(os.path.join(fixture, "generation.npz"), allow_pickle=False))
    with open(os.path.join(fixture, "generation.json")) as f:
        gen_json = json.load(f)
    g = meta["generation"]
    st = g["settings"]
    bos, eos = int(st.get("start_token", CLS_ID)), int(st.get("end_token", SEP_ID))
    if meta.get("task", "vqa") == "vqa":
        f_img = got["fusion_image"]
        states = np.concatenate([f_img, got["fusion_text"]], 1)
        smask = np.concatenate([np.ones(f_img.shape[:2], np.int32),
                                np.asarray(inputs["text_attention_mask"], np.int32)], 1)
    else:
        states = got["image_embeds"]
        smask = np.ones(states.shape[:2], np.int32)
    params = nn.meta.unbox(params)
    search = jax.jit(lambda p: generate.beam_search(
        model, p, jnp.asarray(states, jnp.float32), jnp.asarray(smask),
        beam_size=int(st["beam_size"]), min_length=int(st["min_length"]),
        max_length=int(st["max_length"]), alpha=float(st.get("alpha", 0.6)), bos_id=bos,
        eos_id=eos, pad_id=PAD_ID, return_trace=True))
    tok = get_tokenizer()
    rows = []
    for run, run_meta in g["runs"].items():
        want = {n[len(run) + 1:]: v for n, v in gen.items() if n.startswith(run + "_")}
        p = params
        if "bias_sep" in want:  # the run's weight change (docs/fixtures.md#generation-runs)
            dec = params["decoder"]
            p = {**params, "decoder": {**dec, "lm_bias": dec["lm_bias"].at[eos].set(
                jnp.float32(want["bias_sep"]))}}
        with jax.default_matmul_precision("highest"):
            out = {n: np.asarray(v) for n, v in search(p).items()}
        tol = run_meta["suggested_atol"]

        def exact(name, bad, shape):
            rows.append(Row(f"gen:{run}:{name}", tuple(shape), float(bad), 0.0, bad == 0,
                            "mismatching entries"))

        def close(name, g_val, w_val, t):
            err = float(np.abs(np.asarray(g_val, np.float64) - w_val).max()) if np.size(
                w_val) else 0.0
            rows.append(Row(f"gen:{run}:{name}", tuple(np.shape(w_val)), err, float(t),
                            bool(err <= t)))

        b = want["nbest_len"].shape[0]
        exact("top1_ids", _ids_mismatch(out["ids"][:, 0], out["lengths"][:, 0],
                                        want["top1_ids"], want["top1_len"]),
              want["top1_ids"].shape)
        exact("nbest_ids", _ids_mismatch(out["ids"], out["lengths"], want["nbest_ids"],
                                         want["nbest_len"]), want["nbest_ids"].shape)
        exact("end_step", int((out["end_step"] != want["end_step"]).sum()),
              want["end_step"].shape)
        exact("hyp_count", int((out["hyp_count"] != want["hyp_count"]).sum()),
              want["hyp_count"].shape)
        bad = 0
        for i in range(b):
            n = min(int(want["hyp_count"][i]), out["hyp_ids"].shape[1])
            bad += _ids_mismatch(out["hyp_ids"][i, :n], out["hyp_lengths"][i, :n],
                                 want["hyp_ids"][i, :n], want["hyp_len"][i, :n])
        exact("hyp_ids", bad, want["hyp_ids"].shape)
        live = want["trace_token"] >= 0
        exact("trace_token", int((out["trace_token"] != want["trace_token"]).sum()),
              want["trace_token"].shape)
        exact("trace_parent", int((out["trace_parent"][live] != want["trace_parent"][live])
                                  .sum()), want["trace_parent"].shape)
        close("top1_score", out["scores"][:, 0], want["top1_score"], tol["score"])
        close("nbest_score", out["scores"], want["nbest_score"], tol["score"])
        hyp_valid = np.arange(want["hyp_score"].shape[1]) < want["hyp_count"][:, None]
        cap = out["hyp_scores"].shape[1]
        got_hyp = np.full(want["hyp_score"].shape, np.nan)
        got_hyp[:, :min(cap, got_hyp.shape[1])] = out["hyp_scores"][:, :got_hyp.shape[1]]
        close("hyp_score", np.nan_to_num(got_hyp[hyp_valid], nan=np.inf),
              want["hyp_score"][hyp_valid], tol["score"])
        close("trace_score", out["trace_score"][live], want["trace_score"][live], tol["score"])
        close("trace_cum_logprob", out["trace_cum_logprob"][live],
              want["trace_cum_logprob"][live], tol["cum_logprob"])
        bad = total = 0
        for ex in gen_json["runs"][run]["examples"]:
            i = int(ex["example"])
            texts = [tok.decode_official(out["ids"][i, k, :out["lengths"][i, k]])
                     for k in range(out["ids"].shape[1])]
            answer = ex.get("official_answer", ex.get("official_caption"))
            bad += texts[0] != answer
            bad += sum(texts[h["rank"]] != h["text"] for h in ex["nbest"])
            total += 1 + len(ex["nbest"])
        exact("texts", bad, (total,))
    return rows


def run_vqa_caption_parity(fixture: str, meta: dict, image_atol: float = 1e-4) -> list[Row]:
    """Every check of a VQA / caption fixture folder (docs/fixtures.md#vqa-and-caption-fixtures):
    one Row per compared output."""
    def path(*p):
        return os.path.join(fixture, *p)
    inputs = dict(np.load(path("inputs.npz"), allow_pickle=False))
    expected = dict(np.load(path("expected.npz"), allow_pickle=False))
    with open(path("text.json")) as f:
        rows = _check_text(fixture, json.load(f))
    images = meta.get("images") or [{"file": f"images/{n}"} for n in
                                     sorted(os.listdir(path("images")))]
    rows.append(image_row(fixture, images, inputs["image"], image_atol))

    cfg_yaml = path("config.yaml") if os.path.isfile(path("config.yaml")) else None
    conv = load_official(path("model.safetensors"), path("config_bert.json"), cfg_yaml)
    with jax.default_matmul_precision("highest"):
        got = official_forward(conv.model, conv.params, inputs, meta.get("task", "vqa"))
    rows += compare_arrays(got, expected, meta["float64_check"]["suggested_atol"])
    if "generation" in meta and os.path.isfile(path("generation.npz")) and os.path.isfile(
            path("generation.json")):
        rows += check_generation(fixture, meta, conv.model, conv.params, got, inputs)
    return rows
