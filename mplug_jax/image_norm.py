"""CLIP's image normalisation, shared by the input pipelines (on the host) and the vision
encoder (uint8 batches normalised on the device), so both compute the same float32 values."""
from __future__ import annotations

import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8[..., 3] RGB -> float32[..., 3] in CLIP mean/std units: (x / 255 - mean) / std."""
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    return (x - CLIP_MEAN) / CLIP_STD
