"""Built-in synthetic video QA whose questions need time: moving and appearing shapes.

Every video is `raw_frames` frames of `synthetic.render` drawings (one background, the same
noise in every frame) and belongs to one question kind:

- 'direction': one shape moves straight across about half the frame (left, right, up or
  down), sometimes next to a static distractor of another colour and shape:
  "which way does the red circle move?" -> left / right / up / down. Where the path lies is
  drawn independently of the direction, so the positions visited (without their order) do
  not give the answer away.
- 'order': two shapes of different kinds, the first visible in the first half of the video
  only, the second in the second half only: "which shape appears first?" -> circle / square /
  triangle. Both are on screen equally long, so only the order tells them apart.
- 'count': three shapes appear one after another (one per third of the video, each alone):
  "how many squares appear in the video?" -> zero / one / two / three.

A model that sees the frames as an unordered set (no temporal modelling: frame tokens carry no
time embedding) cannot answer 'direction' beyond the axis of motion nor 'order' beyond the two
shapes present: a video and its time reversal give the same set. 'count' needs all frames but
not their order.

Variant 'easy' (`variant="easy"`, what the tiny learning test trains on): the same two
temporal kinds made as easy to see as possible while still needing the order of frames. One
large shape of one colour on a plain (solid) background, no distractors, no noise:

- 'direction': it moves left or right across about 60% of the frame (2 answers, chance 50%);
  the path is again drawn independently of the direction.
- 'order': "which colour appears first?" -> red / blue: a red and a blue copy of one shape
  in two different places, one in the first half of the video only, the other in the second.

No 'count' questions (they do not need time). Use it with `raw_frames == num_frames` so every
frame is sampled: a video and its time reversal then give a model without temporal modules the
same frames in reverse order (an unordered-set model is at chance on both kinds).

`write_motion_files(directory, size, split=...)` writes the official MSRVTT-QA layout, so the
reader of real data (`formats.video_qa.read`) serves it: frame folders
``frames/<video_id>/frame_0000.png ...`` and ``msrvtt_qa.jsonl`` (video_id, question, answer;
question id = line index). Segment boundaries are chosen so that any `num_frames` <=
`raw_frames` / 2 sampled by `data.video.frame_indices` (train 'rand' or eval 'middle') sees
every phase of every video.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from mplug_jax.data.synthetic.shapes import (BACKGROUND_STYLES, BACKGROUNDS, COLORS, GRID, NUMBERS,
                                             SHAPES, SPLITS, Scene, Shape, render)

KINDS = ("direction", "order", "count")
VARIANTS = ("standard", "easy")
EASY_KINDS = ("direction", "order")
EASY_DIRECTIONS = ("left", "right")
EASY_COLORS = ("red", "blue")
TEMPORAL_KINDS = ("direction", "order")  # unanswerable from an unordered set of frames
DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_QUESTIONS = {"direction": "which way does the {color} {shape} move?",
              "order": "which shape appears first?",
              "count": "how many squares appear in the video?"}
_EASY_ORDER_QUESTION = "which colour appears first?"


def question_kind(question: str) -> str:
    """The kind ('direction', 'order', 'count') of a question this module writes."""
    q = question.strip().lower()
    if q.startswith("which way"):
        return "direction"
    if q.startswith("which shape appears") or q.startswith("which colour appears"):
        return "order"
    if q.startswith("how many"):
        return "count"
    raise ValueError(f"not a synthetic motion question: {question!r}")


def kinds(variant: str = "standard") -> tuple[str, ...]:
    """The question kinds of `variant`, in the order videos cycle through them."""
    _check_variant(variant)
    return EASY_KINDS if variant == "easy" else KINDS


def answer_choices(kind: str, variant: str = "standard") -> tuple[str, ...]:
    """The answers a question of `kind` can have in `variant` (uniform chance = 1 / len)."""
    if kind not in kinds(variant):
        raise ValueError(f"unknown kind {kind!r} for variant {variant!r}; valid: "
                         f"{kinds(variant)}")
    if variant == "easy":
        return {"direction": EASY_DIRECTIONS, "order": EASY_COLORS}[kind]
    return {"direction": DIRECTIONS, "order": SHAPES, "count": NUMBERS}[kind]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown synthetic motion variant {variant!r}; valid: {VARIANTS}")


@dataclasses.dataclass(frozen=True)
class MotionVideo:
    """What one video is drawn from: the frame at time t in [0, 1) is `scene_at(t)`."""

    kind: str
    background: str
    style: str
    # (shape, visible from, visible until, (dx, dy) displacement over the whole video)
    tracks: tuple[tuple[Shape, float, float, tuple[float, float]], ...]
    question: str
    answer: str

    def scene_at(self, t: float) -> Scene:
        shapes = tuple(dataclasses.replace(s, cx=s.cx + d[0] * t, cy=s.cy + d[1] * t)
                       for s, lo, hi, d in self.tracks if lo <= t < hi)
        return Scene(self.background, self.style, shapes)


def _cells(rng: np.random.Generator, n: int, half: float) -> list[tuple[float, float, tuple]]:
    """n distinct grid cells with jittered centres (fractions of the side)."""
    step = 1.0 / GRID
    out = []
    for cell in rng.choice(GRID * GRID, size=n, replace=False):
        row, col = divmod(int(cell), GRID)
        jx, jy = rng.uniform(-0.1, 0.1, size=2) * step
        cx = float(np.clip((col + 0.5) * step + jx, half, 1 - half))
        cy = float(np.clip((row + 0.5) * step + jy, half, 1 - half))
        out.append((cx, cy, (row, col)))
    return out


def _sample_easy(rng: np.random.Generator, kind: str) -> MotionVideo:
    """A random `MotionVideo` of the 'easy' variant (module docstring)."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    half = float(rng.uniform(0.15, 0.19))
    shape = str(rng.choice(SHAPES))
    lo, hi = half + 0.01, 1.0 - half - 0.01
    if kind == "direction":
        direction = EASY_DIRECTIONS[int(rng.integers(2))]
        color = str(rng.choice(EASY_COLORS))
        travel = min(float(rng.uniform(0.5, 0.6)), hi - lo)
        a = lo + float(rng.uniform(0.0, hi - lo - travel))  # independent of the direction
        cx = a + travel if direction == "left" else a
        cy = float(rng.uniform(lo, hi))
        dx = -travel if direction == "left" else travel
        tracks = ((Shape(color, shape, cx, cy, half, (0, 0)), 0.0, 1.0, (dx, 0.0)),)
        question = _QUESTIONS["direction"].format(color=color, shape=shape)
        return MotionVideo(kind, bg, "solid", tracks, question, direction)
    first, second = [str(c) for c in rng.permutation(EASY_COLORS)]
    (ax, ay, ac), (bx, by, bc) = _cells(rng, 2, half)
    still = (0.0, 0.0)
    tracks = ((Shape(first, shape, ax, ay, half, ac), 0.0, 0.5, still),
              (Shape(second, shape, bx, by, half, bc), 0.5, 1.0, still))
    return MotionVideo(kind, bg, "solid", tracks, _EASY_ORDER_QUESTION, first)


def sample_video(rng: np.random.Generator, kind: str, variant: str = "standard") -> MotionVideo:
    """A random `MotionVideo` of `kind` in `variant` (module docstring)."""
    if kind not in kinds(variant):
        raise ValueError(f"unknown kind {kind!r} for variant {variant!r}; valid: "
                         f"{kinds(variant)}")
    if variant == "easy":
        return _sample_easy(rng, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {KINDS}")
    bg = str(rng.choice(list(BACKGROUNDS)))
    style = str(rng.choice(BACKGROUND_STYLES))
    half = float(rng.uniform(0.13, 0.17))
    colors = [str(c) for c in rng.permutation(list(COLORS))]
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    still = (0.0, 0.0)
    if kind == "direction":
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        travel = float(rng.uniform(0.45, 0.55))
        lo, hi = half + 0.02, 1.0 - half - 0.02
        travel = min(travel, hi - lo)
        # The path [a, a + travel] is drawn independently of the direction, so the set of
        # positions a video visits (what a model without time sees) says nothing about which
        # way it is travelled: starting at `lo` for right / down and at `hi` for left / up
        # would put the mean position on the side the shape comes from (a time-free leak).
        a = float(rng.uniform(lo, hi - travel))
        along = {"left": a + travel, "right": a, "up": a + travel, "down": a}[direction]
        across = float(rng.uniform(lo, hi))
        horizontal = direction in ("left", "right")
        cx, cy = (along, across) if horizontal else (across, along)
        dx, dy = _STEP[direction]
        mover = Shape(colors[0], shapes[0], cx, cy, half, (0, 0))
        tracks = [(mover, 0.0, 1.0, (dx * travel, dy * travel))]
        if rng.random() < 0.5:  # a static distractor away from the path
            ox, oy, cell = _cells(rng, 1, half)[0]
            off = (ox, 1.0 - cy) if horizontal else (1.0 - cx, oy)
            if abs(off[1 if horizontal else 0] - (cy if horizontal else cx)) > 2.2 * half:
                tracks.append((Shape(colors[1], shapes[1], off[0], off[1], half, cell),
                               0.0, 1.0, still))
        question = _QUESTIONS[kind].format(color=colors[0], shape=shapes[0])
        answer = direction
    elif kind == "order":
        (ax, ay, ac), (bx, by, bc) = _cells(rng, 2, half)
        first = Shape(colors[0], shapes[0], ax, ay, half, ac)
        second = Shape(colors[1], shapes[1], bx, by, half, bc)
        tracks = [(first, 0.0, 0.5, still), (second, 0.5, 1.0, still)]
        question, answer = _QUESTIONS[kind], shapes[0]
    else:
        n = int(rng.integers(0, 4))
        drawn = ["square"] * n + [str(rng.choice(("circle", "triangle"))) for _ in range(3 - n)]
        drawn = [drawn[i] for i in rng.permutation(3)]
        edges = (0.0, 3 / 8, 6 / 8, 1.0)
        tracks = [(Shape(str(rng.choice(list(COLORS))), k, x, y, half, c), edges[i],
                   edges[i + 1], still)
                  for i, (k, (x, y, c)) in enumerate(zip(drawn, _cells(rng, 3, half)))]
        question, answer = _QUESTIONS[kind], NUMBERS[n]
    return MotionVideo(kind, bg, style, tuple(tracks), question, answer)


class SyntheticMotion:
    """Random-access synthetic motion videos (module docstring); kinds cycle with the index.

    Args:
      split: 'train' or 'heldout' (disjoint random streams).
      size: number of videos (one question each).
      raw_frames: frames per video (>= 2 * the frames a model samples).
      image_size: frame side in pixels.
      seed: base seed.
      variant: 'standard' or 'easy' (module docstring).
    """

    def __init__(self, split: str = "heldout", size: int = 96, *, raw_frames: int = 8,
                 image_size: int = 32, seed: int = 0, variant: str = "standard"):
        _check_variant(variant)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
        if size < 1 or raw_frames < 2 or image_size < 8:
            raise ValueError(f"need size >= 1, raw_frames >= 2, image_size >= 8; got {size}, "
                             f"{raw_frames}, {image_size}")
        self.split, self.size, self.raw_frames = split, size, raw_frames
        self.image_size, self.seed, self.variant = image_size, seed, variant

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"video {index} out of range for {self.size} videos")
        return np.random.default_rng([self.seed, SPLITS[self.split], index, stream])

    def video_id(self, index: int) -> str:
        return f"motion_{self.split}{index}"

    def video(self, index: int) -> MotionVideo:
        ks = kinds(self.variant)
        return sample_video(self._rng(index, 0), ks[index % len(ks)], self.variant)

    def frames(self, index: int) -> np.ndarray:
        """uint8[F, R, R, 3]; frame f shows time `frame_time(f, F)` = (f + 0.5) / F."""
        v = self.video(index)
        return np.stack([render(v.scene_at(frame_time(f, self.raw_frames)), self.image_size,
                                self._rng(index, 1)) for f in range(self.raw_frames)])


def frame_time(f: int, raw_frames: int) -> float:
    """The time in [0, 1) frame f of `raw_frames` shows: the middle of its slot, (f + 0.5) / F.

    Symmetric under time reversal (frame F-1-f shows 1 - t), so a 'direction' video and its
    reversal visit the same positions (frame f / F would end a slot early: the mover's mean
    position would lean towards where it comes from by travel / (2F)). The official
    segment-middle test sampling (`data.video.frame_indices`, frames 0, 2, 4, 6 of 8) is itself
    not symmetric: it sees the mover travel / (2T) nearer its start on average.
    """
    return (f + 0.5) / raw_frames


def write_motion_files(directory: str, size: int = 96, *, split: str = "heldout",
                       raw_frames: int = 8, image_size: int = 32, seed: int = 0,
                       variant: str = "standard") -> dict:
    """Write `size` videos of `split` (of `variant`) and their questions under `directory`.

    Returns:
      {'frames_root': folder of the frame folders, 'msrvtt_qa': the jsonl, 'kinds': the kind
       of each line}.
    """
    ds = SyntheticMotion(split, size, raw_frames=raw_frames, image_size=image_size, seed=seed,
                         variant=variant)
    root = os.path.join(directory, "frames")
    rows, kinds = [], []
    for i in range(size):
        vid, v = ds.video_id(i), ds.video(i)
        folder = os.path.join(root, vid)
        os.makedirs(folder, exist_ok=True)
        for f, img in enumerate(ds.frames(i)):
            Image.fromarray(img).save(os.path.join(folder, f"frame_{f:04d}.png"))
        rows.append({"video_id": vid, "question": v.question, "answer": v.answer})
        kinds.append(v.kind)
    path = os.path.join(directory, "msrvtt_qa.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return {"frames_root": root, "msrvtt_qa": path, "kinds": kinds}
