"""Official mPLUG-2 state dicts (X-PLUG/mPLUG-2 `MPLUG2.state_dict()`) <-> our `MPLUG2` params.

One mapping table (`mplug2.keys.mapping`) lists, for every parameter of our model, the official key(s) it comes from
and the array transforms both ways (transposes / reshapes only), so import -> export gives back
every tensor bit-identically. Official tensors our model never uses are kept as `extras` and
written back on export: the CLIP text tower and `visual.proj`, fusion embeddings, fusion modules
that never run and the cross-attention of connected fusion layers, the unused
`intermediate_vision` / `output_vision` / decoder `latents` parameters, `position_ids` buffers
and the momentum (`*_m`) copies of distill checkpoints (they never influence outputs, quirk 9).
The decoder's tied output weight / bias are regenerated from the embeddings / `lm_bias`.

Model dims are inferred from the checkpoint's shapes; only head counts, the fusion run / stride
rule and the image resolution come from the config files (`config_bert.json`, task yaml).
Layout: docs/fixtures.md#mplug-2-configs-and-state-dict.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from mplug_jax import params as P
from mplug_jax.interop import official_io
from mplug_jax.interop.errors import CheckpointError
from mplug_jax.mplug2 import model as M
from mplug_jax.mplug2.keys import TEMPORAL_RE, TIED, VIS, mapping, unused_patterns
from mplug_jax.models.vit import resample_posemb

Arrays = dict[str, np.ndarray]


# ---- config inference ---------------------------------------------------------------------------

def _count(state: Mapping, prefix: str, suffix: str) -> int:
    rx = re.compile(rf"^{re.escape(prefix)}(\d+)\.{re.escape(suffix)}$")
    idx = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def config_from_official(bert: Mapping, cfg_yaml: Mapping, state: Mapping) -> tuple[dict, int]:
    """(MPLUG2 kwargs, start_layer) from the official config files and the state dict shapes.

    Shapes give the widths, layer counts, patch size, latents and vocab; the config gives the
    head counts, `num_uni_layer`, `fusion_layers` / `stride_layer` and `image_res`.
    """
    def need(key):
        if key not in state:
            raise CheckpointError(f"not an mPLUG-2 checkpoint: key {key!r} is missing")
        return np.shape(state[key])

    word = need("text_encoder.embeddings.word_embeddings.weight")
    conv1 = need(f"{VIS}.conv1.weight")
    if len(conv1) != 5:
        raise CheckpointError(f"{VIS}.conv1.weight has shape {conv1}; an mPLUG-2 checkpoint "
                              "has a Conv3d patch embedding [C, 3, 1, P, P] (a 4-d kernel is an "
                              "mPLUG v1 / CLIP image checkpoint)")
    hidden, width, patch = word[1], conv1[0], conv1[-1]
    text_layers = _count(state, "text_encoder.encoder.layer.", "attention.self.query.weight")
    with_cross = _count(state, "text_encoder.encoder.layer.", "crossattention.self.query.weight")
    s = int(bert.get("num_uni_layer", 0)) or None
    uni = [i for i in range(text_layers)
           if f"text_encoder.encoder.layer.{i}.crossattention.self.query.weight" in state]
    if s is None:
        s = len(uni)
    if uni != list(range(text_layers - s, text_layers)) or with_cross != text_layers:
        raise CheckpointError(f"config num_uni_layer={s} but the checkpoint's text encoder has "
                              f"cross-attention in layers {uni} of 0..{text_layers - 1} (the "
                              "universal layers must be the last num_uni_layer layers)")
    latents = need(f"text_encoder.encoder.layer.{text_layers - s}.latents")
    modules = _count(state, "fusion_encoder.encoder.layer.", "attention.self.query.weight")
    run = int(bert.get("fusion_layers", modules))
    start = max(0, modules - run)
    grid = int(round((need(f"{VIS}.positional_embedding")[0] - 1) ** 0.5))
    image_res = int(cfg_yaml.get("image_res") or grid * patch)
    clip = cfg_yaml.get("clip_tiny") or {}
    vheads = int(clip.get("vision_heads", max(1, width // 64)))
    cfg = dict(
        vocab_size=word[0], hidden_size=hidden,
        num_heads=int(bert["num_attention_heads"]),
        mlp_dim=need("text_encoder.encoder.layer.0.intermediate.dense.weight")[0],
        max_len=need("text_encoder.embeddings.position_embeddings.weight")[0],
        type_vocab_size=need("text_encoder.embeddings.token_type_embeddings.weight")[0],
        text_layers=text_layers, universal_layers=s, num_latents=latents[0],
        fusion_layers=modules - start, fusion_stride=int(bert.get("stride_layer", 1000)),
        decoder_layers=_count(state, "text_decoder.bert.encoder.layer.",
                              "attention.self.query.weight"),
        text_ln_eps=float(bert.get("layer_norm_eps", 1e-12)),
        image_size=image_res, patch_size=patch, vision_width=width,
        vision_layers=_count(state, f"{VIS}.transformer.resblocks.", "ln_1.weight"),
        vision_heads=vheads, num_frames=int(cfg_yaml.get("model_num_frames", 16)))
    cfg = {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in cfg.items()}
    if cfg["fusion_layers"] < 1:
        raise CheckpointError("the checkpoint has no fusion module that runs "
                              f"({modules} modules, fusion_layers={run})")
    return cfg, start


# ---- import / export ----------------------------------------------------------------------------

@dataclasses.dataclass
class Converted:
    """An official mPLUG-2 checkpoint loaded into our model."""
    model: M.MPLUG2
    model_cfg: dict
    start_layer: int
    params: Any           # boxed param tree
    extras: Arrays        # official tensors the model does not read, written back on export
    missing: list[str]    # our params absent from the checkpoint (kept at their init)
    notes: list[str]


def import_state_dict(state: Mapping[str, np.ndarray], cfg: Mapping, start_layer: int,
                      expected_shapes: Mapping[str, tuple] | None = None,
                      allow_missing_temporal: bool = False) -> tuple[Arrays, Arrays, list, list]:
    """Official state dict -> (our flat params, extras, missing params, notes).

    allow_missing_temporal: a checkpoint without any local temporal module keys (e.g. an
    image / CLIP-initialised one) is accepted; those modules keep their init, whose zero up
    projection makes each of them an identity residual.
    Raises CheckpointError naming missing, mis-shaped or unexpected keys.
    """
    state = dict(state)
    table = mapping(cfg, start_layer)
    params, used, missing, bad, notes = {}, set(), [], [], []
    for e in table:
        absent = [k for k in e.official if k not in state]
        if absent:
            missing.append((e.ours, absent))
            continue
        arr = e.to_ours(*[np.asarray(state[k]) for k in e.official])
        want = expected_shapes.get(e.ours) if expected_shapes else None
        if e.ours == "vision/pos_embed" and want is not None and arr.shape[0] != want[0]:
            # Official fine-tuning loader: bilinear resize to the new grid (quirk 11).
            grid = int(round((want[0] - 1) ** 0.5))
            notes.append(f"{e.official[0]}: resized {arr.shape[0] - 1} -> {grid * grid} patches")
            arr = resample_posemb(arr, grid)
        if want is not None and tuple(arr.shape) != tuple(want):
            bad.append(f"{' + '.join(e.official)}: shape {tuple(state[e.official[0]].shape)} -> "
                       f"{tuple(arr.shape)}, but the model expects {tuple(want)} for {e.ours}")
        params[e.ours] = arr
        used.update(e.official)
    if bad:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(bad))
    temporal = [(o, k) for o, k in missing if re.search(TEMPORAL_RE, k[0])]
    others = [(o, k) for o, k in missing if not re.search(TEMPORAL_RE, k[0])]
    if temporal and not allow_missing_temporal:
        keys = sorted(k for _, ks in temporal for k in ks)
        raise CheckpointError(
            f"{len(keys)} local temporal module keys (lmhra1 / lmhra2) missing from the "
            f"checkpoint, e.g.\n  " + "\n  ".join(keys[:12]) + "\nThis looks like an image "
            "(CLIP / mPLUG) vision checkpoint. To start the video model from it, load with "
            "allow_missing_temporal=True: the temporal modules then start as identities (zero "
            "up projection), so the video model equals the image model at step 0.")
    if others:
        lines = [f"{o} (official {', '.join(k)})" for o, k in others]
        raise CheckpointError(f"{len(others)} parameters missing from the checkpoint:\n  "
                              + "\n  ".join(lines[:50]))
    if temporal:
        notes.append(f"{len(temporal)} local temporal params not in the checkpoint: identity "
                     "init (zero up projection)")
    for w, src in zip(TIED, ("text_decoder.bert.embeddings.word_embeddings.weight",
                             "text_decoder.cls.predictions.bias")):
        if w in state and src in state and not np.array_equal(state[w], state[src]):
            raise CheckpointError(f"{w} differs from {src}; the official model ties them (a "
                                  "loader that edits one copy must edit both)")
    pats = [re.compile(p) for p in unused_patterns(cfg, start_layer)]
    rest = {k: np.asarray(v) for k, v in state.items() if k not in used and k not in TIED}
    unexpected = sorted(k for k in rest if not any(p.search(k) for p in pats))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected keys in the checkpoint (not used by "
                              "this model config):\n  " + "\n  ".join(unexpected[:50]))
    if any(k.split(".")[0].endswith("_m") for k in rest):
        notes.append("momentum (*_m) copies kept as extras (they never influence outputs)")
    return params, rest, [o for o, _ in missing], notes


def export_state_dict(params: Mapping[str, np.ndarray], cfg: Mapping, start_layer: int = 0,
                      extras: Mapping[str, np.ndarray] | None = None,
                      exclude: tuple | list = ()) -> Arrays:
    """Our flat params (+ extras from import) -> official state dict. `exclude`: our param
    paths not to write (e.g. those that were missing from the imported checkpoint)."""
    out: Arrays = {}
    for e in mapping(cfg, start_layer):
        if e.ours in params and e.ours not in exclude:
            for k, arr in zip(e.official, e.to_official(np.asarray(params[e.ours]))):
                out[k] = np.ascontiguousarray(arr)
    out[TIED[0]] = np.ascontiguousarray(params["decoder/embeddings/word/embedding"])
    out[TIED[1]] = np.ascontiguousarray(params["decoder/lm_bias"])
    for k, v in (extras or {}).items():
        out.setdefault(k, np.asarray(v))
    return out


def load_official(checkpoint: str | Mapping[str, np.ndarray], config_bert: str,
                  config_yaml: str | None = None, overrides: dict | None = None, seed: int = 0,
                  allow_missing_temporal: bool = False) -> Converted:
    """Load an official mPLUG-2 checkpoint (path or state dict) with its config files."""
    state = (official_io.load_state_dict(checkpoint) if isinstance(checkpoint, str)
             else dict(checkpoint))
    bert, cfg_yaml = official_io.read_official_configs(config_bert, config_yaml)
    cfg, start = config_from_official(bert, cfg_yaml, state)
    cfg.update(overrides or {})
    model = M.MPLUG2.from_config(cfg)
    abstract = M.abstract_params(model)
    shapes = {k: v.shape for k, v in P.flatten(abstract).items()}
    flat, extras, missing, notes = import_state_dict(state, cfg, start, shapes,
                                                     allow_missing_temporal)
    # Everything loaded: the abstract tree gives the boxes without running init; only the
    # vision encoder missing (temporal modules): initialise just that part.
    rng = jax.random.PRNGKey(seed)
    if not missing:
        init = abstract
    elif all(m.startswith("vision/") for m in missing):
        vision = M.vision_module(model)
        frames = jax.numpy.zeros((1, 2, model.image_size, model.image_size, 3))
        init = {**abstract, "vision": jax.jit(vision.init)(rng, frames)["params"]}
    else:
        init = M.init_params(model, rng)
    params = P.merge_into(init, flat)
    return Converted(model, cfg, start, params, extras, missing, notes)


def export_official(conv_or_params: Converted | Any, model: M.MPLUG2 | None = None,
                    extras: Mapping | None = None, start_layer: int | None = None,
                    exclude: tuple | list | None = None) -> Arrays:
    """Our params -> official state dict: `export_official(conv)` for a `Converted`
    (writes back its extras and leaves out its missing params), or
    `export_official(params, model, extras, start_layer)`."""
    if isinstance(conv_or_params, Converted):
        c = conv_or_params
        params, model = c.params, c.model
        extras = c.extras if extras is None else extras
        start_layer = c.start_layer if start_layer is None else start_layer
        exclude = c.missing if exclude is None else exclude
    else:
        params = conv_or_params
    if model is None:
        raise ValueError("export_official(params, model, ...) needs the MPLUG2 model")
    flat = {k: np.asarray(jax.device_get(v)) for k, v in P.flatten(params).items()}
    cfg = {f.name: getattr(model, f.name) for f in dataclasses.fields(M.MPLUG2)
           if f.name not in ("parent", "name")}
    return export_state_dict(flat, cfg, start_layer or 0, extras, exclude or ())


# ---- converted checkpoint directories and official config files ----------------------------------

CONFIG_FILE = "mplug2_config.json"


def is_mplug2_config(config_bert: str) -> bool:
    """Whether an official config_bert.json is an mPLUG-2 one: it has `num_uni_layer` (the
    universal layers); mPLUG v1 configs share every other key, `text_encoder_layers` too."""
    with open(config_bert) as f:
        bert = json.load(f)
    return "num_uni_layer" in bert


def is_converted_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_converted(conv: Converted, out_dir: str) -> None:
    """Write an orbax checkpoint directory: params, model config, extras (safetensors)."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tree = {"params": jax.tree.map(np.asarray, P.flatten(conv.params))}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "state"), tree, force=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({"model": conv.model_cfg, "start_layer": conv.start_layer,
                   "missing_from_official": conv.missing, "notes": conv.notes}, f, indent=2)
    if conv.extras:
        official_io.save_state_dict(conv.extras,
                                    os.path.join(out_dir, "official_extras.safetensors"))


def load_converted(ckpt_dir: str) -> Converted:
    """Read a directory written by `save_converted`."""
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not is_converted_dir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not an mPLUG-2 converted checkpoint (no "
                                f"{CONFIG_FILE})")
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        meta = json.load(f)
    model = M.MPLUG2.from_config(meta["model"])
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(ckpt_dir, "state"))
    params = P.merge_into(M.abstract_params(model), tree["params"])
    extras_path = os.path.join(ckpt_dir, "official_extras.safetensors")
    extras = official_io.load_state_dict(extras_path) if os.path.isfile(extras_path) else {}
    return Converted(model, meta["model"], meta["start_layer"], params, extras,
                     meta.get("missing_from_official", []), meta.get("notes", []))


def official_config_files(model: M.MPLUG2, start_layer: int = 0) -> tuple[dict, dict]:
    """(config_bert.json dict, task yaml dict) that `config_from_official` maps back to
    `model` (the official key names; docs/fixtures.md#mplug-2-configs-and-state-dict)."""
    bert = dict(
        hidden_size=model.hidden_size, num_attention_heads=model.num_heads,
        intermediate_size=model.mlp_dim, hidden_act="gelu", layer_norm_eps=model.text_ln_eps,
        vocab_size=model.vocab_size, max_position_embeddings=model.max_len,
        type_vocab_size=model.type_vocab_size, pad_token_id=0, encoder_width=model.hidden_size,
        text_encoder_layers=model.text_layers, num_uni_layer=model.universal_layers,
        num_hidden_layers=start_layer + model.fusion_layers, fusion_layers=model.fusion_layers,
        stride_layer=model.fusion_stride, text_decode_layers=model.decoder_layers,
        add_cross_attention=False, model_type="bert")
    yml = dict(image_res=model.image_size, vision_width=model.vision_width,
               model_num_frames=model.num_frames,
               clip_name="ViT-L-14" if model.patch_size == 14 else "ViT-B-16",
               clip_tiny=dict(vision_layers=model.vision_layers,
                              vision_patch_size=model.patch_size,
                              vision_heads=model.vision_heads))
    return bert, yml
