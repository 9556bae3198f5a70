"""RandAugment on PIL images, pixel-identical to :mod:`mplug_jax.data.ops.randaugment`, faster.

`randaugment.py` is the reference (numpy arrays in and out, written op by op after the official
code); this module gives the same uint8 results for the same generator with less work per op:

- the image stays a PIL image between ops (no array round trip per op);
- AutoContrast, Equalize and Brightness are one ``Image.point`` lookup over all three channels,
  with tables built from ``Image.histogram`` (the reference indexes one channel at a time);
- Sharpness: the SMOOTH blur of PIL is ``round(S / 13)`` for the 3x3 sum S with the centre
  weighted 5 (exactly: S / 13 is never half-way between integers), so the blur and the float32
  blend of the reference become integer sums and one 256x256 lookup table of the blend;
- TranslateX/Y by a whole number of pixels (every integer magnitude M: M/10 * 10 px) is a
  paste onto the gray fill (PIL's bilinear sampling at an integer offset returns the
  source pixel);
- Shear and Rotate are the reference's PIL calls on the image in hand.

Anything outside these fast cases (non-integer shifts, a zero sharpness factor, images smaller
than 3x3) falls back to the reference op.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from mplug_jax.data.ops import randaugment as ref

_IDENTITY = list(range(256))


def _from_hist(hist: list[int], channel: int) -> np.ndarray:
    return np.asarray(hist[256 * channel:256 * (channel + 1)], np.int64)


def auto_contrast_table(hist: list[int]) -> list[int]:
    """The 768-entry lookup table (3 channels) of AutoContrast for a PIL-layout histogram."""
    table = []
    for c in range(3):
        nonzero = np.flatnonzero(_from_hist(hist, c))
        lo, hi = (int(nonzero[0]), int(nonzero[-1])) if nonzero.size else (0, 0)
        if hi <= lo:
            table += _IDENTITY
            continue
        scale = 255.0 / (hi - lo)
        row = np.arange(256, dtype=np.float64) * scale - lo * scale
        table += np.clip(row, 0, 255).astype(np.uint8).tolist()
    return table


def equalize_table(hist: list[int]) -> list[int]:
    """The 768-entry lookup table of Equalize for a PIL-layout histogram."""
    table = []
    for c in range(3):
        h = _from_hist(hist, c)
        step = int(h[h != 0][:-1].sum()) // 255
        if step == 0:
            table += _IDENTITY
            continue
        row = np.concatenate([[0], ((np.cumsum(h) + step // 2) // step)[:-1]])
        table += np.clip(row, 0, 255).astype(np.uint8).tolist()
    return table


def brightness_table(factor: float) -> list[int]:
    """The 768-entry lookup table of Brightness at `factor`."""
    row = np.clip(np.arange(256, dtype=np.float32) * factor, 0, 255).astype(np.uint8)
    return row.tolist() * 3


def auto_contrast(img: Image.Image) -> Image.Image:
    """Per-channel [min, max] -> [0, 255] stretch (reference: `randaugment.auto_contrast`)."""
    return img.point(auto_contrast_table(img.histogram()))


def equalize(img: Image.Image) -> Image.Image:
    """Per-channel histogram equalisation (reference: `randaugment.equalize`)."""
    return img.point(equalize_table(img.histogram()))


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Intensities times `factor`, clipped (reference: `randaugment.brightness`)."""
    return img.point(brightness_table(factor))


_BLEND_CACHE: dict[float, np.ndarray] = {}


def _blend_table(factor: float) -> np.ndarray:
    """uint8[256 * 256]: entry a * 256 + b is the reference blend of pixel a with blur b."""
    table = _BLEND_CACHE.get(factor)
    if table is None:
        a = np.repeat(np.arange(256, dtype=np.float32), 256)
        b = np.tile(np.arange(256, dtype=np.float32), 256)
        table = np.clip(b + factor * (a - b), 0, 255).astype(np.uint8)
        if len(_BLEND_CACHE) < 64:
            _BLEND_CACHE[factor] = table
    return table


def sharpen(x: np.ndarray, factor: float) -> np.ndarray:
    """Sharpness on uint8[H, W, 3]: the blend with the SMOOTH blur, borders kept."""
    if factor == 1.0:
        return x
    if factor == 0.0 or min(x.shape[:2]) < 3:
        return ref.sharpness(x, factor)
    x16 = x.astype(np.uint16)
    rows = x16[:-2] + x16[1:-1] + x16[2:]
    s = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * x16[1:-1, 1:-1]
    blur = (2 * s + 13) // 26  # round(s / 13); never half-way
    out = x.copy()
    out[1:-1, 1:-1] = np.take(_blend_table(factor), (x16[1:-1, 1:-1] << 8) | blur)
    return out


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the SMOOTH blur, borders kept (reference: `randaugment.sharpness`)."""
    return img if factor == 1.0 else Image.fromarray(sharpen(np.asarray(img), factor))


def _affine(img: Image.Image, inverse: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, inverse, resample=Image.BILINEAR,
                         fillcolor=ref.FILL)


def shear_x(img: Image.Image, factor: float) -> Image.Image:
    """Reference: `randaugment.shear_x`."""
    return _affine(img, (1.0, -factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(img: Image.Image, factor: float) -> Image.Image:
    """Reference: `randaugment.shear_y`."""
    return _affine(img, (1.0, 0.0, 0.0, -factor, 1.0, 0.0))


def _shift(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """out[y, x] = img[y + dy, x + dx], gray where that falls outside."""
    w, h = img.size
    out = Image.new("RGB", img.size, ref.FILL)
    if abs(dx) < w and abs(dy) < h:
        out.paste(img.crop((max(0, dx), max(0, dy), w + min(0, dx), h + min(0, dy))),
                  (max(0, -dx), max(0, -dy)))
    return out


def _whole(offset: float) -> int | None:
    r = round(offset)
    return int(r) if abs(offset - r) < 1e-9 else None


def translate_x(img: Image.Image, offset: float) -> Image.Image:
    """Reference: `randaugment.translate_x` (content moves left by `offset` px)."""
    d = _whole(offset)
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0)) if d is None else _shift(img, d, 0)


def translate_y(img: Image.Image, offset: float) -> Image.Image:
    """Reference: `randaugment.translate_y` (content moves up by `offset` px)."""
    d = _whole(offset)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset)) if d is None else _shift(img, 0, d)


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Reference: `randaugment.rotate`."""
    return img.rotate(degrees, resample=Image.BILINEAR, fillcolor=ref.FILL)


FUNCS: dict[str, Callable[..., Image.Image]] = {
    "Identity": lambda img: img, "AutoContrast": auto_contrast, "Equalize": equalize,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y, "Rotate": rotate,
}
assert set(FUNCS) == set(ref.OPS)


def rand_augment(img: Image.Image, rng: np.random.Generator, n: int = 2, m: float = 7,
                 ops: tuple[str, ...] = ref.OPS, prob: float = 0.5) -> Image.Image:
    """`randaugment.rand_augment` on an RGB PIL image: same draws from `rng`, same pixels.

    Args:
      img: RGB PIL image.
      rng: source of all randomness (op choice, application coin, sign), consumed exactly as
        the reference consumes it.
      n, m, ops, prob: as in :func:`mplug_jax.data.ops.randaugment.rand_augment`.
    Returns:
      An RGB PIL image of the same size.
    """
    if img.mode != "RGB":
        raise ValueError(f"rand_augment needs an RGB image, got mode {img.mode}")
    return ref.apply_ops(img, rng, n, m, ops, prob, FUNCS)
