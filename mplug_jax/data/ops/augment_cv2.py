"""The training image ops on uint8 arrays with OpenCV: ``input.augment.backend = 'cv2'``
(resize and RandAugment) or ``'official'`` (RandAugment only, after PIL's resize).

Why it exists: at 384 px the PIL pipeline spends ~3 ms per image in the bicubic resize and
~3.3 ms in each affine RandAugment op (docs/benchmarks.md); OpenCV's SIMD kernels do either in
~0.2 ms, so one core feeds about twice the images.

What 'cv2' changes, against the default PIL backend (same generator draws: crop box, flip,
ops, magnitudes and signs are identical, only pixels differ; 'official' changes the first
point only):

- **Affine RandAugment ops are the official ones.** The official `dataset/randaugment.py`
  runs ShearX/Y, TranslateX/Y and Rotate through ``cv2.warpAffine`` (bilinear, gray border)
  with the forward matrices [[1, f, 0], [0, 1, 0]], [[1, 0, 0], [f, 1, 0]],
  [[1, 0, -d], [0, 1, 0]], [[1, 0, 0], [0, 1, -d]] and ``cv2.getRotationMatrix2D((W / 2,
  H / 2), degrees, 1)``; this module makes the same calls. The PIL backend samples half a
  pixel apart from OpenCV (PIL maps pixel centres) and interpolates in floating point rather
  than OpenCV's 1/32-pixel fixed point, so its pixels differ by about a level on average.
- **The crop resize is not the official one.** The official RandomResizedCrop resizes with
  PIL's bicubic filter, which widens with the shrink factor (antialiasing); OpenCV's cubic
  kernel keeps a 4x4 support, so strong shrinks average areas instead (:func:`resize_box`).
  On 640x480 photos the mean difference is below one gray level, smaller than the one
  between PIL's own bilinear and bicubic filters (`benchmarks/input_pipeline.py`,
  ``backend_quality``; `tests/data/test_augment_cv2.py`).
- AutoContrast, Equalize, Brightness and Sharpness use the lookup tables of
  :mod:`augment_fast` (pixel-identical to the reference :mod:`randaugment`; as there, the
  sharpness blend is clipped where the official wraps around).

OpenCV (the headless wheel) is a dependency of the package; :func:`require` gives the install
hint should it be missing. The first use sets OpenCV's own thread pool to one thread
(``cv2.setNumThreads(1)``, process-wide): the loader's parallelism is its read threads and
worker processes, and a per-call thread pool on top of them oversubscribes the cores.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from PIL import Image

from mplug_jax.data.ops import augment_fast
from mplug_jax.data.ops import randaugment as ref

INSTALL_HINT = ("pip install -c constraints.txt -e .  (mplug-jax depends on "
                "opencv-python-headless)")


@functools.cache
def _cv2():
    import cv2
    cv2.setNumThreads(1)
    return cv2


def require(backend: str = "cv2") -> None:
    """ImportError with the install hint when OpenCV cannot be imported."""
    try:
        _cv2()
    except ImportError as e:
        raise ImportError(f"input.augment.backend={backend!r} needs OpenCV, which is not "
                          f"installed: {INSTALL_HINT}") from e


def _lut(x: np.ndarray, table: list[int]) -> np.ndarray:
    """Apply a 768-entry (3 x 256, PIL layout) lookup table to uint8[H, W, 3]."""
    lut = np.asarray(table, np.uint8).reshape(3, 256).T[:, None, :]
    return _cv2().LUT(x, np.ascontiguousarray(lut))


def _hist(x: np.ndarray) -> list[int]:
    return Image.fromarray(x).histogram()


def auto_contrast(x: np.ndarray) -> np.ndarray:
    return _lut(x, augment_fast.auto_contrast_table(_hist(x)))


def equalize(x: np.ndarray) -> np.ndarray:
    return _lut(x, augment_fast.equalize_table(_hist(x)))


def brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return _lut(x, augment_fast.brightness_table(factor))


def _warp(x: np.ndarray, forward: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    h, w = x.shape[:2]
    return cv2.warpAffine(x, forward, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=ref.FILL)


def shear_x(x: np.ndarray, factor: float) -> np.ndarray:
    """x' = x + factor * y."""
    return _warp(x, np.float32([[1, factor, 0], [0, 1, 0]]))


def shear_y(x: np.ndarray, factor: float) -> np.ndarray:
    """y' = y + factor * x."""
    return _warp(x, np.float32([[1, 0, 0], [factor, 1, 0]]))


def translate_x(x: np.ndarray, offset: float) -> np.ndarray:
    """Content moves left by `offset` pixels."""
    return _warp(x, np.float32([[1, 0, -offset], [0, 1, 0]]))


def translate_y(x: np.ndarray, offset: float) -> np.ndarray:
    """Content moves up by `offset` pixels."""
    return _warp(x, np.float32([[1, 0, 0], [0, 1, -offset]]))


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise about (W / 2, H / 2)."""
    h, w = x.shape[:2]
    return _warp(x, _cv2().getRotationMatrix2D((w / 2, h / 2), degrees, 1))


FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": lambda x: x, "AutoContrast": auto_contrast, "Equalize": equalize,
    "Brightness": brightness, "Sharpness": augment_fast.sharpen, "ShearX": shear_x,
    "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y, "Rotate": rotate,
}
assert set(FUNCS) == set(ref.OPS)


def rand_augment(x: np.ndarray, rng: np.random.Generator, n: int = 2, m: float = 7,
                 ops: tuple[str, ...] = ref.OPS, prob: float = 0.5) -> np.ndarray:
    """RandAugment on uint8[H, W, 3] with the draws of `randaugment.rand_augment`."""
    return ref.apply_ops(x, rng, n, m, ops, prob, FUNCS)


# Shrinking by this factor or more (shorter crop side / output side), the resize averages
# areas (cv2.INTER_AREA) instead of the fixed 4x4 cubic kernel, which aliases there: with the
# switch at 1.5, the mean gap to PIL's bicubic on 640x480 photos is 0.56 levels at the VQA
# settings (384 px, crop 0.5-1) and 0.71 at pretraining's (256 px, crop 0.2-1), below the
# 0.70 / 0.82 between PIL's own bilinear and bicubic filters on the same crops.
AREA_FROM_SHRINK = 1.5


def resize_box(x: np.ndarray, box: tuple[float, float, float, float], size: int
               ) -> np.ndarray:
    """The pixels of crop `box` (left, top, right, bottom) of uint8[H, W, 3], resized to
    uint8[size, size, 3]. A box on whole pixels: ``cv2.INTER_CUBIC``, or ``cv2.INTER_AREA``
    when the crop's shorter side is at least :data:`AREA_FROM_SHRINK` times `size`. A box
    with fractional corners (a crop drawn on the full image, mapped onto a reduced-scale
    JPEG decode, which leaves a shrink below 2): one bilinear warp of the box onto the output
    grid, without rounding the box (a cubic warp aliases more at such shrinks)."""
    cv2 = _cv2()
    if any(v != int(v) for v in box):
        left, top, right, bottom = box
        sx, sy = (right - left) / size, (bottom - top) / size
        # output pixel centre (i + 0.5) * s lands at left + (i + 0.5) * s - 0.5 in x's pixels
        to_src = np.float64([[sx, 0, left + 0.5 * sx - 0.5], [0, sy, top + 0.5 * sy - 0.5]])
        return cv2.warpAffine(x, to_src, (size, size),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
    left, top, right, bottom = (int(v) for v in box)
    crop = np.ascontiguousarray(x[top:bottom, left:right])
    shrink = min(crop.shape[:2]) / size
    method = cv2.INTER_AREA if shrink >= AREA_FROM_SHRINK else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=method)


def flip(x: np.ndarray) -> np.ndarray:
    """Left-right mirror of uint8[H, W, 3]."""
    return _cv2().flip(x, 1)
