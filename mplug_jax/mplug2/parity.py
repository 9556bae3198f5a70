"""Parity with official mPLUG-2 fixtures (docs/fixtures.md#mplug-2-video-fixtures).

Loads `model.safetensors` through the real importer (`mplug2_convert`), re-runs the official
video test preprocessing (frame sampling, NEAREST resize, CLIP normalisation) and tokenisation,
runs our `MPLUG2` in float32 at the highest matmul precision, and compares every array of
`expected.npz` within `meta.json float64_check.suggested_atol`; then re-runs the official beam
search (`generate.beam_search`, official=True, the algorithm of docs/fixtures.md#mplug-2-generation)
for every run and task of `generation.npz`, comparing ids, traces, stored hypotheses and end steps
exactly, scores within the run's suggested atol, and the post-processed texts exactly. One `Row` per
check. Nothing here depends on the fixture's sizes, frame count, fusion stride or vision style.
"""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml

from mplug_jax import generate
from mplug_jax.data.ops import text as text_norm
from mplug_jax.data.ops import video as video_lib
from mplug_jax.data.ops.tokenizer import CLS_ID, PAD_ID, SEP_ID, get_tokenizer
from mplug_jax.mplug2 import convert as mplug2_convert
from mplug_jax.parity.rows import Row
from mplug_jax.parity.vqa_caption import token_nll
from mplug_jax.mplug2.model import MPLUG2, decoder_module, vqa_states

GEN_TASKS = ("vqa", "caption")


# ---- preprocessing (docs/fixtures.md#mplug-2-frames: data.video's frame_indices, eval_clip) ------

def _check_preprocessing(fixture: str, inputs: dict, num_frames: int) -> list[Row]:
    frames = dict(np.load(os.path.join(fixture, "frames.npz"), allow_pickle=False))
    video = inputs["video"]  # B x 3 x T x R x R
    bad_idx = err = 0.0
    bad_png = 0
    images = os.path.join(fixture, "images")
    for b in range(video.shape[0]):
        raw = frames[f"clip{b}_raw"]
        idx = video_lib.frame_indices(raw.shape[0], num_frames)
        bad_idx += int(not np.array_equal(idx, frames[f"clip{b}_sampled_indices"]))
        got = video_lib.eval_clip(list(raw[idx]), video.shape[-1]).transpose(3, 0, 1, 2)
        err = max(err, float(np.abs(got - video[b]).max()))
        if os.path.isdir(images):
            from PIL import Image
            for name in sorted(os.listdir(images)):
                if name.startswith(f"clip{b}_") and name.endswith(".png"):
                    f = int(name.rsplit("_f", 1)[1][:-4])
                    bad_png += int(not np.array_equal(
                        np.asarray(Image.open(os.path.join(images, name)).convert("RGB")), raw[f]))
    return [Row("preprocess:frame_indices", (video.shape[0], num_frames), bad_idx, 0.0,
                bad_idx == 0, "mismatching clips"),
            Row("preprocess:png_frames", (), float(bad_png), 0.0, bad_png == 0,
                "PNG differs from frames.npz"),
            Row("preprocess:video", tuple(video.shape), err, 0.0, err == 0.0)]


def _check_text(text: dict, prompt: str) -> list[Row]:
    """Question / answer / caption strings -> ids with our tokenizer and text normalisation."""
    tok = get_tokenizer()
    rows = []
    for group, max_len in (("questions", None), ("answers", None), ("captions", 20)):
        bad = 0
        items = text.get(group, [])
        for it in items:
            if "pre_question" in it:
                bad += text_norm.pre_question(it["raw"], 50) != it["pre_question"]
            if "pre_caption" in it:
                bad += text_norm.pre_caption(it["raw"], 80) != it["pre_caption"]
                bad += prompt + it["pre_caption"] + "[SEP]" != it["fed_to_tokenizer"]
            ids, _ = tok.encode([it["fed_to_tokenizer"]], max_length=max_len)
            bad += ids[0].tolist() != it["input_ids"]
        if items:
            rows.append(Row(f"tokenizer:{group}", (len(items),), float(bad), 0.0, bad == 0,
                            "mismatching strings"))
    return rows


# ---- forward (docs/fixtures.md#mplug-2-forward) --------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _forward(model: MPLUG2, params, video, ids, mask, rows, tgt, tgt_mask, tgt_labels,
             weights, cap, cap_mask, cap_labels):
    def f(m):
        vis = m.encode_video(video)
        v = m.vision_embeds(vis)
        img = m.universal(v)
        txt = m.encode_text(ids, mask)
        f_img, f_txt = m.fuse(img, txt, mask)
        states, smask = vqa_states(f_img, f_txt, mask)
        logits = m.decode(tgt, tgt_mask, states[rows], smask[rows])
        nll, _ = token_nll(logits, tgt_labels)
        answer_nll = nll.sum(1)
        cap_logits = m.decode(cap, cap_mask, img, jnp.ones(img.shape[:2], jnp.int32))
        cnll, cvalid = token_nll(cap_logits, cap_labels)
        return dict(
            visual_ln_post=vis, vision_embeds=v, image_embeds=img, text_embeds=txt,
            fusion_image=f_img, fusion_text=f_txt, decoder_logits=logits, answer_nll=answer_nll,
            # Official: VQA loss = weighted per-answer SUM / clips; caption loss = token MEAN.
            loss=(weights * answer_nll).sum() / video.shape[0],
            caption_decoder_logits=cap_logits, caption_loss=cnll.sum() / cvalid.sum())
    out, state = model.apply({"params": params}, method=f, mutable=["intermediates"])
    return out, state["intermediates"]


def official_forward(model: MPLUG2, params, inputs: dict) -> dict[str, np.ndarray]:
    """Every array of expected.npz (docs/fixtures.md#mplug-2-arrays) from fixture `inputs`
    (inputs.npz)."""
    i32 = lambda name: jnp.asarray(inputs[name], jnp.int32)  # noqa: E731
    rows = np.repeat(np.arange(inputs["video"].shape[0]), np.asarray(inputs["k"]))
    video = jnp.asarray(inputs["video"], jnp.float32).transpose(0, 2, 3, 4, 1)  # -> B T R R 3
    with jax.default_matmul_precision("highest"):
        out, inter = _forward(model, params, video, i32("text_input_ids"),
                              i32("text_attention_mask"), jnp.asarray(rows),
                              i32("target_input_ids"), i32("target_attention_mask"),
                              i32("target_labels"), jnp.asarray(inputs["weights"], jnp.float32),
                              i32("caption_input_ids"), i32("caption_attention_mask"),
                              i32("caption_labels"))
    got = {k: np.asarray(v) for k, v in out.items()}
    blocks = [inter["vision"][f"blocks_{i}"] for i in range(model.vision_layers)]
    for name, key in (("vision_lt1_out", "lt1"), ("vision_lt2_out", "lt2"),
                      ("vision_block_out", "block_out")):
        got[name] = np.stack([np.asarray(b[key][0]) for b in blocks])
    got["vision_tokens_frames"] = got["vision_block_out"][-1]
    text = inter["text"]
    got["text_layers"] = np.stack([np.asarray(x) for x in text["text_layers"]])
    lat = text.get("universal_latents", ())
    got["universal_latents"] = (np.stack([np.asarray(x) for x in lat]) if lat else np.zeros(
        (0, video.shape[0], model.num_latents, model.hidden_size), np.float32))
    got["universal_image_out"] = np.asarray(inter["universal_image_out"][0])
    return got


def compare(got: dict, expected: dict, tols: dict) -> list[Row]:
    """One Row per expected array: max |got - expected| <= its suggested atol."""
    rows = []
    for name, want in expected.items():
        tol = float(tols.get(name, 1e-5))
        g = got.get(name)
        if g is None:
            rows.append(Row(name, tuple(want.shape), float("inf"), tol, False, "not computed"))
        elif g.shape != want.shape:
            rows.append(Row(name, tuple(want.shape), float("inf"), tol, False, f"shape {g.shape}"))
        else:
            err = float(np.abs(g.astype(np.float64) - want).max()) if want.size else 0.0
            rows.append(Row(name, tuple(want.shape), err, tol, bool(err <= tol)))
    return rows


# ---- generation (docs/fixtures.md#mplug-2-generation) --------------------------------------------

def _ids_bad(got_ids, got_len, want_ids, want_len) -> int:
    """Number of sequences whose valid length or valid ids differ."""
    got_ids, want_ids = got_ids.reshape(-1, got_ids.shape[-1]), want_ids.reshape(
        -1, want_ids.shape[-1])
    return sum(int(gl != wl or g[:gl].tolist() != w[:wl].tolist())
               for g, gl, w, wl in zip(got_ids, np.ravel(got_len), want_ids, np.ravel(want_len)))


@functools.lru_cache(maxsize=8)
def _search(dec, beam_size: int, min_length: int, max_length: int, alpha: float):
    """The official beam search with traces, jitted once per decoder and settings:
    fn(decoder params, states float[B, S, H], states_mask int[B, S]) -> dict."""
    return jax.jit(functools.partial(
        generate.beam_search, dec, beam_size=beam_size, min_length=min_length,
        max_length=max_length, alpha=alpha, bos_id=CLS_ID, eos_id=SEP_ID, pad_id=PAD_ID,
        return_trace=True))


def official_text(tok, ids, prompt: str = "") -> str:
    """The official evaluation's text of generated ids (caption: the part after the prompt)."""
    text = tok.decode_official(ids)
    return text.split(prompt)[-1].strip() if prompt else text


def check_generation(fixture: str, meta: dict, model: MPLUG2, params, got: dict,
                     inputs: dict, prompt: str) -> list[Row]:
    """docs/fixtures.md#mplug-2-generation for every run and task of generation.npz."""
    gen = dict(np.load(os.path.join(fixture, "generation.npz"), allow_pickle=False))
    with open(os.path.join(fixture, "generation.json")) as f:
        gen_json = json.load(f)
    settings = meta["generation"]["settings"]
    dec = decoder_module(model)
    dec_params = params["decoder"]
    mask = np.asarray(inputs["text_attention_mask"], np.int32)
    states = {"vqa": vqa_states(jnp.asarray(got["fusion_image"]),
                                jnp.asarray(got["fusion_text"]), mask),
              "caption": (jnp.asarray(got["image_embeds"]),
                          jnp.ones(got["image_embeds"].shape[:2], jnp.int32))}
    searches = {}
    tok = get_tokenizer()
    rows = []
    for run, run_meta in meta["generation"]["runs"].items():
        for task in GEN_TASKS:
            pre = f"{task}_{run}_"
            want = {n[len(pre):]: v for n, v in gen.items() if n.startswith(pre)}
            if not want or task not in run_meta:
                continue
            st = settings[task]
            if task not in searches:
                searches[task] = _search(dec, int(st["beam_size"]), int(st["min_length"]),
                                         int(st["max_length"]), float(st.get("alpha", 0.6)))
            p = dec_params
            if "bias_sep" in want:  # the run's one-float change (both tied copies: ours is one)
                p = {**p, "lm_bias": p["lm_bias"].at[SEP_ID].set(jnp.float32(want["bias_sep"]))}
            with jax.default_matmul_precision("highest"):
                out = {n: np.asarray(v) for n, v in searches[task](p, *states[task]).items()}
            tol = run_meta[task]["suggested_atol"]
            name = f"gen:{run}:{task}"

            def exact(what, bad, shape):
                rows.append(Row(f"{name}:{what}", tuple(shape), float(bad), 0.0, bad == 0,
                                "mismatching entries"))

            def close(what, g, w, t):
                err = float(np.abs(np.asarray(g, np.float64) - w).max()) if np.size(w) else 0.0
                rows.append(Row(f"{name}:{what}", tuple(np.shape(w)), err, float(t),
                                bool(err <= t)))

            exact("top1_ids", _ids_bad(out["ids"][:, 0], out["lengths"][:, 0], want["top1_ids"],
                                       want["top1_len"]), want["top1_ids"].shape)
            exact("nbest_ids", _ids_bad(out["ids"], out["lengths"], want["nbest_ids"],
                                        want["nbest_len"]), want["nbest_ids"].shape)
            exact("end_step", int((out["end_step"] != want["end_step"]).sum()),
                  want["end_step"].shape)
            exact("hyp_count", int((out["hyp_count"] != want["hyp_count"]).sum()),
                  want["hyp_count"].shape)
            bad_ids = bad_step = 0
            for i, count in enumerate(want["hyp_count"]):
                n = min(int(count), out["hyp_ids"].shape[1])
                bad_ids += _ids_bad(out["hyp_ids"][i, :n], out["hyp_lengths"][i, :n],
                                    want["hyp_ids"][i, :n], want["hyp_len"][i, :n])
                # A hypothesis stored at step s holds s + 2 ids ([CLS] + s + 1 tokens).
                bad_step += int((out["hyp_lengths"][i, :n] - 2 != want["hyp_step"][i, :n]).sum())
                bad_ids += int(count) - n
            exact("hyp_ids", bad_ids, want["hyp_ids"].shape)
            exact("hyp_step", bad_step, want["hyp_step"].shape)
            live = want["trace_token"] >= 0
            exact("trace_token", int((out["trace_token"] != want["trace_token"]).sum()),
                  want["trace_token"].shape)
            exact("trace_parent", int((out["trace_parent"] != want["trace_parent"]).sum()),
                  want["trace_parent"].shape)
            close("top1_score", out["scores"][:, 0], want["top1_score"], tol["score"])
            close("nbest_score", out["scores"], want["nbest_score"], tol["score"])
            valid = np.arange(want["hyp_score"].shape[1]) < want["hyp_count"][:, None]
            got_hyp = np.full(want["hyp_score"].shape, np.inf)
            m = min(out["hyp_scores"].shape[1], got_hyp.shape[1])
            got_hyp[:, :m] = np.nan_to_num(out["hyp_scores"][:, :m], nan=np.inf)
            close("hyp_score", got_hyp[valid], want["hyp_score"][valid], tol["score"])
            close("trace_score", out["trace_score"][live], want["trace_score"][live],
                  tol["score"])
            close("trace_cum_logprob", out["trace_cum_logprob"][live],
                  want["trace_cum_logprob"][live], tol["cum_logprob"])
            texts_json = gen_json["runs"][run][task]
            pr = prompt if task == "caption" else ""
            bad = total = 0
            for i, top1 in enumerate(texts_json["top1_text"]):
                texts = [official_text(tok, out["ids"][i, j, :out["lengths"][i, j]], pr)
                         for j in range(out["ids"].shape[1])]
                bad += texts[0] != top1
                nbest = texts_json["nbest"][i]
                bad += sum(t != h["text"] for t, h in zip(texts, nbest))
                total += 1 + len(nbest)
            exact("texts", bad, (total,))
    return rows


# ---- entry point ---------------------------------------------------------------------------------

def is_mplug2_fixture(meta: dict) -> bool:
    """Whether a fixture's meta.json describes an official mPLUG-2 fixture."""
    return "mPLUG-2" in str(meta.get("official_repo", "")) or "universal_layers" in meta.get(
        "dims", {})


def run_mplug2_parity(fixture: str, meta: dict | None = None, generation: bool = True,
                      conv: mplug2_convert.Converted | None = None) -> list[Row]:
    """Every check of an mPLUG-2 fixture folder; one Row per compared output.

    generation=False skips the beam-search checks; `conv` reuses an already-loaded checkpoint
    (e.g. a modified one in tests)."""
    def path(*p):
        return os.path.join(fixture, *p)
    if meta is None:
        with open(path("meta.json")) as f:
            meta = json.load(f)
    inputs = dict(np.load(path("inputs.npz"), allow_pickle=False))
    expected = dict(np.load(path("expected.npz"), allow_pickle=False))
    prompt = ""
    if os.path.isfile(path("config_caption.yaml")):
        with open(path("config_caption.yaml")) as f:
            prompt = (yaml.safe_load(f) or {}).get("prompt", "")
    rows = []
    if os.path.isfile(path("text.json")):
        with open(path("text.json")) as f:
            rows += _check_text(json.load(f), prompt)
    if os.path.isfile(path("frames.npz")):
        rows += _check_preprocessing(fixture, inputs, inputs["video"].shape[2])
    if conv is None:
        conv = mplug2_convert.load_official(path("model.safetensors"), path("config_bert.json"),
                                            path("config.yaml"))
    params = nn.meta.unbox(conv.params)
    got = official_forward(conv.model, params, inputs)
    rows += compare(got, expected, meta["float64_check"]["suggested_atol"])
    if generation and "generation" in meta and os.path.isfile(path("generation.npz")):
        rows += check_generation(fixture, meta, conv.model, params, got, inputs, prompt)
    return rows
