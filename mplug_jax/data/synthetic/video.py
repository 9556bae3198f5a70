"""Built-in synthetic videos: one coloured shape moving across a background, written as real
files in the official video annotation formats, so the readers of real data serve them too.

A video is drawn from ``np.random.default_rng([seed, SPLITS[split], index])``: the background,
style and shape of a `synthetic._sample_scene` scene (its first object), a direction (left,
right, up, down) and a straight path crossing about half the frame in that direction. Frames are
`synthetic.render` drawings of the scene with the shape displaced (the background noise is the
same in every frame, only the shape moves). Every word of the captions, questions and answers
is one bert-base-uncased token.

`write_video_files(directory, ...)` writes, for a split:
- frame folders ``frames/<video_id>/frame_0000.png ...`` (what `data.video.video_path` finds
  first) and, when PyAV is importable, ``mp4/<video_id>.mp4`` (MPEG-4 part 2, same frames);
- ``msrvtt_retrieval.jsonl``: MSRVTT retrieval (BLIP's msrvtt_test.jsonl: clip_name, caption;
  one caption per video);
- ``msrvtt_qa.jsonl``: MSRVTT-QA / MSVD-QA jsonl (video_id, question, answer; question id =
  line index), `qa_per_video` questions per video;
- ``vatex.json``: VATEX public test (array of {videoID, enCap: [references]});
- ``video_caption.jsonl``: the mPLUG-2 video caption test jsonl (video_id, golden_captions);
- ``video_caption_train.jsonl``: the mPLUG-2 video caption train jsonl (video_id, caption; one
  line per reference, as MSRVTT's 20 captions per video are 20 records).
mPLUG-2 video tasks can reuse it as is (the same records, other readers).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from mplug_jax.data.synthetic.shapes import (COLORS, SHAPES, SPLITS, Scene, Shape, _article,
                                             _sample_scene, render)

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
QA_KINDS = ("shape", "color", "direction")
_CAPTIONS = ("{obj} moving {dir} on a {bg} background", "{obj} moves {dir}",
             "{obj} going {dir}", "{obj} is moving {dir}")


@dataclasses.dataclass(frozen=True)
class VideoScene:
    """What a synthetic video is drawn from: a one-object scene and its motion."""

    scene: Scene  # the first frame
    direction: str
    travel: float  # displacement over the whole video, as a fraction of the side

    @property
    def shape(self) -> Shape:
        return self.scene.shapes[0]

    def at(self, t: float) -> Scene:
        """The scene at time t in [0, 1] (the shape moved by t * travel)."""
        dx, dy = _STEP[self.direction]
        s = self.shape
        moved = dataclasses.replace(s, cx=s.cx + dx * t * self.travel,
                                    cy=s.cy + dy * t * self.travel)
        return dataclasses.replace(self.scene, shapes=(moved,))


def sample_video_scene(rng: np.random.Generator) -> VideoScene:
    """A random `VideoScene`: start on the side opposite the direction, move ~half the side."""
    base = _sample_scene(rng)
    first = base.shapes[0]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    travel = float(rng.uniform(0.4, 0.5))
    half = min(first.half, 0.12)
    lo, hi = half + 0.02, 1.0 - half - 0.02
    start = {"left": (hi, None), "right": (lo, None), "up": (None, hi), "down": (None, lo)}
    sx, sy = start[direction]
    cx = sx if sx is not None else float(rng.uniform(lo, hi))
    cy = sy if sy is not None else float(rng.uniform(lo, hi))
    travel = min(travel, hi - lo)
    shape = dataclasses.replace(first, cx=cx, cy=cy, half=half)
    return VideoScene(dataclasses.replace(base, shapes=(shape,)), direction, travel)


def describe(v: VideoScene, rng: np.random.Generator) -> str:
    """One caption of a video (template drawn by `rng`)."""
    s = v.shape
    tpl = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    return tpl.format(obj=f"{_article(s.color)} {s.color} {s.shape}", dir=v.direction,
                      bg=v.scene.background)


def question_answer(v: VideoScene, kind: str) -> tuple[str, str]:
    """(question, one-word answer) of `kind` ('shape', 'color' or 'direction')."""
    s = v.shape
    if kind == "shape":
        return "what shape is moving?", s.shape
    if kind == "color":
        return f"what color is the moving {s.shape}?", s.color
    if kind == "direction":
        return f"which way is the {s.color} {s.shape} moving?", v.direction
    raise ValueError(f"unknown question kind {kind!r}; valid: {QA_KINDS}")


def answer_vocabulary() -> list[str]:
    """Every answer `question_answer` can give."""
    return sorted(set(SHAPES) | set(COLORS) | set(DIRECTIONS))


class SyntheticVideos:
    """Random-access synthetic videos (see module docstring).

    Args:
      split: 'train' or 'heldout' (disjoint random streams).
      size: number of videos.
      num_frames: frames per video.
      image_size: frame side.
      seed: base seed.
    """

    def __init__(self, split: str = "heldout", size: int = 16, *, num_frames: int = 8,
                 image_size: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
        if size < 1 or num_frames < 1 or image_size < 8:
            raise ValueError(f"need size >= 1, num_frames >= 1, image_size >= 8; got {size}, "
                             f"{num_frames}, {image_size}")
        self.split, self.size, self.num_frames = split, size, num_frames
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"video {index} out of range for {self.size} videos")
        return np.random.default_rng([self.seed, SPLITS[self.split], index, stream])

    def video_id(self, index: int) -> str:
        return f"{self.split}_video{index}"  # MSRVTT-like ids

    def scene(self, index: int) -> VideoScene:
        return sample_video_scene(self._rng(index, 0))

    def frames(self, index: int) -> np.ndarray:
        """uint8[T, R, R, 3]: the shape at T evenly spaced times from start to end."""
        v = self.scene(index)
        times = np.linspace(0.0, 1.0, self.num_frames) if self.num_frames > 1 else [0.0]
        # The same generator state for each frame: identical background noise.
        return np.stack([render(v.at(float(t)), self.image_size, self._rng(index, 1))
                         for t in times])

    def captions(self, index: int, n: int) -> list[str]:
        """n captions of video `index` (independent template draws)."""
        v = self.scene(index)
        return [describe(v, self._rng(index, 100 + j)) for j in range(n)]

    def questions(self, index: int, n: int) -> list[tuple[str, str]]:
        """n (question, answer) pairs of video `index`, kinds cycling from a random start."""
        v = self.scene(index)
        first = int(self._rng(index, 2).integers(len(QA_KINDS)))
        return [question_answer(v, QA_KINDS[(first + j) % len(QA_KINDS)]) for j in range(n)]


def _write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
    import av
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_video_files(directory: str, size: int = 16, *, split: str = "heldout",
                      num_frames: int = 8, image_size: int = 64, seed: int = 0,
                      mp4: bool | None = None, qa_per_video: int = 2,
                      refs_per_video: int = 5) -> dict:
    """Write `size` synthetic videos and their annotations under `directory` (module docstring).

    Args:
      mp4: also write .mp4 files (None = when PyAV is importable; True without PyAV raises).
      qa_per_video: questions per video in msrvtt_qa.jsonl.
      refs_per_video: references per video in vatex.json / video_caption.jsonl.
    Returns:
      {'frames_root', 'mp4_root' (None when not written), 'msrvtt_retrieval', 'msrvtt_qa',
       'vatex', 'video_caption', 'video_caption_train': paths; 'video_ids': list}.
    """
    if mp4 is None:
        try:
            import av  # noqa: F401
            mp4 = True
        except ImportError:
            mp4 = False
    if image_size % 2 and mp4:
        raise ValueError(f"mp4 (yuv420p) needs an even image_size, got {image_size}")
    ds = SyntheticVideos(split, size, num_frames=num_frames, image_size=image_size, seed=seed)
    out = {"frames_root": os.path.join(directory, "frames"),
           "mp4_root": os.path.join(directory, "mp4") if mp4 else None,
           "msrvtt_retrieval": os.path.join(directory, "msrvtt_retrieval.jsonl"),
           "msrvtt_qa": os.path.join(directory, "msrvtt_qa.jsonl"),
           "vatex": os.path.join(directory, "vatex.json"),
           "video_caption": os.path.join(directory, "video_caption.jsonl"),
           "video_caption_train": os.path.join(directory, "video_caption_train.jsonl"),
           "video_ids": [ds.video_id(i) for i in range(size)]}
    retrieval, qa, vatex, caps, cap_train = [], [], [], [], []
    for i, vid in enumerate(out["video_ids"]):
        frames = ds.frames(i)
        folder = os.path.join(out["frames_root"], vid)
        os.makedirs(folder, exist_ok=True)
        for t, f in enumerate(frames):
            Image.fromarray(f).save(os.path.join(folder, f"frame_{t:04d}.png"))
        if mp4:
            os.makedirs(out["mp4_root"], exist_ok=True)
            _write_mp4(os.path.join(out["mp4_root"], vid + ".mp4"), frames)
        refs = ds.captions(i, max(refs_per_video, 1))
        retrieval.append({"clip_name": vid, "caption": refs[0]})
        qa += [{"video_id": vid, "question": q, "answer": a}
               for q, a in ds.questions(i, qa_per_video)]
        vatex.append({"videoID": vid, "enCap": refs})
        caps.append({"video_id": vid, "golden_captions": refs})
        cap_train += [{"video_id": vid, "caption": r} for r in refs]
    _write_jsonl(out["msrvtt_retrieval"], retrieval)
    _write_jsonl(out["msrvtt_qa"], qa)
    _write_jsonl(out["video_caption"], caps)
    _write_jsonl(out["video_caption_train"], cap_train)
    with open(out["vatex"], "w", encoding="utf-8") as f:
        json.dump(vatex, f)
    return out

