"""TFDS builders (array_record, no TensorFlow) for the official formats that `prepare` writes.

A format module that can be prepared declares its stored features (``FEATURES``: feature name
-> kind, see :data:`KINDS`) and turns one reader record into feature values (``example``);
:func:`builder_class` makes its ``GeneratorBasedBuilder`` (TFDS name ``mplug_<format>``),
which reads the format's reader per split, checks every image with
:func:`transforms.decode_image` and stores it as encoded bytes: RGB JPEG/PNG files are copied
byte for byte, anything else (grayscale, CMYK, palette, 16-bit, oversized JPEG reduced to
`max_pixels`) is re-encoded (JPEG q95 if it was a JPEG, else PNG). Unusable records are
skipped, logged and counted in ``builder.skipped[split]``. Text is stored as UTF-8 and comes
back as ``bytes``; images come back decoded as uint8[H, W, 3] (TFDS decodes with PIL).

Video formats (a ``frames`` feature) store `num_frames` frames per record, sampled as the
official mPLUG-2 test loader does (the middle frame of equal segments,
:func:`video.frame_indices`), each as encoded bytes (frame-folder files like images above,
frames decoded from video files as JPEG q95), plus the sampled `frame_indices`; `frames` comes
back as a list of T uint8[H, W, 3] arrays of one size (``np.stack`` gives uint8[T, H, W, 3]).
Unreadable videos are skipped and counted like bad images.

Read back with :func:`load_prepared` (``tfds.builder_from_directory(...).as_data_source()``); a
split can be fed straight to :func:`mplug_jax.data.inputs.pretrain.dataset`. TensorFlow is never
imported.
"""
from __future__ import annotations

import collections
import functools
import io
import logging
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from mplug_jax.data import formats
from mplug_jax.data.formats.base import RecordSource
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import BadRecord, DataError

logger = logging.getLogger(__name__)

SourceFactory = Callable[[], RecordSource]
# Feature kinds a format's FEATURES may name; 'frames' / 'frame_indices' hold num_frames items.
KINDS = ("image", "text", "texts", "int", "floats", "box", "frames", "frame_indices")


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


def encode_frame(frame: Image.Image, quality: int = 95) -> bytes:
    """A decoded RGB video frame -> JPEG bytes."""
    out = io.BytesIO()
    frame.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


class MplugBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared generation loop; `FORMAT` (the format module) gives the features and examples."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official mPLUG annotation format, images as encoded bytes."}
    # Nothing is downloaded, so there are no checksums; tfds would otherwise locate them via
    # `code_path`, which needs the `importlib_resources` backport (not a tfds dependency).
    _checksums_path = None
    FORMAT = None  # the format module (set by builder_class)

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

    def _feature(self, kind: str):
        """The tfds feature of one FEATURES kind."""
        if kind == "image":
            return tfds.features.Image(shape=(None, None, 3))
        if kind == "text":
            return tfds.features.Text()
        if kind == "texts":
            return tfds.features.Sequence(tfds.features.Text())
        if kind == "int":
            return np.int64
        if kind == "floats":
            return tfds.features.Sequence(np.float32)
        if kind == "box":
            return tfds.features.Tensor(shape=(4,), dtype=np.float32)
        raise ValueError(f"{self.name}: unknown feature kind {kind!r}; valid: {KINDS}")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {key: self._feature(kind) for key, kind in self.FORMAT.FEATURES.items()}
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({"id": np.int64, **features}))

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._split_sources:
            raise DataError(f"{self.name}: no splits given to generate")
        return {name: self._generate_examples(name, make)
                for name, make in self._split_sources.items()}

    def image(self, path) -> bytes:
        """Encoded bytes of the image at `path` (or of image bytes); BadRecord when unusable."""
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
                example = self.FORMAT.example(self, src[index], src, index)
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


class VideoBuilder(MplugBuilder, skip_registration=True):
    """Shared frame sampling for the video formats (`FEATURES` with 'frames')."""

    # Consecutive records often share a video (several questions per clip): keep the encoded
    # frames (or the skip reason) of the last few videos instead of decoding them again.
    FRAME_CACHE_SIZE = 16

    def __init__(self, *, num_frames: int = 16, **kwargs):
        """Like :class:`MplugBuilder`; `num_frames` frames are sampled per video."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        self._frame_cache: collections.OrderedDict[str, tuple[list[int], list[bytes]]
                                                   | BadRecord] = collections.OrderedDict()
        super().__init__(**kwargs)

    def _feature(self, kind: str):
        if kind == "frames":
            return tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)),
                                          length=self.num_frames)
        if kind == "frame_indices":
            return tfds.features.Tensor(shape=(self.num_frames,), dtype=np.int64)
        return super()._feature(kind)

    def _encode_frames(self, path: str) -> tuple[list[int], list[bytes]]:
        picks, frames = video.sample_frames(path, self.num_frames)
        encoded = [self.image(f) if isinstance(f, str) else encode_frame(f) for f in frames]
        sizes = set()
        for data in encoded:
            with Image.open(io.BytesIO(data)) as header:
                sizes.add(header.size)
        if len(sizes) > 1:
            raise BadRecord("bad_image", f"{path}: frames differ in size {sorted(sizes)}")
        return picks, encoded

    def frames(self, path: str) -> dict:
        """'frames' and 'frame_indices' of one video; raises BadRecord when it cannot be used."""
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


def is_video(format: str) -> bool:
    """Whether a preparable format stores sampled video frames (takes `num_frames`)."""
    return "frames" in _module(format).FEATURES.values()


def _module(format: str):
    if format not in formats.preparable():
        raise ValueError(f"unknown format {format!r}; valid: {formats.preparable()}")
    return formats.get(format)


@functools.cache
def builder_class(format: str) -> type[MplugBuilder]:
    """The TFDS builder class of a preparable format (made once; TFDS name `mplug_<format>`,
    description the module's DESCRIPTION).

    Raises:
      ValueError: `format` is not a format that `prepare` can write.
    """
    module = _module(format)
    base = VideoBuilder if is_video(format) else MplugBuilder
    camel = "".join(part.capitalize() for part in format.split("_"))
    return type(f"Mplug{camel}", (base,), {
        "name": f"mplug_{format}", "FORMAT": module, "__doc__": module.DESCRIPTION,
        "__module__": module.__name__})


def dataset_dir(out_dir: str, format: str) -> str:
    """Directory of a prepared dataset: ``out_dir/<builder name>/<version>``."""
    cls = builder_class(format)
    return os.path.join(out_dir, cls.name, str(cls.VERSION))


def load_prepared(out_dir: str, format: str) -> dict[str, object]:
    """Split name -> random-access TFDS data source of a dataset written by `prepare`."""
    path = dataset_dir(out_dir, format)
    if not os.path.isdir(path):
        raise DataError(f"no prepared {format} dataset at {path}")
    builder = tfds.builder_from_directory(path)
    return dict(builder.as_data_source())
