"""Video frames for the video formats: frame folders and video files, sampled as mPLUG-2.

A record's ``video`` field (see :func:`formats.video_qa.read`) is either a folder of frame images
(read in sorted file-name order) or a video file decoded with PyAV, or with OpenCV when PyAV is
missing. :func:`frame_indices` is the official uniform sampling rule; :func:`sample_frames`
applies it to one video and :func:`load_frames` returns the sampled frames as RGB images.
Unusable videos raise :class:`BadRecord` like bad images do. :func:`eval_clip` and
:func:`train_clip` are mPLUG-2's clip transforms (test: nearest-neighbour resize; train: one
crop, flip and RandAugment draw shared by every frame).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import BadRecord, DataError, decode_image

FRAME_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def video_path(video_root: str, video_id: str) -> str:
    """Where a video id lives: a frame folder ``root/<id>/`` if present, else the official
    file naming rules (``tumblr*`` ids are GIFs, otherwise ``.mp4`` unless only ``.avi`` exists)."""
    folder = os.path.join(video_root, video_id)
    if os.path.isdir(folder):
        return folder
    if video_id.startswith("tumblr"):
        return folder + ".gif"
    mp4 = folder + ".mp4"
    return mp4 if os.path.exists(mp4) or not os.path.exists(folder + ".avi") else folder + ".avi"


def frame_indices(num_total: int, num_frames: int, *, train: bool = False,
                  rng: np.random.Generator | None = None) -> list[int]:
    """Uniform sampling (mPLUG-2): one frame per equal segment, random ('rand', train) or the
    segment middle (eval); videos shorter than `num_frames` repeat their last frame."""
    if num_total <= 0:
        raise BadRecord("bad_image", "video has no frames")
    # As mPLUG-2: sample min(num_frames, num_total) segments, then pad with the last frame.
    segments = min(num_frames, num_total)
    edges = np.linspace(0, num_total, segments + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo_i, hi_i = int(lo), max(int(lo) + 1, int(hi))
        if train:
            if rng is None:
                raise ValueError("train sampling needs rng")
            idx = int(rng.integers(lo_i, hi_i))
        else:
            idx = (lo_i + hi_i - 1) // 2
        out.append(min(idx, num_total - 1))
    return out + [out[-1]] * (num_frames - segments)


def sample_frames(video: str, num_frames: int, *, train: bool = False,
                  rng: np.random.Generator | None = None
                  ) -> tuple[list[int], list[str | Image.Image]]:
    """Pick `num_frames` frames of a frame folder or a video file (see :func:`frame_indices`).

    Returns:
      (indices, frames): the sampled frame indices and, per index, the frame file's path (frame
      folder, sorted file names; the file is not read) or the decoded RGB image (video file).
    Raises:
      BadRecord: the video is missing, empty, undecodable or has no frames.
      DataError: a video file but neither PyAV (``av``) nor OpenCV (``cv2``) is installed.
    """
    if os.path.isdir(video):
        names = sorted(n for n in os.listdir(video) if n.lower().endswith(FRAME_EXTS))
        picks = frame_indices(len(names), num_frames, train=train, rng=rng)
        return picks, [os.path.join(video, names[i]) for i in picks]
    if not os.path.exists(video):
        raise BadRecord("missing_file", f"{video}: not found")
    if os.path.getsize(video) == 0:
        raise BadRecord("empty_file", f"{video}: zero bytes")
    return _decode_video(video, num_frames, train=train, rng=rng)


def load_frames(video: str, num_frames: int, *, train: bool = False,
                rng: np.random.Generator | None = None) -> list[Image.Image]:
    """`num_frames` RGB frames of a frame folder (sorted file names) or a video file.

    Video files (.mp4, .avi, .gif, ...) need PyAV (``pip install mplug-jax[video]``) or OpenCV;
    without them a DataError says so.
    """
    _, frames = sample_frames(video, num_frames, train=train, rng=rng)
    return [decode_image(f) if isinstance(f, str) else f for f in frames]


# A decoded frame is handed out as a zero-argument converter so that only sampled frames are
# turned into images: a long video is decoded frame by frame in constant memory.
FrameIter = Iterable[Callable[[], Image.Image]]


def _av_frames(path: str) -> tuple[int, Callable[[], FrameIter]]:
    import av

    def frames() -> FrameIter:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                yield frame.to_image  # rgb24 whatever the pixel format (yuv, pal8 GIFs, ...)

    with av.open(path) as container:
        if not container.streams.video:
            raise BadRecord("bad_image", f"{path}: no video stream")
        return container.streams.video[0].frames, frames


def _cv2_frames(path: str) -> tuple[int, Callable[[], FrameIter]]:
    import cv2

    def frames() -> FrameIter:
        cap = cv2.VideoCapture(path)
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield lambda bgr=bgr: Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
        finally:
            cap.release()

    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise BadRecord("bad_image", f"{path}: OpenCV cannot open it")
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), frames
    finally:
        cap.release()


def _collect(frames: FrameIter, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode every frame, convert the `wanted` ones; returns (index -> image, frame count)."""
    out, count = {}, 0
    for index, convert in enumerate(frames):
        if index in wanted:
            out[index] = convert().convert("RGB")
        count = index + 1
    return out, count


def _video_decoder(path: str) -> tuple[Callable[[str], tuple[int, Callable[[], FrameIter]]],
                                         tuple[type[BaseException], ...]]:
    """(frame opener, the decoder's error types): PyAV if installed, else OpenCV."""
    try:
        import av
        return _av_frames, (av.error.FFmpegError, IndexError, ValueError, OSError)
    except ImportError:
        pass
    try:
        import cv2
        return _cv2_frames, (cv2.error, ValueError, OSError)
    except ImportError as e:
        raise DataError(f"cannot decode {path}: install PyAV (`pip install av`, or the `video` "
                        "extra) or OpenCV, or extract frames into a folder named like the "
                        "video id") from e


def _decode_video(path: str, num_frames: int, *, train: bool,
                  rng: np.random.Generator | None) -> tuple[list[int], list[Image.Image]]:
    opener, errors = _video_decoder(path)
    try:
        total, frames = opener(path)
        if total <= 0:  # the container does not say: count by decoding
            total = _collect(frames(), set())[1]
        picks = frame_indices(total, num_frames, train=train, rng=rng)
        got, count = _collect(frames(), set(picks))
        if len(got) < len(set(picks)):  # the header over-counts (truncated file): resample
            picks = frame_indices(count, num_frames, train=train, rng=rng)
            got, _ = _collect(frames(), set(picks))
    except BadRecord:
        raise
    except errors as e:
        raise BadRecord("bad_image", f"{path}: cannot decode video ({e})") from e
    return picks, [got[i] for i in picks]


def _clip_array(frames) -> np.ndarray:
    """uint8[T, h, w, 3] from RGB PIL images or arrays of one video (all the same size)."""
    arrays = [np.asarray(transforms.to_rgb(f) if isinstance(f, Image.Image) else f)
              for f in frames]
    if not arrays:
        raise ValueError("a clip needs at least one frame")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(arrays[0].shape) != 3 or arrays[0].shape[-1] != 3:
        raise ValueError(f"clip frames must be RGB images of one size, got shapes "
                         f"{sorted(shapes)}")
    return np.stack(arrays).astype(np.uint8)


def resize_nearest(clip: np.ndarray, size: int) -> np.ndarray:
    """mPLUG-2's test resize (docs/fixtures.md#mplug-2-frames): torch `interpolate(mode='nearest')`
    to size x size, aspect ratio not kept: output (i, j) = input (min(floor(i * h / R), h - 1),
    min(floor(j * w / R), w - 1)) with the scales in float32. [T, h, w, C] -> [T, R, R, C]."""
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {size}")
    h, w = clip.shape[1:3]

    def index(n: int) -> np.ndarray:
        scale = np.float32(n) / np.float32(size)
        src = np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, n - 1)

    return clip[:, index(h)][:, :, index(w)]


def eval_clip(frames, image_size: int) -> np.ndarray:
    """mPLUG-2 `video_test_transform`: nearest resize to a square, /255, CLIP normalisation.

    Args:
      frames: T RGB frames (PIL images or uint8[h, w, 3]) of one video.
    Returns:
      float32[T, R, R, 3] (channels last; the official tensor is 3 x T x R x R).
    """
    return transforms.normalize(resize_nearest(_clip_array(frames), image_size))


def train_clip(frames, image_size: int, rng: np.random.Generator, *,
               crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True,
               randaug_n: int = 2, randaug_m: int = 5, backend: str = "pil") -> np.ndarray:
    """mPLUG-2's training clip transform: RandomResizedCrop (0.5-1) -> flip -> RandAugment
    (N=2, M=5) -> normalise, *temporally consistent*: every frame gets the same crop box, flip
    and RandAugment ops and magnitudes (docs/official-formats.md#video).

    Consistency comes from replaying one random stream per frame: the image transform's draws
    depend only on the frame size (equal within a clip), never on pixel values.

    Returns:
      float32[T, R, R, 3].
    """
    clip = _clip_array(frames)
    seed = int(rng.integers(0, 2**63 - 1))
    return np.stack([transforms.train_transform(
        Image.fromarray(f), image_size, np.random.default_rng(seed), crop_scale=crop_scale,
        hflip=hflip, randaug_n=randaug_n, randaug_m=randaug_m, backend=backend)
        for f in clip])
