"""Image decoding and transforms matching the official torchvision pipelines.

Official `dataset/__init__.py`: PIL bicubic resizes and CLIP mean/std everywhere; training adds
RandomResizedCrop -> RandomHorizontalFlip -> RandomAugment (`randaugment.py` is the reference,
`augment_fast.py` its pixel-identical PIL implementation, the default; `augment_cv2.py` the
official OpenCV ops, see :data:`BACKENDS`). All randomness
comes from a ``np.random.Generator`` passed in, so a record's augmentation is a pure function of
its seed. Outputs are channels last, ``float32[R, R, 3]``.

`decode_image` is the one place that turns a record's ``image`` field (array, PIL image, encoded
bytes or a path) into an RGB PIL image; every bad input raises :class:`BadRecord` with a reason
from :data:`SKIP_REASONS`, which the pipeline counts and logs.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from mplug_jax import image_norm
from mplug_jax.data.ops import augment_cv2
from mplug_jax.data.ops import augment_fast
from mplug_jax.data.ops import randaugment

CLIP_MEAN, CLIP_STD = image_norm.CLIP_MEAN, image_norm.CLIP_STD

# Why a record was skipped; pipeline and source skip counters use these keys.
SKIP_REASONS = ("missing_file", "empty_file", "truncated", "bad_image", "too_large",
                "bad_caption", "bad_record", "outside_root")
# Libraries of the training ops (`input.augment.backend`), see train_image: 'pil' (default),
# 'official' (the official code's: PIL resize, OpenCV RandAugment), 'cv2' (OpenCV only, the
# fastest; augment_cv2.py).
BACKENDS = ("pil", "official", "cv2")
# Decoded images above this many pixels are reduced (JPEG DCT scaling) or skipped.
MAX_PIXELS = 64_000_000


class DataError(RuntimeError):
    """Input data is unusable as a whole (e.g. too many skipped records)."""


class BadRecord(ValueError):
    """One record cannot be used; `reason` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; valid: {SKIP_REASONS}")
        super().__init__(message)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB (an RGB image is
    returned as it is, not copied)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def normalize(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB PIL image (or uint8[H, W, 3]) -> float32[H, W, 3] in CLIP mean/std units."""
    return image_norm.normalize(np.asarray(img))


def eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
    """Official test transform: RGB -> bicubic resize to a square -> /255 -> CLIP normalise.

    Returns float32[image_size, image_size, 3] (channels last; the official tensor is CHW).
    """
    return normalize(eval_image(img, image_size))


def eval_image(img: Image.Image, image_size: int) -> np.ndarray:
    """:func:`eval_transform` before normalisation: uint8[image_size, image_size, 3]."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return np.asarray(to_rgb(img).resize((image_size, image_size), Image.BICUBIC))


def load_image(path: str, image_size: int) -> np.ndarray:
    """Open an image file and apply :func:`eval_transform`."""
    with Image.open(path) as img:
        img.load()
        return eval_transform(img, image_size)


def decode_image(image: Any, *, max_pixels: int = MAX_PIXELS, name: str | None = None,
                 before_load: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """Turn a record's image field into a loaded 8-bit RGB PIL image.

    Args:
      image: uint8[H, W, 3] / uint8[H, W] array, PIL image, encoded bytes, or a file path.
      max_pixels: larger JPEGs are decoded at a reduced scale (``Image.draft``, then
        ``reduce``) to fit; other formats above it are rejected before decoding. Files above
        PIL's own decompression-bomb limit are always rejected.
      name: what error messages call the input (default: the path, or ``<bytes>`` for encoded
        bytes); callers that read the file themselves pass its path here.
      before_load: called with the opened, not yet decoded image of encoded input that is
        within `max_pixels` (its size is known; it may call ``Image.draft``).
    Returns:
      An RGB PIL image (grayscale, palette, RGBA, CMYK and 16-bit inputs are converted).
    Raises:
      BadRecord: missing/empty/truncated/undecodable/too large input. Truncated files are
        skipped on purpose: the official code sets ``LOAD_TRUNCATED_IMAGES`` and trains on the
        gray-filled remainder, which is a process-wide PIL switch we do not flip.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise BadRecord("bad_image", f"unsupported array {image.dtype}{list(image.shape)}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return to_rgb(Image.fromarray(image))
    if isinstance(image, (str, os.PathLike)):
        name = name or os.fspath(image)
        try:
            with open(name, "rb") as f:
                image = f.read()
        except FileNotFoundError as e:
            raise BadRecord("missing_file", f"{name}: file not found") from e
        except OSError as e:
            raise BadRecord("missing_file", f"{name}: cannot read ({e})") from e
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise BadRecord("bad_record", f"image field of type {type(image).__name__}")
    name = name or "<bytes>"
    if len(image) == 0:
        raise BadRecord("empty_file", f"{name}: zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image))
            w, h = img.size
            if w * h > max_pixels and img.format != "JPEG":
                raise BadRecord("too_large", f"{name}: {w}x{h} {img.format} image exceeds "
                                             f"max_pixels={max_pixels}")
            if w * h <= max_pixels and before_load is not None:
                before_load(img)
            elif w * h > max_pixels:
                # DCT-domain downscale by the smallest power of 2 (at most 8) that fits.
                factor = 1
                while factor < 8 and (w // factor) * (h // factor) > max_pixels:
                    factor *= 2
                img.draft(img.mode, (math.ceil(w / factor), math.ceil(h / factor)))
            img.load()
            if img.size[0] * img.size[1] > max_pixels:
                factor = math.ceil(math.sqrt(img.size[0] * img.size[1] / max_pixels))
                img = img.reduce(factor)
    except Image.DecompressionBombError as e:
        raise BadRecord("too_large", f"{name}: {e}") from e
    except UnidentifiedImageError as e:
        raise BadRecord("bad_image", f"{name}: not a recognised image") from e
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadRecord):
            raise
        reason = "truncated" if "truncated" in str(e).lower() else "bad_image"
        raise BadRecord(reason, f"{name}: {e}") from e
    return to_rgb(img)


def resized_crop_params(width: int, height: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w); 10 tries, then centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision RandomResizedCrop: crop by :func:`resized_crop_params`, bicubic resize."""
    top, left, h, w = resized_crop_params(img.size[0], img.size[1], rng, scale, ratio)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def train_transform(img: Image.Image, image_size: int, rng: np.random.Generator, *,
                    crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True,
                    randaug_n: int = 2, randaug_m: int = 7, backend: str = "pil"
                    ) -> np.ndarray:
    """Official training transform: RandomResizedCrop -> flip p=0.5 -> RandAugment -> normalise.

    Args:
      img: any-mode PIL image.
      image_size: output side R.
      rng: the only source of randomness.
      crop_scale: (0.2, 1.0) for pretraining, (0.5, 1.0) for fine-tuning (official).
      hflip: apply the random horizontal flip.
      randaug_n, randaug_m: RandAugment ops per image and magnitude (0 ops disables it).
      backend: one of :data:`BACKENDS` (see :func:`train_image`).
    Returns:
      float32[R, R, 3] in CLIP mean/std units: ``normalize(train_image(...))``.
    """
    return normalize(train_image(img, image_size, rng, crop_scale=crop_scale, hflip=hflip,
                                 randaug_n=randaug_n, randaug_m=randaug_m, backend=backend))


def train_image(img: Image.Image, image_size: int, rng: np.random.Generator, *,
                crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True,
                randaug_n: int = 2, randaug_m: int = 7,
                crop: tuple[float, float, float, float] | None = None,
                backend: str = "pil") -> np.ndarray:
    """:func:`train_transform` before normalisation: uint8[R, R, 3], all steps in uint8 at the
    output size.

    `backend` (all three draw the same numbers from `rng`):
      'pil': PIL's bicubic crop resize (the official) and the PIL-native RandAugment of
        :mod:`augment_fast` (pixel-identical to the reference ops of :mod:`randaugment`, whose
        affine ops sample half a pixel apart from the official OpenCV warps);
      'official': the official code's libraries: PIL's crop resize, then the RandAugment of
        :mod:`augment_cv2` (the official ``cv2.warpAffine`` calls);
      'cv2': OpenCV for the resize too (:func:`augment_cv2.resize_box`, not antialiased like
        PIL's; within resampling noise of it), the fastest.

    `crop`: a crop box (left, top, right, bottom) in `img`'s pixels, already drawn (see
    :func:`decode_train_image`); PIL resizes it with its box argument, which reads the pixels
    around the box for the filter support. None: draw the crop here and crop, then resize.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    check_backend(backend)
    img = to_rgb(img)
    drawn = crop is None
    if drawn:
        top, left, h, w = resized_crop_params(img.size[0], img.size[1], rng, tuple(crop_scale))
        crop = (left, top, left + w, top + h)
    if backend == "cv2":
        x = augment_cv2.resize_box(np.asarray(img), crop, image_size)
        if hflip and rng.random() < 0.5:
            x = augment_cv2.flip(x)
        return augment_cv2.rand_augment(x, rng, n=randaug_n, m=randaug_m)
    if drawn:
        img = img.crop(crop).resize((image_size, image_size), Image.BICUBIC)
    else:
        img = img.resize((image_size, image_size), Image.BICUBIC, box=crop)
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if backend == "official":
        return augment_cv2.rand_augment(np.asarray(img), rng, n=randaug_n, m=randaug_m)
    return np.asarray(augment_fast.rand_augment(img, rng, n=randaug_n, m=randaug_m))


def check_backend(backend: str) -> str:
    """`backend` if it is one of :data:`BACKENDS` and usable here: ValueError for an unknown
    name, ImportError with the install hint when 'official' or 'cv2' is asked for without
    OpenCV."""
    if backend not in BACKENDS:
        raise ValueError(f"input.augment.backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "pil":
        augment_cv2.require(backend)
    return backend


def decode_train_image(image: Any, image_size: int, rng: np.random.Generator, *,
                       reduced_decode: bool = False, max_pixels: int = MAX_PIXELS,
                       **augment) -> np.ndarray:
    """Decode a record's image field and apply :func:`train_image` -> uint8[R, R, 3].

    reduced_decode: draw the crop from the JPEG header's size first, then decode at the
      smallest DCT scale (1/2, 1/4 or 1/8, ``Image.draft``) that keeps both crop sides at
      least `image_size` (so it never upsamples), and resize the crop box scaled to that
      decode. Not pixel-identical to the full decode (JPEG's DCT downscale replaces
      part of the bicubic one); other formats and inputs, crops too small to reduce and
      images above `max_pixels` take the exact path. The same generator draws give the same
      crop, flip and RandAugment ops either way.
    augment: crop_scale, hflip, randaug_n, randaug_m, backend (see :func:`train_image`).
    Raises:
      BadRecord: as :func:`decode_image`.
    """
    if not reduced_decode:
        return train_image(decode_image(image, max_pixels=max_pixels), image_size, rng,
                           **augment)
    drawn: dict[str, Any] = {}

    def draft(img: Image.Image) -> None:
        w, h = img.size
        drawn["size"] = (w, h)
        drawn["crop"] = resized_crop_params(w, h, rng, tuple(augment.get("crop_scale",
                                                                         (0.5, 1.0))))
        _, _, ch, cw = drawn["crop"]
        factor = 1
        while factor < 8 and min(cw, ch) >= 2 * factor * image_size:
            factor *= 2
        if factor > 1 and img.format == "JPEG":
            img.draft(img.mode, (math.ceil(w / factor), math.ceil(h / factor)))

    img = decode_image(image, max_pixels=max_pixels, before_load=draft)
    if "crop" not in drawn:  # not encoded, or above max_pixels: nothing drawn yet
        return train_image(img, image_size, rng, **augment)
    (w, h), (top, left, ch, cw) = drawn["size"], drawn["crop"]
    if img.size == (w, h):  # not reduced: the exact crop, then resize
        img = to_rgb(img).crop((left, top, left + cw, top + ch))
        box = (0.0, 0.0, float(cw), float(ch))
    else:
        sx, sy = img.size[0] / w, img.size[1] / h
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    return train_image(img, image_size, rng, crop=box, **augment)


def train_transform_reference(img: Image.Image, image_size: int, rng: np.random.Generator, *,
                              crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True,
                              randaug_n: int = 2, randaug_m: int = 7) -> np.ndarray:
    """The straightforward :func:`train_transform` (numpy RandAugment of :mod:`randaugment`,
    float normalisation): same draws, same float32[R, R, 3] output, several times slower.
    Kept as the reference that tests compare the fast path with and benchmarks time."""
    img = random_resized_crop(to_rgb(img), image_size, rng, scale=tuple(crop_scale))
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize(randaugment.rand_augment(np.asarray(img), rng, n=randaug_n, m=randaug_m))
