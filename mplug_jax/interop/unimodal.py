"""Initialise mPLUG from unimodal checkpoints, as the paper does.

BERT (HF `BertModel` / `BertForMaskedLM` naming): layers [0, text_layers) -> text encoder;
the next `fusion_layers` layers -> the fusion layers' self-attention and FFN; all layers up to
`decoder_layers` -> the decoder's self-attention and FFN; embeddings -> text encoder and decoder;
`cls.predictions` (if present) -> the decoder LM head and the MLM head. Cross-attention stays
freshly initialised.
CLIP: OpenAI CLIP state dict (`visual.*`) or HF `CLIPVisionModel` (`vision_model.*`) -> the
visual encoder (positional embedding resized to the config resolution).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from mplug_jax.interop import official_io, official_keys
from mplug_jax.interop.errors import CheckpointError

Arrays = dict[str, np.ndarray]


def _strip_prefix(state: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> Arrays:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = np.asarray(v)
    return out


def _convert(official_like: Arrays, model_cfg: Mapping, select: str, start_layer: int = 0
             ) -> tuple[Arrays, list[str]]:
    """Run the official mapping on an official-named dict for our params matching `select`;
    returns (loaded params, our params that had a source but were absent)."""
    params, absent = {}, []
    for e in official_keys.mapping(model_cfg, start_layer):
        if not re.search(select, e.ours):
            continue
        if all(k in official_like for k in e.official):
            params[e.ours] = e.to_ours(*[official_like[k] for k in e.official])
        else:
            absent.append(e.ours)
    return params, absent


def bert_params(bert_state: Mapping[str, np.ndarray], model_cfg: Mapping,
                parts: tuple[str, ...] = ("text", "fusion", "decoder", "mlm")) -> Arrays:
    """Our text/fusion/decoder/MLM params from a BERT state dict (see module docstring).

    `parts` selects what to initialise; e.g. ("text",) loads only the text encoder.
    """
    valid = ("text", "fusion", "decoder", "mlm")
    if set(parts) - set(valid):
        raise ValueError(f"unknown parts {sorted(set(parts) - set(valid))}; valid: {valid}")
    state = _strip_prefix(bert_state, ("bert.",))
    n_bert = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    t, f, d = model_cfg["text_layers"], model_cfg["fusion_layers"], model_cfg["decoder_layers"]
    need = max(t if "text" in parts else 0, t + f if "fusion" in parts else 0,
               d if "decoder" in parts else 0)
    if n_bert < need:
        raise CheckpointError(
            f"BERT checkpoint has {n_bert} layers; this config needs {t} (text) + {f} (fusion) "
            f"and {d} (decoder) for parts {parts}")
    off: Arrays = {}

    def put(prefix: str, layer_map: dict[int, int]):
        for k, v in state.items():
            if k.startswith("embeddings."):
                off[f"{prefix}.{k}"] = v
            m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", k)
            if m and int(m.group(1)) in layer_map:
                off[f"{prefix}.encoder.layer.{layer_map[int(m.group(1))]}.{m.group(2)}"] = v
    put("text_encoder", {i: i for i in range(t)})
    put("fusion_encoder", {t + i: i for i in range(f)})
    put("text_decoder.bert", {i: i for i in range(d)})
    for k, v in state.items():
        if k.startswith("cls.predictions."):
            off[f"text_decoder.{k}"] = v
            off[f"text_encoder.{k}"] = v
    select = "|".join({"text": "text/", "fusion": "fusion/", "decoder": "decoder/",
                       "mlm": "mlm_"}[p] for p in parts)
    params, _ = _convert(off, model_cfg, rf"^({select})")
    return {k: v for k, v in params.items() if "cross_attn" not in k and "cross_ln" not in k}


def hf_clip_vision_to_openai(state: Mapping[str, np.ndarray]) -> Arrays:
    """HF `CLIPVisionModel` names -> OpenAI CLIP `visual.*` names (q/k/v fused to in_proj)."""
    s = _strip_prefix(state, ("vision_model.",))
    out = {"visual.conv1.weight": s["embeddings.patch_embedding.weight"],
           "visual.class_embedding": s["embeddings.class_embedding"],
           "visual.positional_embedding": s["embeddings.position_embedding.weight"]}
    for ours, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = s[f"{hf}.{p}"]
    n = len({k.split(".")[2] for k in s if k.startswith("encoder.layers.")})
    for i in range(n):
        hf, o = f"encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
        for p in ("weight", "bias"):
            out[f"{o}.attn.in_proj_{p}"] = np.concatenate(
                [s[f"{hf}.self_attn.{x}_proj.{p}"] for x in "qkv"], 0)
            out[f"{o}.attn.out_proj.{p}"] = s[f"{hf}.self_attn.out_proj.{p}"]
            out[f"{o}.ln_1.{p}"] = s[f"{hf}.layer_norm1.{p}"]
            out[f"{o}.ln_2.{p}"] = s[f"{hf}.layer_norm2.{p}"]
            out[f"{o}.mlp.c_fc.{p}"] = s[f"{hf}.mlp.fc1.{p}"]
            out[f"{o}.mlp.c_proj.{p}"] = s[f"{hf}.mlp.fc2.{p}"]
    return out


def clip_params(clip_state: Mapping[str, np.ndarray], model_cfg: Mapping) -> Arrays:
    """Our `vision/*` params from an OpenAI CLIP (or HF CLIPVisionModel) state dict."""
    state = dict(clip_state)
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding")) for k in state):
        state = hf_clip_vision_to_openai(state)
    state = _strip_prefix(state, ("visual_encoder.", "module."))
    off = {f"visual_encoder.{k}": np.asarray(v) for k, v in state.items()
           if k.startswith("visual.")}
    if "visual_encoder.visual.conv1.weight" not in off:
        raise CheckpointError("not a CLIP checkpoint: no visual.conv1.weight")
    width, _, patch, _ = off["visual_encoder.visual.conv1.weight"].shape
    if width != model_cfg["vision_width"] or patch != model_cfg["patch_size"]:
        raise CheckpointError(
            f"CLIP checkpoint is width {width} / patch {patch}, the model config wants "
            f"{model_cfg['vision_width']} / {model_cfg['patch_size']}")
    params, absent = _convert(off, model_cfg, r"^vision/")
    if absent:
        raise CheckpointError(f"CLIP checkpoint lacks {absent[:10]}")
    from mplug_jax.models.vit import resample_posemb
    params["vision/pos_embed"] = resample_posemb(
        params["vision/pos_embed"], model_cfg["image_size"] // model_cfg["patch_size"])
    return params


def load_unimodal(path: str) -> Arrays:
    """Read a BERT or CLIP checkpoint (.safetensors, or torch pickle incl. OpenAI CLIP's
    TorchScript `.pt` files, whose tensors are read without running their code)."""
    return official_io.load_state_dict(path)
