"""Throughput of the pretraining input pipeline on real photos, vs. a plain PIL loop.

Writes ``benchmarks/results/input_pipeline_cpu<N>.json`` and ``.png``. The photos are the
scikit-image sample photographs, resampled to random sizes (shorter side 240-900 px, random
aspect) and saved as JPEG files in a temporary folder. Every configuration does the same work per
image: read + decode the JPEG, official pretraining augmentation (RandomResizedCrop 0.2-1,
flip, RandAugment 2/7) at `--image-size`, CLIP normalisation, caption tokenisation.

    python benchmarks/input_pipeline.py [--images 200] [--image-size 256] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import socket
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (machine + load-average stamp of every results JSON)
from mplug_jax.data import pipeline, text, tokenizer, transforms  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "cat", "colorwheel", "motorcycle")
AUGMENT = {"crop_scale": (0.2, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True}


def _photos() -> list[np.ndarray]:
    out = []
    for name in PHOTOS:
        fn = getattr(skdata, name if name != "motorcycle" else "stereo_motorcycle", None)
        if fn is None:
            continue
        img = fn()
        img = img[0] if isinstance(img, tuple) else img
        out.append(np.asarray(Image.fromarray(img).convert("RGB")))
    return out


def write_jpegs(folder: str, n: int, seed: int = 0) -> list[dict]:
    """`n` JPEG files of varied sizes; returns pretraining records."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    records = []
    for i in range(n):
        src = Image.fromarray(photos[i % len(photos)])
        short = int(rng.integers(240, 901))
        aspect = float(rng.uniform(0.6, 1.8))
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        path = os.path.join(folder, f"{i:04d}.jpg")
        src.resize(size, Image.BICUBIC).save(path, quality=int(rng.integers(80, 96)))
        records.append({"image": path, "caption": f"A photo number {i} of a {PHOTOS[i % 10]}."})
    return records


def plain_loop(records: list[dict], n: int, image_size: int, max_tokens: int) -> float:
    """images/s of a single-process loop doing the pipeline's per-image work with PIL."""
    tok = tokenizer.get_tokenizer()
    start = time.perf_counter()
    for i in range(n):
        rec = records[i % len(records)]
        rng = np.random.default_rng([0, 0, i, 1])
        with Image.open(rec["image"]) as img:
            img = img.convert("RGB")
        x = transforms.train_transform(img, image_size, rng, **AUGMENT)
        tok.encode([text.pre_caption(rec["caption"], 30)], max_length=max_tokens,
                   pad_to=max_tokens)
        assert x.shape == (image_size, image_size, 3)
    return n / (time.perf_counter() - start)


def grain_pipeline(records: list[dict], n: int, image_size: int, batch_size: int,
                   workers: int, read_threads: int) -> dict[str, float]:
    """images/s of `pretrain_dataset` (after the first batch) and time to the first batch."""
    ds = pipeline.pretrain_dataset(records, image_size=image_size, batch_size=batch_size,
                                   augment=AUGMENT, workers=workers, read_threads=read_threads)
    start = time.perf_counter()
    it = iter(ds)
    next(it)
    first = time.perf_counter() - start
    steps = max(1, n // batch_size)
    start = time.perf_counter()
    for batch in itertools.islice(it, steps):
        assert batch["image"].shape == (batch_size, image_size, image_size, 3)
    rate = steps * batch_size / (time.perf_counter() - start)
    if workers:
        it.close()
    return {"images_per_s": rate, "first_batch_s": first}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="JPEG files written")
    p.add_argument("--measure", type=int, default=512, help="images timed per configuration")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    results: dict = {
        "host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg_1min_at_start": os.getloadavg()[0], "load_avg_start": common.load_average(),
        "images": args.images, "measured_images": args.measure, "image_size": args.image_size,
        "batch_size": args.batch_size, "augment": AUGMENT, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        records = write_jpegs(tmp, args.images)
        sizes = [Image.open(r["image"]).size for r in records]
        results["mean_megapixels"] = float(np.mean([w * h for w, h in sizes]) / 1e6)
        plain_loop(records, 8, args.image_size, 32)  # warm up caches and the tokenizer
        results["runs"]["plain PIL loop"] = {
            "images_per_s": plain_loop(records, args.measure, args.image_size, 32)}
        for workers, threads in ((0, 1), (0, 4), (1, 1), (2, 1)):
            name = f"grain workers={workers} threads={threads}"
            results["runs"][name] = grain_pipeline(records, args.measure, args.image_size,
                                                   args.batch_size, workers, threads)
            print(f"{name}: {results['runs'][name]}", flush=True)
    print(f"plain PIL loop: {results['runs']['plain PIL loop']}")

    results["load_avg_end"] = common.load_average()
    results["runtime_s"] = time.perf_counter() - t_start
    stem = os.path.join(args.out, f"input_pipeline_cpu{results['cpus']}")
    common.write_json(stem + ".json", results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    rates = [results["runs"][k]["images_per_s"] for k in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, rates, color=["gray"] + ["tab:blue"] * (len(names) - 1))
    for y, r in enumerate(rates):
        ax.text(r, y, f" {r:.0f}", va="center")
    ax.set_xlabel("images / s")
    ax.set_title(f"pretrain pipeline, {args.image_size}px, RandAugment 2/7, "
                 f"{results['cpus']} CPUs, {results['mean_megapixels']:.2f} MP JPEGs",
                 fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    print(f"wrote {stem}.json and {stem}.png")
    print(f"total runtime {time.perf_counter() - t_start:.1f} s")
    return results


if __name__ == "__main__":
    main()
