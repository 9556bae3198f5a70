"""Official config files <-> our model kwargs.

`config_from_official` turns an official `config_bert.json` + task yaml + state dict into
`MPLUG` kwargs and the first running official fusion module; `official_config_files` writes
our model back as that pair (for `mplug-jax export`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from mplug_jax.interop.errors import CheckpointError
from mplug_jax.interop.official_keys import rename_pretrained_keys


def config_from_official(config_bert: Mapping, config_yaml: Mapping,
                         state: Mapping[str, np.ndarray]) -> tuple[dict, int]:
    """Official config_bert.json + task yaml + state dict -> (MPLUG kwargs, start_layer).

    Vision width/layers/patch/grid are inferred from tensor shapes as CLIP's `build_model`
    does; heads = width // 64 (CLIP's rule).
    """
    state = rename_pretrained_keys(state)
    v = "visual_encoder.visual"
    if f"{v}.conv1.weight" not in state:
        raise CheckpointError(f"no {v}.conv1.weight: not an official mPLUG state dict")
    width, _, patch, _ = state[f"{v}.conv1.weight"].shape
    layers = len({k.split(".")[4] for k in state
                  if k.startswith(f"{v}.transformer.resblocks.") and k.endswith("in_proj_weight")})
    n_modules = int(config_bert["num_hidden_layers"])
    fusion_layers = min(int(config_bert.get("fusion_layers", n_modules)), n_modules)
    cfg = dict(
        vocab_size=int(config_bert["vocab_size"]),
        hidden_size=int(config_bert["hidden_size"]),
        num_heads=int(config_bert["num_attention_heads"]),
        mlp_dim=int(config_bert["intermediate_size"]),
        max_len=int(config_bert["max_position_embeddings"]),
        type_vocab_size=int(config_bert["type_vocab_size"]),
        text_layers=int(config_bert["text_encoder_layers"]),
        fusion_layers=fusion_layers,
        fusion_stride=int(config_bert["stride_layer"]),
        fusion_layout="skip",
        decoder_layers=int(config_bert["text_decode_layers"]),
        text_ln_eps=float(config_bert.get("layer_norm_eps", 1e-12)),
        image_size=int(config_yaml["image_res"]),
        patch_size=int(patch),
        vision_width=int(width),
        vision_layers=layers,
        # CLIP's rule is width // 64 heads; tiny fixtures record theirs under `clip_tiny`.
        vision_heads=int((config_yaml.get("clip_tiny") or {}).get("vision_heads")
                         or max(1, int(width) // 64)),
    )
    if "vision_proj.weight" in state:  # ITC projection width (yaml `embed_dim`, default 256)
        cfg["embed_dim"] = int(state["vision_proj.weight"].shape[0])
    elif "embed_dim" in config_yaml:
        cfg["embed_dim"] = int(config_yaml["embed_dim"])
    if config_bert.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {config_bert['hidden_act']!r} is not supported "
                              "(official mPLUG uses exact 'gelu')")
    if int(config_yaml.get("vision_width", width)) != width:
        raise CheckpointError(f"config vision_width {config_yaml['vision_width']} but conv1 has "
                              f"width {width}")
    return cfg, n_modules - fusion_layers


def official_config_files(model_cfg: Mapping, start_layer: int = 0) -> tuple[dict, dict]:
    """(config_bert.json dict, yaml dict) describing our model in the official format."""
    c = dict(model_cfg)
    bert = {
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": c["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": c["mlp_dim"],
        "layer_norm_eps": c.get("text_ln_eps", 1e-12),
        "max_position_embeddings": c["max_len"], "model_type": "bert",
        "num_attention_heads": c["num_heads"],
        "num_hidden_layers": start_layer + c["fusion_layers"], "pad_token_id": 0,
        "type_vocab_size": c["type_vocab_size"], "vocab_size": c["vocab_size"],
        "encoder_width": c["hidden_size"], "add_cross_attention": False, "use_cache": False,
        "gradient_checkpointing": False, "text_encoder_layers": c["text_layers"],
        "fusion_layers": c["fusion_layers"], "text_decode_layers": c["decoder_layers"],
        "stride_layer": c["fusion_stride"],
    }
    if c.get("fusion_layout", "skip") != "skip":
        raise CheckpointError(f"fusion_layout {c['fusion_layout']!r} has no official config "
                              "equivalent (the official code only knows the stride rule)")
    yaml = {"image_res": c["image_size"], "vision_width": c["vision_width"],
            "clip_name": "ViT-B-16" if c["patch_size"] == 16 else "ViT-L-14",
            "eos": "[SEP]", "bos": "[CLS]", "embed_dim": c["embed_dim"]}
    if c["vision_heads"] != c["vision_width"] // 64:
        # Not CLIP's width // 64 rule: record the dims as the fixtures do (`clip_tiny`, a key
        # the official code ignores and our importer reads).
        yaml["clip_tiny"] = {"vision_layers": c["vision_layers"],
                             "vision_patch_size": c["patch_size"],
                             "vision_heads": c["vision_heads"]}
    return bert, yaml
