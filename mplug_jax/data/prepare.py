"""`mplug-jax prepare`: official annotations + images -> TFDS array_record dataset (no TF).

Library use::

    report = prepare("vqa", ["vqa_train_ocr.json", "vg_qa.json"], "img_root/coco_2014",
                     "data/tfds", roots={"vg": "img_root/visual_genome"})
    sources = formats.builder.load_prepared("data/tfds", "vqa")   # {'train': data source}

CLI (the lead's `cli.py` only calls :func:`add_prepare_args` and :func:`run_prepare`)::

    mplug-jax prepare --format vqa --annotations a.json b.json --image-root IMG --out DIR \
        [--split train] [--root vg=VG_DIR] [--eval] [--max-pixels N] [--max-skip-rate R]
    mplug-jax prepare --format video_qa --annotations msrvtt_qa/test.jsonl --video-root VIDEOS \
        --out DIR --split test [--num-frames 16]

Video formats sample `num_frames` frames per record (segment middles, as the official test
loader) from ``<root>/<video_id>/`` frame folders or video files (PyAV: the `video` extra).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Sequence

from mplug_jax.data import formats
from mplug_jax.data.formats import base
from mplug_jax.data.ops import image as transforms

logger = logging.getLogger(__name__)


def prepare(format: str, annotations: str | Sequence[str] | dict[str, Sequence[str]],
            image_root: str, out_dir: str, *, split: str = "train", train: bool | None = None,
            roots: dict[str, str] | None = None, flickr: bool = False,
            max_pixels: int = transforms.MAX_PIXELS, max_skip_rate: float = 0.05,
            num_frames: int = 16, allow_outside_root: bool = False) -> dict[str, Any]:
    """Build a TFDS array_record dataset from official annotation files.

    Args:
      format: a format module that can be prepared (`formats.preparable()`).
      annotations: file(s) of one split named `split`, or {split name: files}.
      image_root: root joined to relative image paths (vqa: the 'vqa' root; video formats:
        the folder of ``<video_id>/`` frame folders and video files).
      out_dir: TFDS data_dir; the dataset lands in ``out_dir/mplug_<format>/1.0.0``.
      train: training-style records (one per caption/sentence, answer weights); default:
        True for a split named 'train'.
      roots: extra VQA roots by dataset tag, e.g. {'vg': ..., 'gqa': ...}.
      flickr: grounding tuples in the flickr layout (file, x1y1x2y2, phrase).
      max_pixels: image size guard (larger JPEGs are reduced, other formats skipped).
      max_skip_rate: a split skipping more raises DataError and writes nothing.
      num_frames: frames sampled per video (video formats only).
      allow_outside_root: read images that the annotations place outside `image_root` and
        `roots` (`../` or absolute paths); by default such records are skipped, counted as
        'outside_root' and logged.
    Returns:
      Report dict: format, path, and per split records written and skipped by reason.
    """
    # TFDS is imported here, not at module level: every CLI command builds the `prepare`
    # parser, and importing TFDS costs ~0.3 s of each command's start-up.
    from mplug_jax.data.formats import builder as tfds_builder
    if format not in formats.preparable():
        raise ValueError(f"unknown format {format!r}; valid: {formats.preparable()}")
    module = formats.get(format)
    if not isinstance(annotations, dict):
        annotations = {split: annotations}
    splits = {}
    for name, files in annotations.items():
        files = [files] if isinstance(files, str) else list(files)
        is_train = (name == "train") if train is None else train
        splits[name] = module.prepare_reader(base.Split(
            files, image_root, train=is_train, roots=dict(roots or {}), flickr=flickr,
            max_skip_rate=max_skip_rate))
    extra: dict[str, Any] = {}
    if tfds_builder.is_video(format):
        _check_num_frames(out_dir, format, num_frames)
        extra["num_frames"] = num_frames
    image_roots = None if allow_outside_root else [image_root, *(roots or {}).values()]
    builder = tfds_builder.builder_class(format)(
        data_dir=out_dir, splits=splits, max_pixels=max_pixels, max_skip_rate=max_skip_rate,
        image_roots=image_roots, **extra)
    builder.download_and_prepare()
    report = {"format": format, "path": tfds_builder.dataset_dir(out_dir, format), "splits": {
        name: {"written": builder.written.get(name, 0),
               "skipped": {k: v for k, v in builder.skipped.get(name, {}).items() if v}}
        for name in splits}}
    outside = sum(s["skipped"].get("outside_root", 0) for s in report["splits"].values())
    if outside:
        logger.warning("%d records point outside the image root (../ or absolute paths) and "
                       "were skipped; --allow-outside-root reads them", outside)
    if not builder.written:
        logger.warning("%s already prepared at %s; nothing regenerated", format, report["path"])
        report["already_prepared"] = True
    return report


def _check_num_frames(out_dir: str, format: str, num_frames: int) -> None:
    """Refuse to report an existing video dataset with another frame count as prepared."""
    import tensorflow_datasets as tfds

    from mplug_jax.data.formats import builder as tfds_builder
    path = tfds_builder.dataset_dir(out_dir, format)
    if not os.path.isfile(os.path.join(path, "features.json")):
        return
    stored = tfds.builder_from_directory(path).info.features["frames"].shape[0]
    if stored != num_frames:
        raise transforms.DataError(f"{path} holds {stored} frames per video, not {num_frames}; "
                                   "delete it or prepare into another --out")


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of a :func:`prepare` report."""
    lines = [f"{report['format']} -> {report['path']}"]
    if report.get("already_prepared"):
        lines.append("  already prepared; delete the folder to rebuild")
    for name, s in report["splits"].items():
        why = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "none"
        lines.append(f"  {name}: {s['written']} records written, "
                     f"{sum(s['skipped'].values())} skipped ({why})")
    return "\n".join(lines)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    """Add the `prepare` subcommand's arguments to `parser`."""
    parser.add_argument("--format", required=True, choices=formats.preparable())
    parser.add_argument("--annotations", required=True, nargs="+",
                        help="annotation json/jsonl file(s) of one split")
    parser.add_argument("--image-root", "--video-root", dest="image_root", required=True,
                        metavar="DIR",
                        help="image root (video formats: folder of <video_id>/ frame folders "
                             "and video files)")
    parser.add_argument("--out", required=True, help="TFDS data_dir")
    parser.add_argument("--split", default="train")
    parser.add_argument("--eval", action="store_true",
                        help="evaluation-style records (default: training-style records only "
                             "for a split named train)")
    parser.add_argument("--root", action="append", default=[], metavar="TAG=DIR",
                        help="extra VQA image roots, e.g. vg=img_root/visual_genome")
    parser.add_argument("--flickr", action="store_true", help="flickr grounding tuples")
    parser.add_argument("--max-pixels", type=int, default=transforms.MAX_PIXELS)
    parser.add_argument("--max-skip-rate", type=float, default=0.05)
    parser.add_argument("--num-frames", type=_positive_int, default=16,
                        help="frames sampled per video (video_qa, video_caption)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="read images that the annotations place outside --image-root / "
                             "--root (../ or absolute paths); default: skip them (counted as "
                             "outside_root)")
    parser.add_argument("--report-json", help="also write the report here")


def run_prepare(args: argparse.Namespace) -> int:
    """Run `prepare` from parsed CLI args, print the report; returns the exit code."""
    roots = {}
    for item in args.root:
        tag, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--root expects TAG=DIR, got {item!r}")
        roots[tag] = path
    train = False if args.eval else None
    try:
        report = prepare(args.format, args.annotations, args.image_root, args.out,
                         split=args.split, train=train, roots=roots, flickr=args.flickr,
                         max_pixels=args.max_pixels, max_skip_rate=args.max_skip_rate,
                         num_frames=args.num_frames,
                         allow_outside_root=args.allow_outside_root)
    except transforms.DataError as e:
        print(f"prepare failed: {e}")
        return 1
    print(format_report(report))
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
