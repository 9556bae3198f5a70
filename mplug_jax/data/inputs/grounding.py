"""Grounding input (RefCOCO family): official split files -> train and eval batches.

Sources (`input.dataset`): 'unc' (RefCOCO), 'unc+' (RefCOCO+), 'gref', 'gref_umd' (RefCOCOg),
'referit', 'flickr', 'vg_uni' (train: referit + unc + unc+ + gref_umd train concatenated) -
split files `<split_root>/<name>/<name>_<split>.pth` (or `.json`, the same tuples), images
under `<data_root>` as the official loader (docs/official-formats.md#refcoco-grounding), read by
`formats.grounding.read`; 'synthetic': the built-in shapes expressions
(`data.synthetic_grounding`, scene layout `input.synthetic`), written once in that layout
under `input.synthetic_dir`.

Transforms (official `grounding_mplug.py` / TransVG `transforms.py`), images channels last:
- train: long side resized (bilinear, aspect kept) to a random one of the 7 sizes
  R - k * (R // 20), k = 0..6; or, with p = 0.5 when `crop` is on and the phrase names no
  position (left / right / top / bottom / middle), short side to one of `crop_short_sides`, a
  random crop of `crop_range` px that keeps the box centre (box clipped to it), then the
  long-side resize; with p = `color_jitter_p` (official 0.8) colour jitter (brightness,
  contrast, saturation 0.4, random order);
  horizontal flip p = 0.5 mirroring the box and swapping 'left' <-> 'right' in the phrase;
  normalise; pad to R x R (random placement with `translate`, else centred).
- eval: long side to R, normalise, pad centred (top = round(dh / 2 - 0.1)).
Normalisation: CLIP mean/std in both (the official switches to ImageNet statistics at
evaluation, quirk G2; `official_eval_normalisation=True` restores that).

Box: the split file's, with `input.int_box` (official) cast to int (truncated) before the
corner conversion, so x2 = int(x) + int(w) (`formats.grounding.read`; referit and flickr files hold
corners, cast as they are). Box target: (cx, cy, w, h) of the box in the padded R x R frame,
divided by R.
Text: "[CLS] " + tokens(phrase.lower())[:L - 2] + " [SEP]", 0-padded to L = max_query_len.

Train batch (per process, B rows): image float32[B, R, R, 3], text_ids / text_mask int32[B, L],
gt_box float32[B, 4], idx int32[B] (source index).
Eval batch: the same plus ratio float32[B], left / top int32[B] (to map boxes back to the
original pixels) and width / height int32[B] (original image size).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import grounding as grounding_format
from mplug_jax.data.formats.base import RecordSource
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import BadRecord

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "unc", "unc+", "gref", "gref_umd", "referit", "flickr", "vg_uni")
VG_UNI = ("referit", "unc", "unc+", "gref_umd")
# Split files whose boxes are corners [x1, y1, x2, y2] (official pull_item); the others
# [x, y, w, h].
CORNER_BOXES = ("referit", "flickr")
SPATIAL_WORDS = ("left", "right", "top", "bottom", "middle")
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
DEFAULT_AUGMENT = dict(scale=True, crop=True, crop_short_sides=(400, 500, 600),
                       crop_range=(384, 600), color_jitter=0.4, color_jitter_p=0.8, hflip=True,
                       translate=True)


# ---- text ---------------------------------------------------------------------------------

def swap_left_right(phrase: str) -> str:
    """Official flip text rule: every 'left' becomes 'right' and vice versa (substrings)."""
    marker = "\0"
    return phrase.replace("right", marker).replace("left", "right").replace(marker, "left")


def encode_phrases(phrases: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Official ids: "[CLS] tokens(phrase.lower())[:L - 2] [SEP]", 0-padded -> int32[B, L] x 2.

    Raises ValueError for an empty phrase."""
    for i, p in enumerate(phrases):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"referring expression {i} is empty or not a string: {p!r}")
    ids, mask = tokenizer.get_tokenizer().encode([p.lower() for p in phrases])
    out = np.zeros((len(phrases), max_len), np.int32)
    for i in range(len(phrases)):
        body = ids[i, 1:int(mask[i].sum())][:max_len - 2]
        seq = [tokenizer.CLS_ID, *body.tolist(), tokenizer.SEP_ID]
        out[i, :len(seq)] = seq
    return out, (out != 0).astype(np.int32)


# ---- image + box transforms ---------------------------------------------------------------

def _resize_long(img: Image.Image, box: np.ndarray, size: int):
    w, h = img.size
    ratio = size / max(w, h)
    new = (round(w * ratio), round(h * ratio))
    return img.resize(new, Image.BILINEAR), (box * np.float32(ratio)).astype(np.float32), ratio


def _normalise(img: Image.Image, imagenet: bool) -> np.ndarray:
    x = np.asarray(img, np.float32) / np.float32(255)
    if imagenet:
        return (x - IMAGENET_MEAN) / IMAGENET_STD
    return (x - transforms.CLIP_MEAN) / transforms.CLIP_STD


def _pad(x: np.ndarray, box: np.ndarray, size: int, rng: np.random.Generator | None):
    """Zero-pad float[h, w, 3] to [size, size, 3] (centred, or at a random place with `rng`);
    shifts the xyxy box. Returns (image, box, left, top)."""
    h, w = x.shape[:2]
    dw, dh = size - w, size - h
    if rng is None:
        top, left = round(dh / 2 - 0.1), round(dw / 2 - 0.1)
    else:
        top, left = int(rng.integers(0, dh + 1)), int(rng.integers(0, dw + 1))
    out = np.zeros((size, size, 3), np.float32)
    out[top:top + h, left:left + w] = x
    box = box + np.array([left, top, left, top], np.float32)
    return out, box, left, top


def normalised_cxcywh(box_xyxy: np.ndarray, size: int) -> np.ndarray:
    """Padded-frame xyxy pixels -> float32 (cx, cy, w, h) / size."""
    x0, y0, x1, y1 = box_xyxy
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], np.float32) / \
        np.float32(size)


def eval_transform(img: Image.Image, size: int, *, imagenet: bool = False):
    """Official eval transform of one RGB image -> (float32[R, R, 3], ratio, left, top)."""
    img, _, ratio = _resize_long(transforms.to_rgb(img), np.zeros(4, np.float32), size)
    x, _, left, top = _pad(_normalise(img, imagenet), np.zeros(4, np.float32), size, None)
    return x, ratio, left, top


def flip(img: Image.Image, box_xyxy: np.ndarray, phrase: str):
    """Horizontal flip: mirrored image and box, 'left' <-> 'right' swapped in the phrase."""
    w = img.size[0]
    x0, y0, x1, y1 = box_xyxy
    return (img.transpose(Image.FLIP_LEFT_RIGHT), np.array([w - x1, y0, w - x0, y1], np.float32),
            swap_left_right(phrase))


def jitter_drawn(p: float, rng: np.random.Generator) -> bool:
    """Whether the colour jitter applies to this image: official ColorJitter, p = 0.8. p >= 1
    draws nothing (every image; the random stream of this repository's earlier versions)."""
    return p >= 1 or bool(rng.random() < p)


def _color_jitter(img: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for k in rng.permutation(len(ops)):
        img = ops[int(k)](img).enhance(float(rng.uniform(max(0.0, 1 - strength), 1 + strength)))
    return img


def _random_crop(img: Image.Image, box: np.ndarray, lo: int, hi: int,
                 rng: np.random.Generator, tries: int = 20):
    """A random crop of lo..hi px per side that keeps the box centre; the box clipped."""
    w, h = img.size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for _ in range(tries):
        cw = int(rng.integers(min(lo, w), min(w, hi) + 1))
        ch = int(rng.integers(min(lo, h), min(h, hi) + 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        if left < cx < left + cw and top < cy < top + ch:
            b = box - np.array([left, top, left, top], np.float32)
            b = np.clip(b, 0, [cw, ch, cw, ch]).astype(np.float32)
            return img.crop((left, top, left + cw, top + ch)), b
    return img, box


def train_transform(img: Image.Image, box_xyxy: np.ndarray, phrase: str, size: int,
                    rng: np.random.Generator, augment: dict | None = None):
    """Official training transform (module docstring) of one example.

    Args:
      img: PIL image; box_xyxy: float32[4] pixels; phrase: lower-cased expression.
      augment: DEFAULT_AUGMENT keys; None = no augmentation (eval resize, centred pad, no
        jitter / flip).
    Returns:
      (float32[R, R, 3] CLIP-normalised, float32[4] normalised cxcywh box, phrase).
    """
    img, box = transforms.to_rgb(img), np.asarray(box_xyxy, np.float32)
    aug = None if augment is None else {**DEFAULT_AUGMENT, **augment}
    if aug is None:
        img, box, _ = _resize_long(img, box, size)
        x, box, _, _ = _pad(_normalise(img, False), box, size, None)
        return x, normalised_cxcywh(box, size), phrase
    sizes = [size - k * (size // 20) for k in range(7)] if aug["scale"] else [size]
    long_side = sizes[int(rng.integers(len(sizes)))]
    spatial = any(word in phrase for word in SPATIAL_WORDS)
    if aug["crop"] and not spatial and rng.random() < 0.5:
        short = aug["crop_short_sides"][int(rng.integers(len(aug["crop_short_sides"])))]
        ratio = short / min(img.size)
        img = img.resize((round(img.size[0] * ratio), round(img.size[1] * ratio)),
                         Image.BILINEAR)
        img, box = _random_crop(img, box * np.float32(ratio), *aug["crop_range"], rng)
    img, box, _ = _resize_long(img, box, long_side)
    if aug["color_jitter"] and jitter_drawn(float(aug["color_jitter_p"]), rng):
        img = _color_jitter(img, float(aug["color_jitter"]), rng)
    if aug["hflip"] and rng.random() < 0.5:
        img, box, phrase = flip(img, box, phrase)
    x, box, _, _ = _pad(_normalise(img, False), box, size, rng if aug["translate"] else None)
    return x, normalised_cxcywh(box, size), phrase


# ---- sources ------------------------------------------------------------------------------

class _Concat(RecordSource):
    """Records of several sources in order (vg_uni)."""

    def __init__(self, parts: list[RecordSource]):
        skipped = {k: sum(p.skipped.get(k, 0) for p in parts) for k in parts[0].skipped}
        super().__init__([r for p in parts for r in p.records], skipped,
                         "+".join(p.name for p in parts))


def image_dir(data_root: str, name: str) -> str:
    """Image folder of an official dataset name under data_root (official loader)."""
    if name == "referit":
        return os.path.join(data_root, "referit", "images")
    if name == "flickr":
        return os.path.join(data_root, "Flickr30k", "flickr30k_images")
    return os.path.join(data_root, "other", "images", "mscoco", "images", "train2014")


def split_path(split_root: str, name: str, split: str) -> str:
    """`<split_root>/<name>/<name>_<split>.pth`, or the `.json` of the same tuples."""
    stem = os.path.join(split_root, name, f"{name}_{split}")
    for ext in (".pth", ".json"):
        if os.path.isfile(stem + ext):
            return stem + ext
    raise FileNotFoundError(f"no split file {stem}.pth or {stem}.json (input.split_root="
                            f"{split_root!r}, dataset {name!r}, split {split!r})")


def synthetic_root(input_cfg, image_size: int, seed: int) -> str:
    """Where the built-in data is written (input.synthetic_dir, or a folder under /tmp)."""
    root = input_cfg.get("synthetic_dir") or ""
    if not root:
        import hashlib
        import tempfile

        from mplug_jax.data.synthetic import grounding as synthetic_grounding
        lay = synthetic_grounding.layout(input_cfg.get("synthetic"))
        tag = "" if lay == synthetic_grounding.layout() else "_layout" + hashlib.sha1(
            repr(sorted(lay.items())).encode()).hexdigest()[:8]
        root = os.path.join(tempfile.gettempdir(), f"mplug_jax_grounding_shapes_{image_size}px"
                            f"_seed{seed}{tag}")
    return root


def source(input_cfg, split: str, *, dataset: str | None = None, size: int = 0,
           image_size: int = 64, seed: int = 0) -> RecordSource:
    """Records {image, bbox [x, y, w, h] px, phrase, id} of `dataset` (default
    input.dataset) / `split`; `size` = records of the synthetic split (ignored otherwise).
    `input.int_box`: the file's box cast to int first (official, `formats.grounding.read`)."""
    name = dataset or input_cfg.dataset
    if name not in DATASETS:
        raise ValueError(f"unknown grounding dataset {name!r}; valid: {', '.join(DATASETS)}")
    rate = float(input_cfg.get("max_skip_rate", 0.01))
    int_box = bool(input_cfg.get("int_box", False))
    if name == "synthetic":
        from mplug_jax.data.synthetic import grounding as synthetic_grounding
        if split not in ("train", "heldout", "test"):
            raise ValueError("the synthetic grounding data has splits train / heldout / test, "
                             f"not {split!r}")
        if size <= 0:
            raise ValueError("the synthetic grounding data needs a size > 0")
        root = synthetic_root(input_cfg, image_size, seed)
        path = synthetic_grounding.write_split(root, split, size, image_size=image_size,
                                               seed=seed, options=input_cfg.get("synthetic"))
        return grounding_format.read(path, os.path.join(root, "images"), max_skip_rate=rate,
                                     int_box=int_box)
    data_root, split_root = input_cfg.get("data_root", ""), input_cfg.get("split_root", "")
    if not data_root or not split_root:
        raise ValueError(f"grounding dataset {name!r} needs input.data_root (images, official "
                         "ln_data) and input.split_root (split files, official data/)")
    names = VG_UNI if name == "vg_uni" and split == "train" else \
        ("unc",) if name == "vg_uni" else (name,)
    parts = [grounding_format.read(split_path(split_root, n, split), image_dir(data_root, n),
                                   flickr=n == "flickr", corners=n in CORNER_BOXES,
                                   int_box=int_box, max_skip_rate=rate) for n in names]
    return parts[0] if len(parts) == 1 else _Concat(parts)


# ---- batches ------------------------------------------------------------------------------

def to_example(record: Any, rng: pipeline.RecordRng, *, image_size: int, max_query_len: int,
               augment: dict | None, train: bool, imagenet_eval: bool) -> dict[str, Any]:
    """One grounding record -> example (module docstring; the eval fields when not `train`);
    the training transform draws from stream 7 of `rng`. Raises BadRecord."""
    phrase = record["phrase"]
    if not isinstance(phrase, str) or not phrase.strip():
        raise BadRecord("bad_record", "empty referring expression")
    img = transforms.decode_image(record["image"])
    x, y, w, h = (float(v) for v in record["bbox"])
    box = np.array([x, y, x + w, y + h], np.float32)
    extra = {}
    if train:
        image, gt, phrase = train_transform(img, box, phrase, image_size, rng.stream(7), augment)
    else:
        image, ratio, left, top = eval_transform(img, image_size, imagenet=imagenet_eval)
        shifted = box * np.float32(ratio) + np.array([left, top, left, top], np.float32)
        gt = normalised_cxcywh(shifted, image_size)
        extra = dict(ratio=np.float32(ratio), left=np.int32(left), top=np.int32(top),
                     width=np.int32(img.size[0]), height=np.int32(img.size[1]))
    ids, mask = encode_phrases([phrase], max_query_len)
    return {"image": image.astype(np.float32), "text_ids": ids[0], "text_mask": mask[0],
            "gt_box": gt.astype(np.float32), **extra}


def example_fn(input_cfg, image_size: int, train: bool):
    """`to_example` with the options of `input_cfg` bound (picklable; augmentation when
    training and `input.augment.enabled`)."""
    return functools.partial(
        to_example, image_size=image_size, max_query_len=int(input_cfg.max_query_len),
        train=train, augment=pipeline.augment_options(input_cfg.get("augment"), DEFAULT_AUGMENT)
        if train else None,
        imagenet_eval=bool(input_cfg.get("official_eval_normalisation", False)))


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    src = source(inp, "train", size=int(inp.get("train_size", 0)),
                 image_size=int(inp.get("synthetic_image_size", 64)), seed=config.seed)
    return pipeline.train_batches(inp, src, example_fn(inp, config.model.image_size, True),
                                  process_index, process_count, what="grounding")


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Every usable record of `src` in order (`eval_loader.batches`; unusable records skipped
    and logged), in batches of `batch_size` (the last one may be shorter)."""
    return eval_loader.batches(src, example_fn(config.input, config.model.image_size, False),
                               batch_size=batch_size, process_index=process_index,
                               process_count=process_count, bad="skip", pad=None,
                               what="grounding")
