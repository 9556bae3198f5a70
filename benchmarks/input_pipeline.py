"""Throughput per CPU core of the pretraining and VQA train input pipelines on real photos.

Writes ``benchmarks/results/input_pipeline_cpu<N>.json`` and ``.png``. The photos are
scikit-image sample photographs resized to `--photo-size` (640x480, the size of a COCO image)
and saved as JPEG at `--quality` 90. Each pipeline runs at its official settings (configs
base presets): pretraining at 256 px with RandomResizedCrop(0.2-1), VQA at 384 px with
RandomResizedCrop(0.5-1), both with flip and RandAugment 2/7 and their tokenisation.

Per pipeline, in one run:
- ``reference loop``: one process, the old per-record work (PIL decode, reference numpy
  RandAugment, float normalisation on the host, tokenisation);
- ``fast loop``: one process, the new per-record work as the pipeline does it;
- ``grain workers=W``: the real grain pipeline (`input.image_dtype` uint8, the presets'
  default) with W worker processes, one read thread each (`input.read_threads` auto);
  ``... read_threads=4``: the first worker count with 4 read threads per worker;
  ``... float32``: the first worker count with float32 batches normalised on the host;
  ``... official`` / ``... cv2``: the other backends of the image ops
  (``input.augment.backend``: PIL resize + OpenCV RandAugment, the presets' default, or OpenCV
  for both; skipped with a note where OpenCV cannot be imported).
  Timed in the steady state: after 4 batches, over `--grain-measure` images (a shorter window
  counts the worker's prefetch ahead of the consumer against the images delivered).
The per-core figure (``images_per_s_per_core``; ``..._official`` and ``..._cv2`` for the other
backends) is the 1-worker run's images per CPU second:
its worker process does all the record work; the CPU seconds are user + system time of this
process and its workers (recorded apart, in ms per image), so other jobs on the cores lower
it less than the wall-clock rate (they still cost it some: shared caches and memory
bandwidth). The wall-clock rates are recorded too, with the best rate over windows of 64
images.

Also measured: CPU milliseconds per image of each step (decode, crop + resize, flip, reference
and fast RandAugment on the same draws, float normalisation, tokenisation), and how far the
optional reduced-scale JPEG decoding (`input.reduced_decode`) moves pixels, on `--large-size`
photos, compared with the gap between two resampling filters, and how far the OpenCV backend
moves them (``backend_quality``: same draws, at both pipelines' settings).

    python benchmarks/input_pipeline.py [--measure 512] [--grain-measure 2048] [--workers 1,2]
        [--smoke]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np
import psutil
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (machine + load-average stamp of every results JSON)
from input_quality import backend_quality, reduced_decode_quality  # noqa: E402
from mplug_jax.data import pipeline
from mplug_jax.data.formats import vqa as vqa_format
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.ops import augment_cv2
from mplug_jax.data.ops import augment_fast
from mplug_jax.data.ops import randaugment
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.inputs import vqa as vqa_input

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "retina",
          "hubble_deep_field")
QUESTION = {"question": "what is the person on the left holding in the hand?",
            "ocr": [[0, "stop"], [0, "main st"]], "object_label": "person&&sign&&car&&tree"}
SETTINGS = {  # official base presets (configs/pretrain.py, configs/vqa.py)
    "pretrain": {"image_size": 256, "augment": {"crop_scale": (0.2, 1.0), "randaug_n": 2,
                                                "randaug_m": 7, "hflip": True},
                 "max_tokens": 32},
    "vqa": {"image_size": 384, "augment": {"crop_scale": (0.5, 1.0), "randaug_n": 2,
                                           "randaug_m": 7, "hflip": True},
            "max_tokens": 80},
}
TARGET_SAMPLES_PER_S = 1000  # per GPU
WINDOW = 64  # images per window of the best-window rate
GRAIN_WARMUP_BATCHES = 4  # batches taken before a grain run's timed window


def write_jpegs(folder: str, n: int, size: tuple[int, int], quality: int) -> list[str]:
    """`n` JPEG files of the sample photos at `size` (w, h); returns their paths."""
    photos = [np.asarray(Image.fromarray(getattr(skdata, name)()).convert("RGB"))
              for name in PHOTOS]
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{size[0]}x{size[1]}_{i:04d}.jpg")
        Image.fromarray(photos[i % len(photos)]).resize(size, Image.BICUBIC).save(
            path, quality=quality)
        paths.append(path)
    return paths


def records(kind: str, paths: list[str], n: int) -> list[dict]:
    """`n` records cycling over the JPEG files (pretraining: caption; VQA: question, answers).

    The number matters for the grain pipeline: its index shuffle costs about 0.4 ms per
    record for a 64-record dataset and a few microseconds for 10^5 or more records."""
    if kind == "pretrain":
        return [{"image": paths[i % len(paths)],
                 "caption": f"a photo number {i} of a {PHOTOS[i % len(PHOTOS)]} on a table "
                            "next to a window"} for i in range(n)]
    return [{"image": paths[i % len(paths)], "answers": ["yes", "a sign"], "weights": [0.7, 0.3],
             "dataset": "vqa", **QUESTION} for i in range(n)]


def _best_window(marks: list[float], images: int) -> float | None:
    """The highest images/s over consecutive windows of `images` (time stamps `marks`): on a
    shared machine, the rate while other jobs left this one a whole core."""
    gaps = np.diff(marks)
    return float(images / gaps.min()) if len(gaps) else None


def _cpu_split() -> tuple[float, float]:
    """(this process, its live children) user + system CPU seconds."""
    me = psutil.Process()
    kids = 0.0
    for child in me.children(recursive=True):
        try:
            kids += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return sum(me.cpu_times()[:2]), kids


def loop(kind: str, recs: list[dict], n: int, reference: bool, backend: str = "pil") -> dict:
    """images/s of one process doing a pipeline's per-record work (old or new)."""
    s = SETTINGS[kind]
    tok = tokenizer.get_tokenizer()
    size, aug = s["image_size"], s["augment"]

    def one(i):
        rec = recs[i % len(recs)]
        rng = np.random.default_rng([0, 0, i, 1])
        if reference:
            with Image.open(rec["image"]) as img:
                x = transforms.train_transform_reference(img.convert("RGB"), size, rng, **aug)
        else:
            x = pipeline.process_image(rec["image"], size, rng,
                                       augment={**aug, "backend": backend}, image_dtype="uint8")
        words = (text.pre_caption(rec["caption"], 30) if kind == "pretrain"
                 else vqa_format.question_text(rec))
        tok.encode([words], max_length=s["max_tokens"], pad_to=s["max_tokens"])
        assert x.shape == (size, size, 3)

    for i in range(4):  # warm up caches and the tokenizer
        one(i)
    wall, cpu, marks = time.perf_counter(), time.process_time(), [time.perf_counter()]
    for i in range(n):
        one(i)
        if (i + 1) % WINDOW == 0:
            marks.append(time.perf_counter())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": n / wall, "images_per_cpu_s": n / cpu, "images": n,
            "images_per_s_best_window": _best_window(marks, WINDOW)}


def grain_run(kind: str, recs: list[dict], n: int, batch_size: int, workers: int,
              image_dtype: str = "uint8", read_threads: int = 1, backend: str = "pil") -> dict:
    """images/s of the grain train pipeline in its steady state: timed after the first batch
    and GRAIN_WARMUP_BATCHES more (workers started, their buffers full), over `n` images, so
    the CPU the workers spend ahead of the consumer (their prefetch) is a small part of it."""
    s = SETTINGS[kind]
    aug = {**s["augment"], "backend": backend}
    if kind == "pretrain":
        ds = pretrain_input.dataset(recs, image_size=s["image_size"], batch_size=batch_size,
                                       max_tokens=s["max_tokens"], augment=aug,
                                       workers=workers, read_threads=read_threads,
                                       image_dtype=image_dtype)
    else:
        cfg = ml_collections.ConfigDict({
            "augment": {"enabled": True, **aug}, "max_question_tokens": s["max_tokens"],
            "max_answer_tokens": 12, "add_ocr": True, "add_object": True, "workers": workers,
            "read_threads": read_threads, "max_skip_rate": 0.01, "image_dtype": image_dtype})
        ds = vqa_input.dataset(recs, cfg, image_size=s["image_size"], max_answers=6,
                               batch_size=batch_size, train=True)
    start = time.perf_counter()
    it = iter(ds)
    next(it)
    first = time.perf_counter() - start
    for _ in range(GRAIN_WARMUP_BATCHES):
        next(it)
    steps = max(1, n // batch_size)
    wall, (main0, kids0) = time.perf_counter(), _cpu_split()
    marks = [time.perf_counter()]
    per_window = max(1, WINDOW // batch_size)
    for i, batch in enumerate(itertools.islice(it, steps)):
        assert batch["image"].shape == (batch_size, s["image_size"], s["image_size"], 3)
        assert batch["image"].dtype == np.dtype(image_dtype)
        if (i + 1) % per_window == 0:
            marks.append(time.perf_counter())
    main1, kids1 = _cpu_split()
    wall = time.perf_counter() - wall
    if workers:
        it.close()
    images = steps * batch_size
    cpu = (main1 - main0) + (kids1 - kids0)
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu, "images": images,
            "images_per_s_best_window": _best_window(marks, per_window * batch_size),
            "cpu_ms_per_image_main_process": 1e3 * (main1 - main0) / images,
            "cpu_ms_per_image_workers": 1e3 * (kids1 - kids0) / images,
            "first_batch_s": first, "workers": workers, "read_threads": read_threads,
            "image_dtype": image_dtype, "backend": backend}


def stage_profile(kind: str, recs: list[dict], n: int, cv2: bool) -> dict:
    """Mean CPU milliseconds per image of each step of the per-record work, old and new (and
    the OpenCV backend's resize and RandAugment on the same draws when `cv2`)."""
    s = SETTINGS[kind]
    size, aug = s["image_size"], s["augment"]
    tok = tokenizer.get_tokenizer()
    ms = dict.fromkeys(("decode", "crop_resize", "flip", "randaugment_reference",
                        "randaugment_fast", "normalize_float32", "tokenise"), 0.0)
    if cv2:
        ms.update(crop_resize_cv2=0.0, randaugment_cv2=0.0)

    def timed(key, fn, *args):
        t = time.process_time()
        out = fn(*args)
        ms[key] += 1e3 * (time.process_time() - t) / n
        return out

    for i in range(n):
        rec, rng = recs[i % len(recs)], np.random.default_rng([0, 0, i, 1])
        img = timed("decode", transforms.decode_image, rec["image"])
        if cv2:
            top, left, h, w = transforms.resized_crop_params(
                *img.size, np.random.default_rng([0, 0, i, 1]), aug["crop_scale"])
            timed("crop_resize_cv2", augment_cv2.resize_box, np.asarray(img),
                  (left, top, left + w, top + h), size)
        img = timed("crop_resize", transforms.random_resized_crop, img, size, rng,
                    aug["crop_scale"])
        if rng.random() < 0.5:
            img = timed("flip", img.transpose, Image.FLIP_LEFT_RIGHT)
        state = rng.bit_generator.state
        ref = timed("randaugment_reference", randaugment.rand_augment, np.asarray(img), rng)
        rng.bit_generator.state = state
        fast = timed("randaugment_fast", augment_fast.rand_augment, img, rng)
        assert np.array_equal(np.asarray(fast), ref)
        if cv2:
            rng.bit_generator.state = state
            timed("randaugment_cv2", augment_cv2.rand_augment, np.asarray(img), rng)
        timed("normalize_float32", transforms.normalize, ref)
        words = (text.pre_caption(rec["caption"], 30) if kind == "pretrain"
                 else vqa_format.question_text(rec))
        timed("tokenise", tok.encode, [words], s["max_tokens"], s["max_tokens"])
    return {"images": n, "cpu_ms_per_image": ms}


def _has_cv2() -> bool:
    try:
        augment_cv2.require()
        return True
    except ImportError:
        return False


def plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["pipelines"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        runs = results["pipelines"][kind]["runs"]
        names = list(runs)
        ys = np.arange(len(names))
        for off, key, label, color in ((-0.2, "images_per_s", "wall clock", "tab:blue"),
                                       (0.2, "images_per_cpu_s", "per CPU second",
                                        "tab:orange")):
            rates = [runs[k][key] for k in names]
            ax.barh(ys + off, rates, height=0.4, label=label, color=color)
            for y, r in zip(ys + off, rates):
                ax.text(r, y, f" {r:.0f}", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(names)
        ax.set_xlim(0, 1.45 * max(max(r["images_per_s"], r["images_per_cpu_s"])
                                  for r in runs.values()))
        ax.legend(fontsize=7, loc="lower right")
        s = SETTINGS[kind]
        ax.set_title(f"{kind}: {s['image_size']} px, crop {s['augment']['crop_scale']}, "
                     f"RandAugment 2/7", fontsize=9)
        ax.set_xlabel("images / s")
        ax.invert_yaxis()
    load = results["load_avg_start"][0], results["load_avg_end"][0]
    fig.suptitle(f"{results['machine']['cpus']} CPUs, load {load[0]:.1f} -> {load[1]:.1f}, "
                 f"{results['photo_size'][0]}x{results['photo_size'][1]} JPEG q"
                 f"{results['quality']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_core(runs: dict, suffix: str, grain_key: str, loop_key: str) -> dict:
    """The per-core figures of one backend (key `suffix`): from its 1-worker grain run, else
    its in-process loop."""
    one = runs.get(grain_key, runs[loop_key])
    # One core's throughput: images per CPU second of all the run's processes (the wall-clock
    # rate of one worker is held down by other load on a shared machine; with several read
    # threads it can exceed one core).
    per_core = one["images_per_cpu_s"]
    return {f"images_per_s_per_core{suffix}": per_core,
            f"images_per_s_per_core{suffix}_wall_clock": one["images_per_s"],
            f"images_per_s_per_core{suffix}_best_window": one["images_per_s_best_window"],
            f"per_core{suffix}_from": grain_key if grain_key in runs else loop_key,
            f"cores_per_gpu_needed{suffix}": TARGET_SAMPLES_PER_S / per_core,
            f"speedup_per_core{suffix}_vs_reference_loop":
                per_core / runs["reference loop"]["images_per_cpu_s"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="JPEG files written")
    p.add_argument("--records", type=int, default=100_000,
                   help="records in the dataset (cycling over the JPEG files)")
    p.add_argument("--measure", type=int, default=512,
                   help="images timed per loop configuration and per-step profile")
    p.add_argument("--grain-measure", type=int, default=2048,
                   help="images timed per grain configuration (its steady state)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="grain worker counts, comma-separated")
    p.add_argument("--pipelines", default="pretrain,vqa")
    p.add_argument("--photo-size", default="640x480")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--large-size", default="1600x1200",
                   help="photo size of the reduced-decoding quality check ('' skips it)")
    p.add_argument("--out", default=common.RESULTS)
    p.add_argument("--smoke", action="store_true", help="a few images (for tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.measure, args.batch_size, args.records = 8, 8, 4, 64
        args.grain_measure = 8
    t_start = time.perf_counter()
    photo = tuple(int(v) for v in args.photo_size.split("x"))
    workers = [int(w) for w in args.workers.split(",") if w]
    kinds = [k for k in args.pipelines.split(",") if k]
    unknown = set(kinds) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown --pipelines {sorted(unknown)}; valid: {sorted(SETTINGS)}")
    results: dict = {
        "benchmark": "input_pipeline", "machine": common.host_info(),
        "load_avg_start": common.load_average(), "smoke": args.smoke,
        "photo_size": list(photo), "quality": args.quality, "photos": list(PHOTOS),
        "jpeg_files": args.images, "records": args.records, "measured_images": args.measure,
        "measured_images_grain": args.grain_measure,
        "grain_warmup_batches": GRAIN_WARMUP_BATCHES,
        "batch_size": args.batch_size, "target_samples_per_s_per_gpu": TARGET_SAMPLES_PER_S,
        "pipelines": {}}
    cv2 = _has_cv2()
    if not cv2:
        results["cv2"] = f"not installed, OpenCV runs skipped: {augment_cv2.INSTALL_HINT}"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, args.images, photo, args.quality)
        for kind in kinds:
            recs = records(kind, paths, args.records)
            runs = {"reference loop": loop(kind, recs, args.measure, reference=True),
                    "fast loop": loop(kind, recs, args.measure, reference=False)}
            for backend in ("official", "cv2") if cv2 else ():
                runs[f"fast loop {backend}"] = loop(kind, recs, args.measure, reference=False,
                                                    backend=backend)
            for w in workers:  # one read thread per worker (input.read_threads auto)
                runs[f"grain workers={w}"] = grain_run(kind, recs, args.grain_measure,
                                                       args.batch_size, w)
            if workers:
                # 4 read threads per worker; float32 batches normalised on the host (the old way)
                runs[f"grain workers={workers[0]} read_threads=4"] = grain_run(
                    kind, recs, args.grain_measure, args.batch_size, workers[0],
                    read_threads=4)
                runs[f"grain workers={workers[0]} float32"] = grain_run(
                    kind, recs, args.grain_measure, args.batch_size, workers[0], "float32")
            if cv2 and workers:
                runs[f"grain workers={workers[0]} official"] = grain_run(
                    kind, recs, args.grain_measure, args.batch_size, workers[0],
                    backend="official")
            for w in workers if cv2 else ():
                runs[f"grain workers={w} cv2"] = grain_run(
                    kind, recs, args.grain_measure, args.batch_size, w, backend="cv2")
            for name, run in runs.items():
                print(f"{kind} {name}: {run['images_per_s']:.1f} images/s "
                      f"({run['images_per_cpu_s']:.1f} per CPU second)", flush=True)
            results["pipelines"][kind] = {
                "settings": SETTINGS[kind], "runs": runs,
                "stages": stage_profile(kind, recs, args.measure // 2, cv2),
                **_per_core(runs, "", "grain workers=1", "fast loop")}
            for backend in ("official", "cv2") if cv2 else ():
                results["pipelines"][kind].update(_per_core(
                    runs, f"_{backend}", f"grain workers=1 {backend}", f"fast loop {backend}"))
        if args.large_size:
            large = tuple(int(v) for v in args.large_size.split("x"))
            large_paths = write_jpegs(tmp, 4 if args.smoke else 16, large, args.quality)
            results["reduced_decode_quality"] = reduced_decode_quality(
                large_paths, 4 if args.smoke else 48, SETTINGS["vqa"])
        if cv2:
            results["backend_quality"] = backend_quality(paths, 4 if args.smoke else 48,
                                                         SETTINGS)
    results["load_avg_end"] = common.load_average()
    results["runtime_s"] = time.perf_counter() - t_start
    name = "input_pipeline_smoke" if args.smoke else "input_pipeline"
    stem = os.path.join(args.out, f"{name}_cpu{results['machine']['cpus']}")
    common.write_json(stem + ".json", results)
    plot(stem + ".png", results)
    print(f"wrote {stem}.json and {stem}.png ({results['runtime_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
