"""Image-text retrieval input: official ALBEF-format json (COCO / Flickr30k) or the built-in set.

`config.input.dataset`:
- 'json': `input.train_annotations` (train records {image, caption, image_id}) and
  `input.eval_annotations` (eval records {image, caption: [..]}), images under
  `input.image_root` (docs/official-formats.md#image-text-retrieval), read by
  `formats.retrieval.read`;
- 'synthetic': `synthetic_retrieval.write_files` (the same format, written once under
  `input.synthetic_dir`, default a folder in the system temp dir named by its settings).

Records whose image file does not exist are skipped when the files are read, counted in the
source's `skipped['missing_file']` and logged (an eval image takes its captions with it); more
than `input.max_skip_rate` of them raises `DataError`. Images that exist but fail to decode are
skipped and counted by the train pipeline; at evaluation they raise (an eval set must be whole).

Train batch (per process, B rows): image float32[B, R, R, 3], text_ids / text_mask int32[B, L]
(`[CLS] caption`, L = `input.max_tokens`, official 30: truncated, right-padded), image_index
int32[B] (the record's `image_id` mapped to 0..K-1 in order of first appearance: captions of
one image share it), idx int32[B] (record index).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from typing import Any

import numpy as np

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import retrieval as retrieval_format
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.synthetic import retrieval as synthetic_retrieval
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.formats.base import RecordSource, read_annotations
from mplug_jax.data.ops.image import BadRecord, DataError

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "json")
MAX_WORDS = 30  # official pre_caption(caption, 30)


def synthetic_files(input_cfg, image_size: int, seed: int) -> dict:
    """Paths of the built-in set for `input_cfg` (written on first use)."""
    caps = int(input_cfg.get("captions_per_image", 2))
    ntr, nev = int(input_cfg.train_size), int(input_cfg.eval_size)
    directory = input_cfg.get("synthetic_dir") or os.path.join(
        tempfile.gettempdir(), "mplug_jax_synthetic_retrieval",
        f"train{ntr}_eval{nev}_caps{caps}_px{image_size}_seed{seed}")
    return synthetic_retrieval.write_files(directory, train_images=ntr, eval_images=nev,
                                           captions_per_image=caps, image_size=image_size,
                                           seed=seed)


def _files(input_cfg, split: str, image_size: int, seed: int,
           annotations=None) -> tuple[list[str], str]:
    """(annotation files, image root) of `split` ('train' / 'val' / 'test')."""
    kind = input_cfg.dataset
    if kind == "synthetic":
        paths = synthetic_files(input_cfg, image_size, seed)
        files = list(annotations) if annotations else [paths[split]]
        return files, paths["image_root"]
    if kind == "json":
        key = "train_annotations" if split == "train" else "eval_annotations"
        files = annotations or input_cfg.get(key)
        if not files:
            raise ValueError(f"input.dataset='json' needs input.{key} (official ALBEF-format "
                             "retrieval json, e.g. coco_train.json / coco_test.json)")
        files = [files] if isinstance(files, str) else list(files)
        return files, input_cfg.get("image_root", "")
    raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")


def _check_rate(name: str, skipped: dict, total: int, max_skip_rate: float) -> None:
    n = sum(skipped.values())
    if total and n / total > max_skip_rate:
        raise DataError(f"{name}: {n} of {total} records skipped (> max_skip_rate="
                        f"{max_skip_rate}): " + ", ".join(f"{k}={v}" for k, v in
                                                          skipped.items() if v))


def train_source(input_cfg, image_size: int, seed: int) -> RecordSource:
    """Train records {image, caption, image_index}; missing image files skipped and counted
    (image_index stays the official first-appearance numbering of every image_id)."""
    files, root = _files(input_cfg, "train", image_size, seed)
    rate = float(input_cfg.max_skip_rate)
    src = retrieval_format.read(files, root, train=True, max_words=MAX_WORDS, max_skip_rate=rate)
    exists: dict[str, bool] = {}
    kept, missing = [], 0
    for r in src.records:
        ok = exists.setdefault(r["image"], os.path.isfile(r["image"]))
        if ok:
            kept.append(r)
        else:
            missing += 1
            logger.warning("retrieval train record skipped (missing_file): %s", r["image"])
    skipped = dict(src.skipped)
    skipped["missing_file"] += missing
    _check_rate(src.name, skipped, len(src.records) + sum(src.skipped.values()), rate)
    return RecordSource(kept, skipped, src.name)


@dataclasses.dataclass
class EvalSplit:
    """An evaluation split in the official numbering (texts image by image, caption by
    caption), after dropping images whose file is missing.

    Attributes:
      images: [NI] image paths; keys: [NI] the paths as written in the json (result file keys).
      texts: [NT] pre_caption'ed captions; txt2img: int[NT]; img2txt: [NI] lists of text ids.
      skipped: skip counts by reason (formats.base.SKIP_REASONS).
    """
    images: list[str]
    keys: list[str]
    texts: list[str]
    txt2img: np.ndarray
    img2txt: list[list[int]]
    skipped: dict


def eval_split(input_cfg, image_size: int, seed: int, annotations=None,
               split: str = "val") -> EvalSplit:
    """The eval split of `input_cfg` (`annotations` overrides `input.eval_annotations`;
    synthetic: `split` 'val' or 'test')."""
    files, root = _files(input_cfg, split, image_size, seed, annotations)
    return read_eval(files, root, float(input_cfg.max_skip_rate))


def read_eval(files, image_root: str, max_skip_rate: float = 0.01) -> EvalSplit:
    """Official eval json `files` -> `EvalSplit` (see `eval_split`)."""
    files = [files] if isinstance(files, str) else list(files)
    src = retrieval_format.read(files, image_root, train=False, max_words=MAX_WORDS,
                                max_skip_rate=max_skip_rate)
    raw_keys = [r.get("image") for f in files for r in read_annotations(f)
                if isinstance(r, dict) and isinstance(r.get("image"), str)]
    by_path = {os.path.join(image_root, k): k for k in raw_keys}
    images, keys, texts, txt2img, img2txt = [], [], [], [], []
    missing = 0
    for rec in src.records:
        if not os.path.isfile(rec["image"]):
            missing += 1
            logger.warning("retrieval eval image skipped with its %d captions (missing_file): "
                           "%s", len(src.img2txt[rec["image_index"]]), rec["image"])
            continue
        i = len(images)
        images.append(rec["image"])
        keys.append(by_path.get(rec["image"], rec["image"]))
        img2txt.append([])
        for t in src.img2txt[rec["image_index"]]:
            img2txt[i].append(len(texts))
            texts.append(src.texts[t])
            txt2img.append(i)
    skipped = dict(src.skipped)
    skipped["missing_file"] += missing
    _check_rate(src.name, skipped, len(src.records) + sum(src.skipped.values()), max_skip_rate)
    if not images:
        raise DataError(f"{src.name}: no usable evaluation image")
    return EvalSplit(images, keys, texts, np.asarray(txt2img, np.int64), img2txt, skipped)


def to_example(record: dict, rng: pipeline.RecordRng, **options) -> dict[str, Any]:
    """One train record -> the image-caption example of `pretrain_input.to_example` (`options`
    there) plus its image_index int32."""
    out = pretrain_input.to_example(record, rng, **options)
    out["image_index"] = np.int32(record["image_index"])
    return out


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    src = train_source(inp, config.model.image_size, config.seed)
    options = pretrain_input.input_example_fn(inp, config.model.image_size, MAX_WORDS).keywords
    return pipeline.train_batches(inp, src, functools.partial(to_example, **options),
                                  process_index, process_count)


def encode_texts(texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Official eval tokenisation: `[CLS] text` truncated and padded to `max_tokens` ids."""
    return tokenizer.get_tokenizer().encode(texts, max_length=max_tokens, pad_to=max_tokens)


def load_images(paths: list[str], image_size: int, threads: int = 8) -> np.ndarray:
    """Official test transform of image files -> float32[N, R, R, 3] (a file that cannot be
    decoded raises DataError: an evaluation set must be complete)."""
    def one(path):
        try:
            return transforms.eval_transform(transforms.decode_image(path), image_size)
        except BadRecord as e:
            raise DataError(f"retrieval eval image {path}: {e.reason}: {e}") from e

    return np.stack(list(eval_loader.ordered_map(one, paths, threads, len(paths)))).astype(
        np.float32)
