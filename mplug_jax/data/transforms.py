"""Image transforms matching the official torchvision pipelines (PIL bicubic, CLIP mean/std)."""
from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def normalize(img: Image.Image) -> np.ndarray:
    """uint8 RGB PIL image -> float32[H, W, 3] in CLIP mean/std units."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
    """Official test transform: RGB -> bicubic resize to a square -> /255 -> CLIP normalise.

    Returns float32[image_size, image_size, 3] (channels last; the official tensor is CHW).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    img = to_rgb(img).resize((image_size, image_size), Image.BICUBIC)
    return normalize(img)


def load_image(path: str, image_size: int) -> np.ndarray:
    """Open an image file and apply :func:`eval_transform`."""
    with Image.open(path) as img:
        img.load()
        return eval_transform(img, image_size)
