"""Built-in synthetic image-text dataset of coloured shapes (no files, no downloads).

Each record is drawn from ``np.random.default_rng([seed, split, index])``, so any record can be
regenerated on its own (random access) and the ``train`` and ``heldout`` splits come from disjoint
random streams. A scene holds 1-3 shapes (circle / square / triangle, six saturated colours) in
distinct cells of a 3x3 grid over a white, gray or black background (solid, gradient or light
noise). Captions name colours, shapes, counts, the background and, for two-object scenes, the
spatial relation; questions ask for a colour, a shape, a count or a yes/no presence check. Every
word is a single bert-base-uncased token, so a tiny model can learn the mapping.

Record: ``{'image': uint8[H, W, 3], 'caption': str, 'question': str, 'answer': str, 'id': int}``.

`SyntheticVQA` gives the same scenes as VQA records in the official mPLUG VQA json format
(docs/official-formats.md#vqa) plus the VQA v2 `answer_type`: questions about colour, shape, count,
horizontal position and presence, each with 10 simulated annotator answers that mostly agree
(a minority gives a neighbouring count, a confusable colour, a near-synonym shape, the
neighbouring column or the opposite yes/no). `write_vqa_files` writes a split as image files,
the official json and a VQA v2 annotation file for scoring.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
BACKGROUNDS: dict[str, int] = {"white": 235, "gray": 128, "black": 25}
BACKGROUND_STYLES = ("solid", "gradient", "noise")
NUMBERS = ("zero", "one", "two", "three")
SPLITS = {"train": 0, "heldout": 1}
GRID = 3

_TEMPLATES = ("{objs} on a {bg} background", "there {be} {objs}", "an image of {objs}", "{objs}")
_REL_TEMPLATES = ("{a} {rel} {b}", "{a} {rel} {b} on a {bg} background")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn object: centre and half-size as fractions of the image side."""

    color: str
    shape: str
    cx: float
    cy: float
    half: float
    cell: tuple[int, int]  # (row, col) in the GRID x GRID layout


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything a record is generated from (returned by `SyntheticShapes.scene`)."""

    background: str
    style: str
    shapes: tuple[Shape, ...]


def vocabulary() -> list[str]:
    """Every word that can appear in a caption, question or answer."""
    words = {"a", "an", "and", "of", "on", "background", "there", "is", "are", "image", "left",
             "right", "above", "below", "what", "color", "shape", "object", "how", "many",
             "the", "yes", "no"}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(BACKGROUNDS) | set(NUMBERS)
    return sorted(words)


def _sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = [(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))) for _ in range(n)]
    # Make repeated objects common enough that counting is learnable.
    if n >= 2 and rng.random() < 0.4:
        kinds[1] = kinds[0]
        if n == 3 and rng.random() < 0.5:
            kinds[2] = kinds[0]
    step = 1.0 / GRID
    shapes = []
    for (color, shape), cell in zip(kinds, cells):
        row, col = divmod(int(cell), GRID)
        jx, jy = rng.uniform(-0.08, 0.08, size=2) * step
        half = float(rng.uniform(0.26, 0.36)) * step
        shapes.append(Shape(color, shape, (col + 0.5) * step + float(jx),
                            (row + 0.5) * step + float(jy), half, (row, col)))
    return Scene(str(rng.choice(list(BACKGROUNDS))), str(rng.choice(BACKGROUND_STYLES)),
                 tuple(shapes))


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene as uint8[size, size, 3]."""
    base = BACKGROUNDS[scene.background]
    if scene.style == "gradient":
        ramp = np.linspace(-30.0, 30.0, size)
        field = base + (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])
        field = np.broadcast_to(field, (size, size))
    elif scene.style == "noise":
        field = base + rng.normal(0.0, 8.0, size=(size, size))
    else:
        field = np.full((size, size), float(base))
    bg = np.clip(field, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.repeat(bg[:, :, None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, h = s.cx * size, s.cy * size, s.half * size
        box = (cx - h, cy - h, cx + h, cy + h)
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    return np.asarray(img, dtype=np.uint8).copy()


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(color, shape, count) per distinct kind, in order of first appearance."""
    counts: dict[tuple[str, str], int] = {}
    for s in scene.shapes:
        counts[(s.color, s.shape)] = counts.get((s.color, s.shape), 0) + 1
    return [(c, sh, n) for (c, sh), n in counts.items()]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(color: str, shape: str, n: int) -> str:
    if n == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{NUMBERS[n]} {color} {PLURALS[shape]}"


def _relation(a: Shape, b: Shape) -> str:
    """Spatial relation of `a` to `b`; distinct grid cells make it unambiguous."""
    if a.cell[1] != b.cell[1]:
        return "left of" if a.cell[1] < b.cell[1] else "right of"
    return "above" if a.cell[0] < b.cell[0] else "below"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of a scene (template chosen by `rng`)."""
    groups = _groups(scene)
    if len(scene.shapes) == 2 and len(groups) == 2 and rng.random() < 0.6:
        a, b = scene.shapes
        tpl = _REL_TEMPLATES[int(rng.integers(len(_REL_TEMPLATES)))]
        return tpl.format(a=_phrase(a.color, a.shape, 1), b=_phrase(b.color, b.shape, 1),
                          rel=_relation(a, b), bg=scene.background)
    parts = [_phrase(*g) for g in groups]
    objs = parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]
    tpl = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return tpl.format(objs=objs, bg=scene.background, be="is" if groups[0][2] == 1 else "are")


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A (question, one-word answer) pair about the scene."""
    shapes = [s.shape for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    kinds = []
    unique_shapes = [sh for sh in SHAPES if shapes.count(sh) >= 1
                     and len({c for c, s2 in zip(colors, shapes) if s2 == sh}) == 1]
    if unique_shapes:
        kinds.append("color")
    unique_colors = [c for c in COLORS if colors.count(c) >= 1
                     and len({s2 for c2, s2 in zip(colors, shapes) if c2 == c}) == 1]
    if unique_colors:
        kinds.append("shape")
    kinds += ["count", "exists"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "color":
        sh = unique_shapes[int(rng.integers(len(unique_shapes)))]
        return f"what color is the {sh}", colors[shapes.index(sh)]
    if kind == "shape":
        c = unique_colors[int(rng.integers(len(unique_colors)))]
        return f"what shape is the {c} object", shapes[colors.index(c)]
    if kind == "count":
        sh = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"how many {PLURALS[sh]} are there", NUMBERS[shapes.count(sh)]
    c, sh = str(rng.choice(list(COLORS))), SHAPES[int(rng.integers(len(SHAPES)))]
    if rng.random() < 0.5:  # ask about a present object half of the time
        c, sh = colors[0], shapes[0]
    present = any(s.color == c and s.shape == sh for s in scene.shapes)
    return f"is there {_article(c)} {c} {sh}", "yes" if present else "no"


class SyntheticShapes:
    """Random-access synthetic dataset; ``len(ds)`` records, each a pure function of its index.

    Args:
      split: 'train' or 'heldout' (disjoint random streams).
      size: number of records.
      image_size: side of the square uint8 images.
      seed: base seed; the record at `index` uses ``default_rng([seed, split_id, index])``.
    """

    def __init__(self, split: str = "train", size: int = 10_000, *, image_size: int = 64,
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
        if size < 0 or image_size < 8:
            raise ValueError(f"need size >= 0 and image_size >= 8, got {size}, {image_size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index, stream])

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} records")
        return index

    def scene(self, index: int) -> Scene:
        """The scene behind record `index` (for tests and debugging)."""
        return _sample_scene(self._rng(self._check(index), 0))

    def __getitem__(self, index: int) -> dict:
        index = self._check(index)
        scene = self.scene(index)
        question, answer = question_answer(scene, self._rng(index, 3))
        return {
            "image": render(scene, self.image_size, self._rng(index, 1)),
            "caption": caption(scene, self._rng(index, 2)),
            "question": question,
            "answer": answer,
            "id": index,
        }

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, size={self.size}, "
                f"image_size={self.image_size}, seed={self.seed})")


# ---- VQA --------------------------------------------------------------------------------------

VQA_KINDS = ("color", "shape", "count", "position", "exists")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "position": "other",
                "exists": "yes/no"}
COLUMNS = ("left", "middle", "right")
# What a minority of annotators answers instead (answers in VQA v2's normalised form: counts
# as digits, lower case), so the 10 answers disagree the way real ones do.
_CONFUSIONS = {
    "red": ("orange", "pink"), "orange": ("red", "yellow"), "yellow": ("orange", "gold"),
    "green": ("lime", "dark green"), "blue": ("purple", "navy"), "purple": ("violet", "blue"),
    "circle": ("oval", "ball"), "square": ("rectangle", "box"), "triangle": ("pyramid", "cone"),
    "left": ("middle", "left side"), "middle": ("center", "left", "right"),
    "right": ("middle", "right side"), "yes": ("no",), "no": ("yes",),
}
# How many of the 10 annotators disagree (0 most often; VQA v2 has ~60% unanimous answers).
_MINORITY = (0, 0, 0, 0, 0, 1, 1, 2, 3, 4)


def vqa_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, kind) about `scene`; the answer is in VQA v2's normalised form."""
    shapes = [s.shape for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    groups = _groups(scene)
    single = [(c, sh) for c, sh, n in groups if n == 1]
    unique_shapes = [sh for sh in SHAPES if len({c for c, s2 in zip(colors, shapes)
                                                  if s2 == sh}) == 1]
    unique_colors = [c for c in COLORS if len({s2 for c2, s2 in zip(colors, shapes)
                                                if c2 == c}) == 1]
    kinds = ["count", "exists"] + ["color"] * bool(unique_shapes) + \
        ["shape"] * bool(unique_colors) + ["position"] * bool(single)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "color":
        sh = unique_shapes[int(rng.integers(len(unique_shapes)))]
        return f"what color is the {sh}?", colors[shapes.index(sh)], kind
    if kind == "shape":
        c = unique_colors[int(rng.integers(len(unique_colors)))]
        return f"what shape is the {c} object?", shapes[colors.index(c)], kind
    if kind == "count":
        sh = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"how many {PLURALS[sh]} are there?", str(shapes.count(sh)), kind
    if kind == "position":
        c, sh = single[int(rng.integers(len(single)))]
        obj = next(s for s in scene.shapes if (s.color, s.shape) == (c, sh))
        return f"where is the {c} {sh}?", COLUMNS[obj.cell[1]], kind
    c, sh = str(rng.choice(list(COLORS))), SHAPES[int(rng.integers(len(SHAPES)))]
    if rng.random() < 0.5:  # ask about a present object half of the time
        c, sh = colors[0], shapes[0]
    present = any(s.color == c and s.shape == sh for s in scene.shapes)
    return f"is there {_article(c)} {c} {sh}?", "yes" if present else "no", kind


def annotator_answers(answer: str, kind: str, rng: np.random.Generator) -> list[str]:
    """10 simulated human answers: `answer` from the majority (at least 6), the rest a
    plausible mistake (a neighbouring count for counts, `_CONFUSIONS` otherwise)."""
    k = int(_MINORITY[int(rng.integers(len(_MINORITY)))])
    if kind == "count":
        n = int(answer)
        wrong = [str(n + 1)] + ([str(n - 1)] if n > 0 else [])
    else:
        wrong = list(_CONFUSIONS[answer])
    out = [answer] * (10 - k) + [wrong[int(rng.integers(len(wrong)))] for _ in range(k)]
    return [out[int(i)] for i in rng.permutation(10)]


def vqa_answer_vocabulary() -> list[str]:
    """Every answer (majority or minority) `SyntheticVQA` can produce (a candidate list)."""
    words = set(COLORS) | set(SHAPES) | set(COLUMNS) | {"yes", "no"}
    words |= {str(n) for n in range(GRID * GRID + 2)}
    for alts in _CONFUSIONS.values():
        words |= set(alts)
    return sorted(words)


class SyntheticVQA:
    """Random-access VQA records of the shapes scenes, in the official VQA json format.

    Record: {'question_id': int, 'question': str, 'image': uint8[H, W, 3], 'dataset': 'vqa',
    'answer': [10 str], 'answer_type': 'yes/no' | 'number' | 'other', 'kind': one of
    `VQA_KINDS`}. Scenes are those of `SyntheticShapes` with the same split, seed and index;
    question ids are ``split_id * 10**7 + index`` (distinct across the two splits).
    """

    def __init__(self, split: str = "train", size: int = 10_000, *, image_size: int = 64,
                 seed: int = 0):
        self.shapes = SyntheticShapes(split, size, image_size=image_size, seed=seed)
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = self.shapes._check(index)
        scene = self.shapes.scene(index)
        question, answer, kind = vqa_question(scene, self.shapes._rng(index, 4))
        return {
            "question_id": SPLITS[self.split] * 10**7 + index,
            "question": question,
            "image": render(scene, self.image_size, self.shapes._rng(index, 1)),
            "dataset": "vqa",
            "answer": annotator_answers(answer, kind, self.shapes._rng(index, 5)),
            "answer_type": ANSWER_TYPES[kind],
            "kind": kind,
        }

    def __repr__(self) -> str:
        return (f"SyntheticVQA(split={self.split!r}, size={self.size}, "
                f"image_size={self.image_size}, seed={self.seed})")


def vqa_v2_annotations(records) -> dict:
    """VQA v2 annotation file content for official-format records with 10 answers."""
    anns = []
    for r in records:
        answers = r["answer"]
        anns.append({
            "question_id": r["question_id"], "image_id": r["question_id"],
            "question_type": " ".join(r["question"].split()[:2]),
            "answer_type": r["answer_type"],
            "multiple_choice_answer": max(set(answers), key=answers.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)],
        })
    return {"annotations": anns}


def write_vqa_files(directory: str, split: str = "heldout", size: int = 64, *,
                    image_size: int = 64, seed: int = 0) -> dict[str, str]:
    """Write a `SyntheticVQA` split as real files: PNG images under `<directory>/images/`,
    the official VQA json `vqa_<split>.json` (image paths relative to `directory`, the
    `vqa_root`) and the VQA v2 annotations `vqa_<split>_annotations.json`.

    Returns {'root', 'json', 'annotations'} paths.
    """
    from PIL import Image
    ds = SyntheticVQA(split, size, image_size=image_size, seed=seed)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    records = []
    for i in range(len(ds)):
        r = ds[i]
        name = f"images/{split}_{i:06d}.png"
        Image.fromarray(r["image"]).save(os.path.join(directory, name))
        records.append({k: v for k, v in r.items() if k not in ("image", "kind")}
                       | {"image": name})
    paths = {"root": directory, "json": os.path.join(directory, f"vqa_{split}.json"),
             "annotations": os.path.join(directory, f"vqa_{split}_annotations.json")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(records, f)
    with open(paths["annotations"], "w", encoding="utf-8") as f:
        json.dump(vqa_v2_annotations(records), f)
    return paths
