"""TFDS builders (array_record, no TensorFlow) for the official annotation formats.

One ``GeneratorBasedBuilder`` per format reads a :mod:`sources` reader per split, checks every
image with :func:`transforms.decode_image` and stores it as encoded bytes: RGB JPEG/PNG files are
copied byte for byte, anything else (grayscale, CMYK, palette, 16-bit, oversized JPEG reduced
to `max_pixels`) is re-encoded (JPEG q95 if it was a JPEG, else PNG). Unusable records are
skipped, logged and counted in ``builder.skipped[split]``. Text is stored as UTF-8 and comes
back as ``bytes``; images come back decoded as uint8[H, W, 3] (TFDS decodes with PIL).

Video formats store `num_frames` frames per record, sampled as the official mPLUG-2 test loader
does (the middle frame of equal segments, :func:`video.frame_indices`), each as encoded bytes
(frame-folder files like images above, frames decoded from video files as JPEG q95), plus the
sampled `frame_indices`; `frames` comes back as a list of T uint8[H, W, 3] arrays of one size
(``np.stack`` gives uint8[T, H, W, 3]). Unreadable videos are skipped and counted like bad images.

Read back with :func:`load_prepared` (``tfds.builder_from_directory(...).as_data_source()``); a
split can be fed straight to :func:`pipeline.pretrain_dataset`. TensorFlow is never imported.
"""
from __future__ import annotations

import abc
import collections
import io
import logging
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from mplug_jax.data.formats import base as sources
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import BadRecord, DataError

logger = logging.getLogger(__name__)

SourceFactory = Callable[[], sources.RecordSource]


def encode_image(image, max_pixels: int = transforms.MAX_PIXELS) -> bytes:
    """File path or bytes -> encoded RGB image bytes (original bytes when already RGB JPEG/PNG).

    Raises:
      BadRecord: the image cannot be used (see :func:`transforms.decode_image`).
    """
    name = None
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadRecord("missing_file", f"{name}: {e.strerror or e}") from e
        if not data:
            raise BadRecord("empty_file", f"{name}: zero bytes")
    else:
        data = bytes(image)
    # The bytes are decoded here, so pass the path along for the skip messages.
    decoded = transforms.decode_image(data, max_pixels=max_pixels, name=name)
    with Image.open(io.BytesIO(data)) as header:
        fmt, mode, size = header.format, header.mode, header.size
    if fmt in ("JPEG", "PNG") and mode == "RGB" and size == decoded.size:
        return data
    out = io.BytesIO()
    if fmt == "JPEG":
        decoded.save(out, "JPEG", quality=95)
    else:
        decoded.save(out, "PNG")
    return out.getvalue()


class _MplugBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared generation loop; subclasses define `_features` and `_example`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official mPLUG annotation format, images as encoded bytes."}
    # Nothing is downloaded, so there are no checksums; tfds would otherwise locate them via
    # `code_path`, which needs the `importlib_resources` backport (not a tfds dependency).
    _checksums_path = None

    def __init__(self, *, splits: dict[str, SourceFactory] | None = None,
                 max_pixels: int = transforms.MAX_PIXELS, max_skip_rate: float = 0.05,
                 image_roots: Sequence[str] | None = None, **kwargs):
        """Builder of one dataset; `splits` is only needed to generate it.

        Args:
          splits: split name -> zero-argument reader returning a RecordSource.
          max_pixels: image size guard (see :func:`encode_image`).
          max_skip_rate: raise DataError when a split skips a larger fraction of records.
          image_roots: when given, records whose image / video path leads outside all of
            these folders (`../` or an absolute path in the annotations) are skipped as
            'outside_root'; None reads any path.
          **kwargs: tfds DatasetBuilder arguments (data_dir, file_format='array_record', ...).
        """
        self._split_sources = dict(splits or {})
        self._max_pixels, self._max_skip_rate = max_pixels, max_skip_rate
        self._roots = None if image_roots is None else [
            os.path.join(os.path.normpath(os.path.abspath(r)), "") for r in image_roots]
        self.skipped: dict[str, dict[str, int]] = {}
        self.written: dict[str, int] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @abc.abstractmethod
    def _features(self) -> dict:
        """Feature name -> tfds feature (without 'id')."""

    @abc.abstractmethod
    def _example(self, record: dict, source: sources.RecordSource, index: int) -> dict:
        """One source record -> feature values; raises BadRecord to skip it."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({"id": np.int64, **self._features()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._split_sources:
            raise DataError(f"{self.name}: no splits given to generate")
        return {name: self._generate_examples(name, make)
                for name, make in self._split_sources.items()}

    def _image(self, path) -> bytes:
        return encode_image(path, self._max_pixels)

    def _check_inside_roots(self, record: dict) -> None:
        """BadRecord('outside_root') when a media path of `record` leaves the image roots
        (lexically: `..` and absolute paths count, symlinks inside a root are followed)."""
        if self._roots is None:
            return
        paths = [record.get(k) for k in ("image", "video")] + list(record.get("images") or [])
        for path in paths:
            if not isinstance(path, str):
                continue
            full = os.path.normpath(os.path.abspath(path))
            if not any(full.startswith(root) for root in self._roots):
                raise BadRecord("outside_root", f"{path} is outside the image root "
                                f"({', '.join(r.rstrip(os.sep) for r in self._roots)}); "
                                "pass --allow-outside-root to read it")

    def _generate_examples(self, split: str, make_source: SourceFactory):
        src = make_source()
        skipped = dict(src.skipped)
        self.skipped[split], self.written[split] = skipped, 0
        for index in tqdm.tqdm(range(len(src)), desc=f"{self.name}/{split}", unit="rec"):
            try:
                self._check_inside_roots(src[index])
                example = self._example(src[index], src, index)
            except BadRecord as e:
                skipped[e.reason] += 1
                logger.warning("%s/%s record %d skipped (%s): %s", self.name, split, index,
                               e.reason, e)
                continue
            self.written[split] += 1
            yield index, {"id": index, **example}
        total = self.written[split] + sum(skipped.values())
        if total and sum(skipped.values()) / total > self._max_skip_rate:
            raise DataError(f"{self.name}/{split}: {sum(skipped.values())} of {total} records "
                            f"skipped (> max_skip_rate={self._max_skip_rate}): "
                            + ", ".join(f"{k}={v}" for k, v in skipped.items() if v))


def _text():
    return tfds.features.Text()


def _texts():
    return tfds.features.Sequence(tfds.features.Text())


class MplugPretrain(_MplugBuilder):
    """Image-caption pairs (official pretraining json; CC/SBU/COCO/VG)."""

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "caption": _texts()}

    def _example(self, record, source, index):
        cap = record["caption"]
        return {"image": self._image(record["image"]),
                "caption": [cap] if isinstance(cap, str) else list(cap)}


class MplugVqa(_MplugBuilder):
    """VQA v2 / VG / GQA questions with official answer weights."""

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "question": _text(),
                "question_id": _text(), "dataset": _text(), "answers": _texts(),
                "weights": tfds.features.Sequence(np.float32), "ocr_tokens": _texts(),
                "object_label": _text()}

    def _example(self, record, source, index):
        ocr = [str(t[1]) for t in record.get("ocr", []) if isinstance(t, (list, tuple))
               and len(t) > 1]
        return {"image": self._image(record["image"]), "question": record["question"],
                "question_id": str(record.get("question_id", "")), "dataset": record["dataset"],
                "answers": record.get("answers", []),
                "weights": np.asarray(record.get("weights", []), np.float32),
                "ocr_tokens": ocr, "object_label": record.get("object_label", "")}


class MplugCocoCaption(_MplugBuilder):
    """COCO Karpathy captions: train one record per sentence, eval one per image."""

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "image_id": _text(),
                "captions": _texts()}

    def _example(self, record, source, index):
        caps = record.get("gold_captions") or [record["caption"]]
        return {"image": self._image(record["image"]), "image_id": record["image_id"],
                "captions": caps}


class MplugRetrieval(_MplugBuilder):
    """COCO / Flickr30k retrieval: train (caption, image_index), eval (image, its captions)."""

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "captions": _texts(),
                "image_index": np.int64}

    def _example(self, record, source, index):
        if "caption" in record:
            caps = [record["caption"]]
        else:
            caps = [source.texts[t] for t in source.img2txt[record["image_index"]]]
        return {"image": self._image(record["image"]), "captions": caps,
                "image_index": record["image_index"]}


class MplugGrounding(_MplugBuilder):
    """RefCOCO / RefCOCO+ / RefCOCOg phrases with [x, y, w, h] pixel boxes."""

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "phrase": _text(),
                "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32)}

    def _example(self, record, source, index):
        return {"image": self._image(record["image"]), "phrase": record["phrase"],
                "bbox": np.asarray(record["bbox"], np.float32)}


class MplugNlvr2(_MplugBuilder):
    """NLVR2 image pairs with a sentence and a 0/1 label."""

    def _features(self):
        img = tfds.features.Image(shape=(None, None, 3))
        return {"image0": img, "image1": img, "sentence": _text(), "label": np.int64}

    def _example(self, record, source, index):
        first, second = record["images"]
        return {"image0": self._image(first), "image1": self._image(second),
                "sentence": record["sentence"], "label": record["label"]}


class MplugSnliVe(_MplugBuilder):
    """SNLI-VE: Flickr30k image, hypothesis, label (entailment 2, neutral 1, contradiction 0)."""

    def _features(self):
        return {"image": tfds.features.Image(shape=(None, None, 3)), "sentence": _text(),
                "label": np.int64}

    def _example(self, record, source, index):
        return {"image": self._image(record["image"]), "sentence": record["sentence"],
                "label": record["label"]}


def encode_frame(frame: Image.Image, quality: int = 95) -> bytes:
    """A decoded RGB video frame -> JPEG bytes."""
    out = io.BytesIO()
    frame.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


class _MplugVideoBuilder(_MplugBuilder, skip_registration=True):
    """Shared frame sampling for the video formats; subclasses add the text fields."""

    # Consecutive records often share a video (several questions per clip): keep the encoded
    # frames (or the skip reason) of the last few videos instead of decoding them again.
    FRAME_CACHE_SIZE = 16

    def __init__(self, *, num_frames: int = 16, **kwargs):
        """Like :class:`_MplugBuilder`; `num_frames` frames are sampled per video."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        self._frame_cache: collections.OrderedDict[str, tuple[list[int], list[bytes]]
                                                   | BadRecord] = collections.OrderedDict()
        super().__init__(**kwargs)

    def _video_features(self) -> dict:
        return {"frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)),
                                                 length=self.num_frames),
                "frame_indices": tfds.features.Tensor(shape=(self.num_frames,),
                                                      dtype=np.int64),
                "video_id": _text()}

    def _encode_frames(self, path: str) -> tuple[list[int], list[bytes]]:
        picks, frames = video.sample_frames(path, self.num_frames)
        encoded = [self._image(f) if isinstance(f, str) else encode_frame(f) for f in frames]
        sizes = set()
        for data in encoded:
            with Image.open(io.BytesIO(data)) as header:
                sizes.add(header.size)
        if len(sizes) > 1:
            raise BadRecord("bad_image", f"{path}: frames differ in size {sorted(sizes)}")
        return picks, encoded

    def _frames(self, path: str) -> dict:
        """Frame features of one video; raises BadRecord when it cannot be used."""
        cached = self._frame_cache.get(path)
        if cached is None:
            try:
                cached = self._encode_frames(path)
            except BadRecord as e:
                cached = e
            self._frame_cache[path] = cached
            while len(self._frame_cache) > self.FRAME_CACHE_SIZE:
                self._frame_cache.popitem(last=False)
        else:
            self._frame_cache.move_to_end(path)
        if isinstance(cached, BadRecord):
            raise BadRecord(cached.reason, str(cached))
        picks, encoded = cached
        return {"frames": encoded, "frame_indices": np.asarray(picks, np.int64)}


class MplugVideoQa(_MplugVideoBuilder):
    """MSRVTT-QA / MSVD-QA / TGIF-QA: sampled frames, question, answer, question_id."""

    def _features(self):
        return {**self._video_features(), "question": _text(), "answer": _text(),
                "question_id": np.int64}

    def _example(self, record, source, index):
        return {**self._frames(record["video"]), "video_id": record["video_id"],
                "question": record["question"], "answer": record["answer"],
                "question_id": record["question_id"]}


class MplugVideoCaption(_MplugVideoBuilder):
    """mPLUG-2 video captions: train one record per caption, eval the golden captions."""

    def _features(self):
        return {**self._video_features(), "captions": _texts()}

    def _example(self, record, source, index):
        caps = record["gold_captions"] if "gold_captions" in record else [record["caption"]]
        if not caps:
            raise BadRecord("bad_caption", "no golden caption is a string")
        return {**self._frames(record["video"]), "video_id": record["video_id"],
                "captions": caps}


BUILDERS: dict[str, type[_MplugBuilder]] = {
    "pretrain": MplugPretrain, "vqa": MplugVqa, "coco_caption": MplugCocoCaption,
    "retrieval": MplugRetrieval, "grounding": MplugGrounding, "nlvr2": MplugNlvr2,
    "snli_ve": MplugSnliVe, "video_qa": MplugVideoQa, "video_caption": MplugVideoCaption,
}
VIDEO_FORMATS = ("video_qa", "video_caption")


def dataset_dir(out_dir: str, format: str) -> str:
    """Directory of a prepared dataset: ``out_dir/<builder name>/<version>``."""
    if format not in BUILDERS:
        raise ValueError(f"unknown format {format!r}; valid: {sorted(BUILDERS)}")
    cls = BUILDERS[format]
    return os.path.join(out_dir, cls.name, str(cls.VERSION))


def load_prepared(out_dir: str, format: str) -> dict[str, object]:
    """Split name -> random-access TFDS data source of a dataset written by `prepare`."""
    path = dataset_dir(out_dir, format)
    if not os.path.isdir(path):
        raise DataError(f"no prepared {format} dataset at {path}")
    builder = tfds.builder_from_directory(path)
    return dict(builder.as_data_source())


__all__ = ["BUILDERS", "VIDEO_FORMATS", "encode_image", "encode_frame", "dataset_dir",
           "load_prepared"] + [
    cls.__name__ for cls in BUILDERS.values()]
