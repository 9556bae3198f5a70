"""The official mPLUG-2 state-dict layout (X-PLUG/mPLUG-2 `MPLUG2.state_dict()`): for every
parameter of our `MPLUG2`, the official key(s) it comes from and the array transforms both
ways (`mapping`), and the official keys our model never reads (`unused_patterns`).
`mplug_jax.mplug2.convert` imports and exports through these tables; the key helpers and the
CLIP tower's entries are mPLUG's (`interop.official_keys`).
Layout: docs/fixtures.md#mplug-2-configs-and-state-dict.
"""
from __future__ import annotations

from typing import Mapping

from mplug_jax.interop.errors import CheckpointError
from mplug_jax.interop.official_keys import (Entry, _bert_embeddings, _bert_layer, _dense,
                                             _entry, _identity, _layer_norm, clip_vision)
from mplug_jax.models.fusion import fusion_pattern

VIS = "visual_encoder.visual"
TEMPORAL_RE = r"\.lmhra[12]\."
# Top-level modules with momentum copies in `distill: true` video-QA checkpoints.
MOMENTUM_TOPS = ("visual_encoder", "text_encoder", "fusion_encoder", "text_decoder",
                 "visn_emb_norm", "visn_fc", "visn_layer_norm")
TIED = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")


# ---- array transforms -------------------------------------------------------------------------

def _conv3d_patch():
    """Conv3d [C, 3, 1, P, P] -> flax Conv kernel [P, P, 3, C]."""
    def fwd(w):
        if w.ndim != 5 or w.shape[2] != 1:
            raise CheckpointError(f"{VIS}.conv1.weight has shape {tuple(w.shape)}; expected "
                                  "[C, 3, 1, P, P] (temporal_downsampling checkpoints with a "
                                  "temporal kernel are not supported)")
        return w[:, :, 0].transpose(2, 3, 1, 0)
    return fwd, lambda k: (k.transpose(3, 2, 0, 1)[:, :, None],)


def _pointwise():
    """1x1x1 Conv3d [O, I, 1, 1, 1] -> Dense kernel [I, O]."""
    return (lambda w: w[:, :, 0, 0, 0].T), (lambda k: (k.T[:, :, None, None, None],))


def _depthwise_time():
    """Depthwise temporal Conv3d [C2, 1, 3, 1, 1] -> [3, C2] (tap k reads frame t + k - 1)."""
    return (lambda w: w[:, 0, :, 0, 0].T), (lambda k: (k.T[:, None, :, None, None],))


def _local_temporal(out: list[Entry], ours: str, off: str) -> None:
    """A block's two local temporal modules (`lmhra1` / `lmhra2`)."""
    for lt in ("lmhra1", "lmhra2"):
        _layer_norm(out, f"{ours}/{lt}/ln", f"{off}.{lt}.ln")
        _entry(out, f"{ours}/{lt}/down_proj/kernel", f"{off}.{lt}.down_proj.weight",
               _pointwise())
        _entry(out, f"{ours}/{lt}/down_proj/bias", f"{off}.{lt}.down_proj.bias", _identity())
        _entry(out, f"{ours}/{lt}/conv_kernel", f"{off}.{lt}.conv.weight", _depthwise_time())
        _entry(out, f"{ours}/{lt}/conv_bias", f"{off}.{lt}.conv.bias", _identity())
        _entry(out, f"{ours}/{lt}/up_proj/kernel", f"{off}.{lt}.up_proj.weight", _pointwise())
        _entry(out, f"{ours}/{lt}/up_proj/bias", f"{off}.{lt}.up_proj.bias", _identity())


# ---- the table ----------------------------------------------------------------------------------

def mapping(cfg: Mapping, start_layer: int = 0) -> list[Entry]:
    """Every param of `MPLUG2(**cfg)` with its official source keys. `start_layer`: official
    index of the first fusion module that runs (`num_hidden_layers - fusion_layers`)."""
    heads = cfg["num_heads"]
    out: list[Entry] = []
    clip_vision(out, cfg, _conv3d_patch(), _local_temporal, VIS)
    _layer_norm(out, "visn_emb_norm", "visn_emb_norm")

    n, s = cfg["text_layers"], cfg["universal_layers"]
    _bert_embeddings(out, "text/embeddings", "text_encoder.embeddings")
    for i in range(n):
        _bert_layer(out, f"text/layer_{i}", f"text_encoder.encoder.layer.{i}", heads,
                    cross=i >= n - s)
    _entry(out, "text/latents", f"text_encoder.encoder.layer.{n - s}.latents", _identity())

    for i, kind in enumerate(fusion_pattern("skip", cfg["fusion_layers"], cfg["fusion_stride"])):
        off = f"fusion_encoder.encoder.layer.{start_layer + i}"
        sub = "text" if kind == "a" else "joint"
        _bert_layer(out, f"fusion/layer_{i}/{sub}", off, heads, cross=kind == "a")

    _bert_embeddings(out, "decoder/embeddings", "text_decoder.bert.embeddings")
    for i in range(cfg["decoder_layers"]):
        _bert_layer(out, f"decoder/decoder/layer_{i}", f"text_decoder.bert.encoder.layer.{i}",
                    heads, cross=True)
    cls = "text_decoder.cls.predictions"
    _dense(out, "decoder/lm_transform", f"{cls}.transform.dense")
    _layer_norm(out, "decoder/lm_ln", f"{cls}.transform.LayerNorm")
    _entry(out, "decoder/lm_bias", f"{cls}.bias", _identity())
    return out


def unused_patterns(cfg: Mapping, start_layer: int) -> list[str]:
    """Regexes of official keys the model never reads (kept as extras)."""
    pattern = fusion_pattern("skip", cfg["fusion_layers"], cfg["fusion_stride"])
    connected = [str(start_layer + i) for i, k in enumerate(pattern) if k == "c"]
    pats = [
        r"^visual_encoder\.(?!visual\.)",                       # CLIP text tower
        r"^visual_encoder\.visual\.proj$",                      # skip_last_layer
        r"^fusion_encoder\.embeddings\.",                       # fusion takes text_embeds
        r"\.embeddings\.position_ids$",
        r"^text_encoder\.encoder\.layer\.\d+\.(intermediate|output)_vision\.",
        r"^text_decoder\.bert\.encoder\.layer\.\d+\.((intermediate|output)_vision\.|latents$)",
        rf"^({'|'.join(MOMENTUM_TOPS)})_m\.",                    # distill momentum copies
    ]
    if start_layer:  # official fusion modules that are built but never run
        never = "|".join(map(str, range(start_layer)))
        pats.append(rf"^fusion_encoder\.encoder\.layer\.({never})\.")
    if connected:
        pats.append(rf"^fusion_encoder\.encoder\.layer\.({'|'.join(connected)})\.crossattention\.")
    return pats
