"""RandAugment as in the official ALBEF/mPLUG `dataset/randaugment.py` (numpy + PIL, no cv2).

Official behaviour kept: N ops are drawn WITH replacement from the op list, each is then applied
with probability 0.5 at the fixed magnitude M (of 10); geometric ops fill with gray (128) and pick
a random sign; translation is in pixels (M/10 * 10 px, not a fraction of the size); enhance
factors are ``M/10 * 1.8 + 0.1`` (1.36 at M=7). One deliberate change: the official sharpness op
casts to uint8 without clipping (values wrap around); we clip to [0, 255].

Every op maps uint8[H, W, 3] -> uint8[H, W, 3] and takes its magnitude arguments explicitly; all
randomness comes from the ``np.random.Generator`` passed to :func:`rand_augment`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

MAX_LEVEL = 10.0
FILL = (128, 128, 128)
TRANSLATE_PIXELS = 10.0
OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
       "TranslateX", "TranslateY", "Rotate")


def identity(img: np.ndarray) -> np.ndarray:
    return img


def _apply_lut(img: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    out = np.empty_like(img)
    for c, table in enumerate(tables):
        out[..., c] = table[img[..., c]]
    return out


def auto_contrast(img: np.ndarray) -> np.ndarray:
    """Stretch each channel's [min, max] to [0, 255] (official cutoff 0)."""
    tables = []
    for c in range(img.shape[-1]):
        lo, hi = int(img[..., c].min()), int(img[..., c].max())
        if hi <= lo:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        scale = 255.0 / (hi - lo)
        table = np.arange(256, dtype=np.float64) * scale - lo * scale
        tables.append(np.clip(table, 0, 255).astype(np.uint8))
    return _apply_lut(img, tables)


def equalize(img: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation (PIL ImageOps.equalize rule, as the official)."""
    tables = []
    for c in range(img.shape[-1]):
        hist = np.bincount(img[..., c].ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        table = (np.cumsum(hist) + step // 2) // step
        table = np.concatenate([[0], table[:-1]])
        tables.append(np.clip(table, 0, 255).astype(np.uint8))
    return _apply_lut(img, tables)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Multiply intensities by `factor` (official: LUT on arange(256) * factor, clipped)."""
    table = np.clip(np.arange(256, dtype=np.float32) * factor, 0, 255).astype(np.uint8)
    return table[img]


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with PIL's SMOOTH-kernel blur; border pixels are kept as the official does."""
    if factor == 1.0:
        return img
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.SMOOTH), np.float32)
    if factor == 0.0:
        return blurred.astype(np.uint8)
    out = img.astype(np.float32)
    inner = blurred[1:-1, 1:-1]
    out[1:-1, 1:-1] = inner + factor * (out[1:-1, 1:-1] - inner)
    return np.clip(out, 0, 255).astype(np.uint8)


def _affine(img: np.ndarray, inverse: tuple[float, ...], fill=FILL) -> np.ndarray:
    """Warp with the output->input affine map `inverse` (PIL convention), bilinear."""
    pil = Image.fromarray(img)
    out = pil.transform(pil.size, Image.AFFINE, inverse, resample=Image.BILINEAR, fillcolor=fill)
    return np.asarray(out)


def shear_x(img: np.ndarray, factor: float) -> np.ndarray:
    """x' = x + factor * y (the official cv2 forward matrix [[1, f, 0], [0, 1, 0]])."""
    return _affine(img, (1.0, -factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(img: np.ndarray, factor: float) -> np.ndarray:
    """y' = y + factor * x."""
    return _affine(img, (1.0, 0.0, 0.0, -factor, 1.0, 0.0))


def translate_x(img: np.ndarray, offset: float) -> np.ndarray:
    """Shift content LEFT by `offset` pixels (official x' = x - offset)."""
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0))


def translate_y(img: np.ndarray, offset: float) -> np.ndarray:
    """Shift content UP by `offset` pixels."""
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset))


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise about the image centre, gray fill."""
    out = Image.fromarray(img).rotate(degrees, resample=Image.BILINEAR, fillcolor=FILL)
    return np.asarray(out)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def op_args(name: str, m: float, rng: np.random.Generator) -> tuple[float, ...]:
    """Magnitude arguments of op `name` at level `m` (random sign for geometric ops)."""
    level = m / MAX_LEVEL
    if name in ("Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        return (_signed(level * 0.3, rng),)
    if name in ("TranslateX", "TranslateY"):
        return (_signed(level * TRANSLATE_PIXELS, rng),)
    if name == "Rotate":
        return (_signed(level * 30.0, rng),)
    return ()


FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": identity, "AutoContrast": auto_contrast, "Equalize": equalize,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y, "Rotate": rotate,
}


def rand_augment(img: np.ndarray, rng: np.random.Generator, n: int = 2, m: float = 7,
                 ops: tuple[str, ...] = OPS, prob: float = 0.5) -> np.ndarray:
    """Official RandomAugment: `n` ops drawn with replacement, each applied with prob 0.5.

    Args:
      img: uint8[H, W, 3].
      rng: source of all randomness (op choice, application coin, sign).
      n: number of ops drawn.
      m: magnitude in [0, 10].
      ops: op names (subset of :data:`OPS`).
      prob: probability that a drawn op is applied.
    Returns:
      uint8[H, W, 3].
    """
    return apply_ops(img, rng, n, m, ops, prob, FUNCS)


def apply_ops(img, rng: np.random.Generator, n: int, m: float, ops: tuple[str, ...],
              prob: float, funcs: dict):
    """The official draw: `n` op names from `ops` with replacement, each applied with
    probability `prob` as `funcs[name](img, *op_args(name, m, rng))`. Shared by this reference
    (numpy images) and `augment_fast` (PIL images), so both consume `rng` identically."""
    unknown = set(ops) - set(funcs)
    if unknown:
        raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; valid: {list(funcs)}")
    if n <= 0:
        return img
    for i in rng.integers(0, len(ops), size=n):
        name = ops[int(i)]
        if rng.random() > prob:
            continue
        img = funcs[name](img, *op_args(name, m, rng))
    return img
