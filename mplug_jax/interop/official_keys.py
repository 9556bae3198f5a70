"""Official PyTorch mPLUG state dicts <-> our Flax params: the one mapping table, import, export.

The table (`mapping`) lists, for every parameter of our model, the official key(s) it comes
from and the exact array transforms both ways (transposes / reshapes only, so import -> export
is bit-identical). Official tensors our model never uses (CLIP text tower, `visual.proj`, fusion
embeddings, fusion modules before `start_layer`, cross-attention weights of connected layers,
retrieval queues) are returned as `extras` and written back on export.

Reading and writing checkpoint files lives in :mod:`official_io`, translating the official
config files into our model kwargs in :mod:`official_config`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np

from mplug_jax.interop.errors import CheckpointError
from mplug_jax.models.fusion import fusion_pattern
from mplug_jax.models.vit import resample_posemb

Arrays = dict[str, np.ndarray]

# Official top-level module -> its momentum copy (`distill: True` checkpoints).
MOMENTUM_PREFIXES = ("visual_encoder", "text_encoder", "fusion_encoder", "text_decoder",
                     "visn_fc", "visn_layer_norm", "vision_proj", "text_proj")
# Our heads that official fine-tuned checkpoints (VQA, caption) do not contain.
HEADS_ABSENT_IN_TASK_CHECKPOINTS = r"^(vision_proj|text_proj|itm_head|mlm_transform|mlm_ln|" \
                                   r"mlm_bias|temp)(/|$)"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our params and the official key(s) it is made from."""
    ours: str
    official: tuple[str, ...]
    to_ours: Callable[..., np.ndarray]
    to_official: Callable[[np.ndarray], tuple[np.ndarray, ...]]


# ---- array transforms (official Linear weights are [out, in]: y = x @ W.T + b) -------------

def _identity() -> tuple[Callable, Callable]:
    return (lambda w: w), (lambda x: (x,))


def _linear() -> tuple[Callable, Callable]:
    return (lambda w: w.T), (lambda k: (k.T,))


def _to_heads(heads: int) -> tuple[Callable, Callable]:
    """[H*K, D] weight -> [D, H, K] kernel; [H*K] bias -> [H, K]."""
    def fwd(w):
        return w.T.reshape(w.shape[1], heads, -1) if w.ndim == 2 else w.reshape(heads, -1)

    def bwd(k):
        return (k.reshape(k.shape[0], -1).T,) if k.ndim == 3 else (k.reshape(-1),)
    return fwd, bwd


def _stack_heads(heads: int) -> tuple[Callable, Callable]:
    """n weights [H*K, D] -> [D, n, H, K] (n biases [H*K] -> [n, H, K])."""
    one, one_back = _to_heads(heads)

    def fwd(*ws):
        return np.stack([one(w) for w in ws], axis=1 if ws[0].ndim == 2 else 0)

    def bwd(k):
        axis = 1 if k.ndim == 4 else 0
        return tuple(one_back(np.take(k, i, axis=axis))[0] for i in range(k.shape[axis]))
    return fwd, bwd


def _in_proj(heads: int) -> tuple[Callable, Callable]:
    """CLIP fused in_proj [3W, W] -> [W, 3, H, K]; bias [3W] -> [3, H, K]."""
    def fwd(w):
        if w.ndim == 1:
            return w.reshape(3, heads, -1)
        return w.reshape(3, heads, -1, w.shape[1]).transpose(3, 0, 1, 2)

    def bwd(k):
        if k.ndim == 3:
            return (k.reshape(-1),)
        return (k.transpose(1, 2, 3, 0).reshape(-1, k.shape[0]),)
    return fwd, bwd


def _out_proj(heads: int) -> tuple[Callable, Callable]:
    """[D, H*K] -> [H, K, D]."""
    return (lambda w: w.T.reshape(heads, -1, w.shape[0])), \
        (lambda k: (k.reshape(-1, k.shape[-1]).T,))


def _conv() -> tuple[Callable, Callable]:
    """torch conv [O, I, kh, kw] -> flax [kh, kw, I, O]."""
    return (lambda w: w.transpose(2, 3, 1, 0)), (lambda k: (k.transpose(3, 2, 0, 1),))


# ---- the table -------------------------------------------------------------------------------

def _entry(out: list, ours: str, official, fns: tuple[Callable, Callable]) -> None:
    official = (official,) if isinstance(official, str) else tuple(official)
    out.append(Entry(ours, official, fns[0], fns[1]))


def _layer_norm(out, ours, off):
    _entry(out, f"{ours}/scale", f"{off}.weight", _identity())
    _entry(out, f"{ours}/bias", f"{off}.bias", _identity())


def _dense(out, ours, off):
    _entry(out, f"{ours}/kernel", f"{off}.weight", _linear())
    _entry(out, f"{ours}/bias", f"{off}.bias", _identity())


def _bert_embeddings(out, ours, off):
    _entry(out, f"{ours}/word/embedding", f"{off}.word_embeddings.weight", _identity())
    _entry(out, f"{ours}/position/embedding", f"{off}.position_embeddings.weight", _identity())
    _entry(out, f"{ours}/token_type/embedding", f"{off}.token_type_embeddings.weight",
           _identity())
    _layer_norm(out, f"{ours}/ln", f"{off}.LayerNorm")


def _bert_layer(out, ours, off, heads, cross):
    sa = f"{off}.attention.self"
    for p in ("weight", "bias"):
        leaf = "kernel" if p == "weight" else "bias"
        _entry(out, f"{ours}/self_attn/qkv/{leaf}",
               [f"{sa}.query.{p}", f"{sa}.key.{p}", f"{sa}.value.{p}"], _stack_heads(heads))
    _entry(out, f"{ours}/self_attn/out/kernel", f"{off}.attention.output.dense.weight",
           _out_proj(heads))
    _entry(out, f"{ours}/self_attn/out/bias", f"{off}.attention.output.dense.bias", _identity())
    _layer_norm(out, f"{ours}/self_ln", f"{off}.attention.output.LayerNorm")
    if cross:
        ca = f"{off}.crossattention.self"
        for p in ("weight", "bias"):
            leaf = "kernel" if p == "weight" else "bias"
            _entry(out, f"{ours}/cross_attn/query/{leaf}", f"{ca}.query.{p}", _to_heads(heads))
            _entry(out, f"{ours}/cross_attn/kv/{leaf}", [f"{ca}.key.{p}", f"{ca}.value.{p}"],
                   _stack_heads(heads))
        _entry(out, f"{ours}/cross_attn/out/kernel", f"{off}.crossattention.output.dense.weight",
               _out_proj(heads))
        _entry(out, f"{ours}/cross_attn/out/bias", f"{off}.crossattention.output.dense.bias",
               _identity())
        _layer_norm(out, f"{ours}/cross_ln", f"{off}.crossattention.output.LayerNorm")
    _dense(out, f"{ours}/mlp/fc1", f"{off}.intermediate.dense")
    _dense(out, f"{ours}/mlp/fc2", f"{off}.output.dense")
    _layer_norm(out, f"{ours}/mlp_ln", f"{off}.output.LayerNorm")


def clip_vision(out: list[Entry], c: Mapping, patch, block_extra=None,
                v: str = "visual_encoder.visual") -> None:
    """Append the CLIP visual tower's entries (patch conv with the transform pair `patch`,
    class / position embeddings, blocks, ln_pre / ln_post; `visn_fc` / `visn_ln` when
    vision_width != hidden_size). `block_extra(out, ours, off)` adds a block's own entries
    first (mPLUG-2's local temporal modules)."""
    vheads = c["vision_heads"]
    _entry(out, "vision/patch_embed/kernel", f"{v}.conv1.weight", patch)
    _entry(out, "vision/cls_token", f"{v}.class_embedding", _identity())
    _entry(out, "vision/pos_embed", f"{v}.positional_embedding", _identity())
    _layer_norm(out, "vision/ln_pre", f"{v}.ln_pre")
    for i in range(c["vision_layers"]):
        ours, off = f"vision/blocks_{i}", f"{v}.transformer.resblocks.{i}"
        if block_extra is not None:
            block_extra(out, ours, off)
        _layer_norm(out, f"{ours}/ln_1", f"{off}.ln_1")
        _layer_norm(out, f"{ours}/ln_2", f"{off}.ln_2")
        _entry(out, f"{ours}/attn/qkv/kernel", f"{off}.attn.in_proj_weight", _in_proj(vheads))
        _entry(out, f"{ours}/attn/qkv/bias", f"{off}.attn.in_proj_bias", _in_proj(vheads))
        _entry(out, f"{ours}/attn/out/kernel", f"{off}.attn.out_proj.weight", _out_proj(vheads))
        _entry(out, f"{ours}/attn/out/bias", f"{off}.attn.out_proj.bias", _identity())
        _dense(out, f"{ours}/mlp/fc1", f"{off}.mlp.c_fc")
        _dense(out, f"{ours}/mlp/fc2", f"{off}.mlp.c_proj")
    _layer_norm(out, "vision/ln_post", f"{v}.ln_post")
    if c["vision_width"] != c["hidden_size"]:
        _dense(out, "visn_fc", "visn_fc")
        _layer_norm(out, "visn_ln", "visn_layer_norm")


def mapping(model_cfg: Mapping, start_layer: int = 0) -> list[Entry]:
    """Every param of `MPLUG(**model_cfg)` (loop layout) with its official source keys.

    `start_layer` is the index of the first official fusion module that runs
    (official `num_hidden_layers - fusion_layers`).
    """
    c = dict(model_cfg)
    heads = c["num_heads"]
    out: list[Entry] = []
    clip_vision(out, c, _conv())

    _bert_embeddings(out, "text/embeddings", "text_encoder.embeddings")
    for i in range(c["text_layers"]):
        _bert_layer(out, f"text/encoder/layer_{i}", f"text_encoder.encoder.layer.{i}", heads,
                    cross=False)

    # Official quirk: only the LAST `fusion_layers` of `num_hidden_layers` fusion modules run,
    # so our fusion layer i is official module `start_layer + i`; the stride rule counts from
    # the first running module (`layer_nums = i - start_layer`), see `fusion_pattern`.
    pattern = fusion_pattern(c["fusion_layout"], c["fusion_layers"], c["fusion_stride"])
    for i, kind in enumerate(pattern):
        off = f"fusion_encoder.encoder.layer.{start_layer + i}"
        if kind == "a":
            _bert_layer(out, f"fusion/layer_{i}/text", off, heads, cross=True)
        elif kind == "c":
            _bert_layer(out, f"fusion/layer_{i}/joint", off, heads, cross=False)
        else:
            raise CheckpointError(
                f"fusion layer {i} is of kind {kind!r}, which the official code does not have "
                "(official networks use only 'a' co-attention and 'c' connected layers)")

    _bert_embeddings(out, "decoder/embeddings", "text_decoder.bert.embeddings")
    for i in range(c["decoder_layers"]):
        _bert_layer(out, f"decoder/decoder/layer_{i}", f"text_decoder.bert.encoder.layer.{i}",
                    heads, cross=True)
    cls = "text_decoder.cls.predictions"
    _dense(out, "decoder/lm_transform", f"{cls}.transform.dense")
    _layer_norm(out, "decoder/lm_ln", f"{cls}.transform.LayerNorm")
    _entry(out, "decoder/lm_bias", f"{cls}.bias", _identity())

    # Pretraining / retrieval heads (official retrieval model names).
    _dense(out, "vision_proj", "vision_proj")
    _dense(out, "text_proj", "text_proj")
    _dense(out, "itm_head", "itm_head")
    _entry(out, "temp", "temp", (lambda w: np.asarray(w).reshape(()),
                                 lambda x: (np.asarray(x).reshape(()),)))
    # MLM head: the official BertForMaskedLM `cls.predictions` layout under `text_encoder`.
    _dense(out, "mlm_transform", "text_encoder.cls.predictions.transform.dense")
    _layer_norm(out, "mlm_ln", "text_encoder.cls.predictions.transform.LayerNorm")
    _entry(out, "mlm_bias", "text_encoder.cls.predictions.bias", _identity())
    return out


def _momentum_key(key: str) -> str | None:
    top, _, rest = key.partition(".")
    return f"{top}_m.{rest}" if top in MOMENTUM_PREFIXES else None


# Tied / buffer keys regenerated on export from params (never stored as extras).
def _regenerated(params: Mapping[str, np.ndarray], suffix: str = "") -> Arrays:
    out = {}
    dec = f"text_decoder{suffix}.cls.predictions"
    if "decoder/embeddings/word/embedding" in params:
        out[f"{dec}.decoder.weight"] = params["decoder/embeddings/word/embedding"]
        out[f"{dec}.decoder.bias"] = params["decoder/lm_bias"]
    for top, ours in (("text_encoder", "text"), ("text_decoder.bert", "decoder"),
                      ("fusion_encoder", None)):
        emb = f"{ours}/embeddings/position/embedding"
        n = params[emb].shape[0] if ours and emb in params else None
        if n is not None:
            head, _, tail = top.partition(".")
            name = f"{head}{suffix}.{tail}.embeddings" if tail else f"{head}{suffix}.embeddings"
            out[f"{name}.position_ids"] = np.arange(n, dtype=np.int64)[None]
    return out


_KNOWN_UNUSED = [
    r"^visual_encoder(_m)?\.(?!visual\.)",            # CLIP text tower
    r"^visual_encoder(_m)?\.visual\.proj$",           # CLIP projection (skip_last_layer)
    r"^fusion_encoder(_m)?\.embeddings\.",            # fusion takes text_embeds directly
    r"^fusion_encoder(_m)?\.encoder\.layer\.\d+\.",   # unused modules / connected cross-attn
    r"\.position_ids$",
    r"^(image_queue|text_queue|idx_queue|queue_ptr)$",
    r"^(prefix_ids|target_ids|bbox_prob_mask)$",      # grounding buffers
]


def rename_pretrained_keys(state: Mapping[str, np.ndarray]) -> Arrays:
    """Official fine-tune loader renaming: drop 'fusion.' and 'bert.' from encoder keys
    (`text_encoder.bert.X` -> `text_encoder.X`), never from decoder keys."""
    out = {}
    for k, v in state.items():
        if ("bert" in k or "fusion" in k) and "decode" not in k:
            k = k.replace("fusion.", "").replace("bert.", "")
        out[k] = v
    return out


@dataclasses.dataclass
class Imported:
    """Result of `import_state_dict`: flat param dicts keyed by our 'a/b/c' paths."""
    params: Arrays
    momentum: Arrays
    extras: Arrays
    missing: list[str]
    notes: list[str]


def import_state_dict(state: Mapping[str, np.ndarray], model_cfg: Mapping, start_layer: int = 0,
                      expected_shapes: Mapping[str, tuple] | None = None,
                      allow_missing: str | None = HEADS_ABSENT_IN_TASK_CHECKPOINTS) -> Imported:
    """Convert an official state dict to our (flat) params.

    Args:
      state: official key -> array.
      model_cfg: MPLUG kwargs (see `official_config.config_from_official`).
      start_layer: first official fusion module that runs.
      expected_shapes: our path -> shape (from `jax.eval_shape` of init); every converted array
        is checked against it, a mismatch raises naming the key and both shapes.
      allow_missing: regex of our params that may be absent from the checkpoint (reported in
        `missing`, to be initialised by the caller). Anything else missing raises.
    Raises:
      CheckpointError naming missing, unexpected or mis-shaped keys.
    """
    state = rename_pretrained_keys(state)
    table = mapping(model_cfg, start_layer)
    params, momentum, used, missing, notes, bad = {}, {}, set(), [], [], []
    grid = model_cfg["image_size"] // model_cfg["patch_size"]
    for e in table:
        present = [k in state for k in e.official]
        if not all(present):
            if any(present):
                bad.append(f"{e.ours}: partially present, missing "
                           f"{[k for k in e.official if k not in state]}")
            missing.append(e.ours)
            continue
        for target, keys in ((params, e.official),
                             (momentum, tuple(_momentum_key(k) for k in e.official))):
            if not all(k is not None and k in state for k in keys):
                continue
            arr = e.to_ours(*[np.asarray(state[k]) for k in keys])
            if e.ours == "vision/pos_embed" and arr.shape[0] != grid * grid + 1:
                notes.append(f"{keys[0]}: resized {arr.shape[0] - 1} -> {grid * grid} patches")
                arr = resample_posemb(arr, grid)
            want = expected_shapes.get(e.ours) if expected_shapes else None
            if want is not None and tuple(arr.shape) != tuple(want):
                bad.append(f"{' + '.join(keys)}: shape {tuple(state[keys[0]].shape)} -> "
                           f"{tuple(arr.shape)}, but the model expects {tuple(want)} for "
                           f"{e.ours}")
            target[e.ours] = arr
            used.update(keys)
    if bad:
        raise CheckpointError("checkpoint does not match the model config:\n  " +
                              "\n  ".join(bad))
    not_allowed = [m for m in missing if not (allow_missing and re.search(allow_missing, m))]
    if not_allowed:
        srcs = {e.ours: e.official for e in table}
        lines = [f"{m} (official {', '.join(srcs[m])})" for m in not_allowed]
        raise CheckpointError(f"{len(not_allowed)} parameters missing from the checkpoint:\n  "
                              + "\n  ".join(lines))
    _check_tied(state)
    regenerated = set(_regenerated(params)) | set(_regenerated(momentum, "_m"))
    rest = {k: np.asarray(v) for k, v in state.items() if k not in used and k not in regenerated}
    unexpected = [k for k in rest if not any(re.search(p, k) for p in _KNOWN_UNUSED)]
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected keys in the checkpoint (not used by "
                              f"this model config):\n  " + "\n  ".join(sorted(unexpected)[:50]))
    return Imported(params, momentum, rest, missing, notes)


def _check_tied(state: Mapping[str, np.ndarray]) -> None:
    for s in ("", "_m"):
        w = state.get(f"text_decoder{s}.cls.predictions.decoder.weight")
        emb = state.get(f"text_decoder{s}.bert.embeddings.word_embeddings.weight")
        if w is not None and emb is not None and not np.array_equal(w, emb):
            raise CheckpointError(f"text_decoder{s}.cls.predictions.decoder.weight differs from "
                                  "the decoder word embeddings; mplug-jax ties them as the "
                                  "official model does")


def export_state_dict(params: Mapping[str, np.ndarray], model_cfg: Mapping, start_layer: int = 0,
                      momentum: Mapping[str, np.ndarray] | None = None,
                      extras: Mapping[str, np.ndarray] | None = None) -> Arrays:
    """Our flat params (+ momentum, + extras from import) -> official state dict."""
    out: Arrays = {}
    for e in mapping(model_cfg, start_layer):
        for src, key_fn in ((params, lambda k: k), (momentum or {}, _momentum_key)):
            if e.ours not in src:
                continue
            keys = [key_fn(k) for k in e.official]
            if any(k is None for k in keys):
                continue
            for k, arr in zip(keys, e.to_official(np.asarray(src[e.ours]))):
                out[k] = np.asarray(arr, order="C")
    out.update(_regenerated(params))
    if momentum:
        out.update(_regenerated(momentum, "_m"))
    for k, v in (extras or {}).items():
        out.setdefault(k, np.asarray(v))
    return out
