"""How far the optional image paths move pixels (`benchmarks/input_pipeline.py` reports it):
reduced-scale JPEG decoding (`input.reduced_decode`) and the OpenCV backend
(`input.augment.backend='cv2'`), each next to the gap between PIL's bilinear and bicubic
resizes of the same crops."""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from mplug_jax.data.ops import image as transforms


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def reduced_decode_quality(paths: list[str], n: int, s: dict) -> dict:
    """Reduced-scale decoding vs the full decode (same crops and ops), next to bicubic vs
    bilinear resizing of the same crops, on uint8 pipeline outputs at settings `s` (image_size,
    augment)."""
    size, aug = s["image_size"], {**s["augment"], "randaug_n": 0, "hflip": False}
    mad_reduced, mad_filter, psnr_reduced, psnr_filter, reduced, t_full, t_red = \
        [], [], [], [], 0, 0.0, 0.0
    for i in range(n):
        path = paths[i % len(paths)]
        t = time.process_time()
        full = transforms.decode_train_image(path, size, np.random.default_rng(i), **aug)
        t_full += time.process_time() - t
        t = time.process_time()
        red = transforms.decode_train_image(path, size, np.random.default_rng(i),
                                            reduced_decode=True, **aug)
        t_red += time.process_time() - t
        with Image.open(path) as img:
            top, left, h, w = transforms.resized_crop_params(*img.size, np.random.default_rng(i),
                                                             aug["crop_scale"])
            box = (left, top, left + w, top + h)
            bilinear = np.asarray(img.convert("RGB").crop(box).resize((size, size),
                                                                      Image.BILINEAR))
        if min(w, h) < 2 * size:  # the exact path: identical, nothing to compare
            continue
        reduced += 1
        mad_reduced.append(np.abs(full.astype(int) - red).mean())
        mad_filter.append(np.abs(full.astype(int) - bilinear).mean())
        psnr_reduced.append(_psnr(full, red))
        psnr_filter.append(_psnr(full, bilinear))
    if not reduced:
        return {"images": n, "reduced_images": 0}
    return {"photo_size": list(Image.open(paths[0]).size), "images": n,
            "reduced_images": reduced, "image_size": size,
            "mean_abs_diff_reduced_vs_full": float(np.mean(mad_reduced)),
            "mean_abs_diff_bilinear_vs_bicubic": float(np.mean(mad_filter)),
            "psnr_db_reduced_vs_full": float(np.mean(psnr_reduced)),
            "psnr_db_bilinear_vs_bicubic": float(np.mean(psnr_filter)),
            "decode_crop_resize_cpu_ms_full": 1e3 * t_full / n,
            "decode_crop_resize_cpu_ms_reduced": 1e3 * t_red / n}


def backend_quality(paths: list[str], n: int, settings: dict[str, dict]) -> dict:
    """The OpenCV backend vs the PIL one on the same draws, per pipeline setting ({kind:
    {image_size, augment}}): whole training outputs (RandAugment included) and the crop resize
    alone, next to the gap between PIL's bilinear and bicubic resizes of the same crops."""
    out = {}
    for kind, s in settings.items():
        size, aug = s["image_size"], s["augment"]
        plain = {**aug, "randaug_n": 0, "hflip": False}
        whole, resize, noise, psnr = [], [], [], []
        for i in range(n):
            path = paths[i % len(paths)]
            pil = transforms.decode_train_image(path, size, np.random.default_rng(i), **aug)
            cv2 = transforms.decode_train_image(path, size, np.random.default_rng(i),
                                                backend="cv2", **aug)
            whole.append(np.abs(pil.astype(int) - cv2).mean())
            psnr.append(_psnr(pil, cv2))
            bicubic = transforms.decode_train_image(path, size, np.random.default_rng(i),
                                                    **plain)
            resize.append(np.abs(bicubic.astype(int) - transforms.decode_train_image(
                path, size, np.random.default_rng(i), backend="cv2", **plain)).mean())
            with Image.open(path) as img:
                top, left, h, w = transforms.resized_crop_params(
                    *img.size, np.random.default_rng(i), aug["crop_scale"])
                bilinear = np.asarray(img.convert("RGB").crop(
                    (left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))
            noise.append(np.abs(bicubic.astype(int) - bilinear).mean())
        out[kind] = {"images": n, "image_size": size,
                     "mean_abs_diff_cv2_vs_pil": float(np.mean(whole)),
                     "max_image_mean_abs_diff_cv2_vs_pil": float(np.max(whole)),
                     "psnr_db_cv2_vs_pil": float(np.mean(psnr)),
                     "mean_abs_diff_resize_cv2_vs_pil_bicubic": float(np.mean(resize)),
                     "mean_abs_diff_pil_bilinear_vs_bicubic": float(np.mean(noise))}
    return out
