"""Built-in synthetic grounding data: referring expressions with boxes over the shapes scenes,
written in the official TransVG / RefCOCO layout (docs/official-formats.md#refcoco-grounding), so
the reader of real split files (`formats.grounding.read`) serves it unchanged.

Scenes are the shapes scenes of `data.synthetic` (colours, shapes, backgrounds, repeated
kinds) on a configurable layout (`layout`: `input.synthetic` in the configs): by default that
of `synthetic._sample_scene` (1-3 shapes in a 3x3 grid, box side 0.52-0.72 of a cell), the
scene rendered at S px and pasted at a random offset on a wider or taller canvas (up to 1.5 S
on one side, filled with the background level), so the aspect-preserving resize and the
padding are exercised. A coarse layout (e.g. a 2x2 grid, shapes filling 75-90% of their cell,
square canvas) makes the box a function of which cell the referent is in, which a tiny model
with a 2x2 patch grid can learn in a few hundred steps. Each
record refers to one object with an expression that picks it out uniquely, e.g. "the red
square", "the circle", "the green object", "the triangle on the left", "the blue square left
of the circle"; objects with no unique expression are never the referent.

Layout under `root`: `images/<split>_<i>.png` and `shapes/shapes_<split>.json`, a JSON list of
the official COCO-style tuples `[file, index, [x, y, w, h] pixels, phrase, []]` (torch-saved
`.pth` lists of tuples hold the same).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from mplug_jax.data.synthetic.shapes import (BACKGROUND_STYLES, BACKGROUNDS, COLORS, SHAPES,
                                             Scene, Shape, render)
from mplug_jax.data.synthetic.shapes import SPLITS as _SHAPES_SPLITS

NAME = "shapes"
# The shapes splits plus 'test' (the test split a second-stage preset evaluates on its best
# checkpoint, configs/grounding.py:tiny_finetune); the number seeds each split's stream.
SPLITS = {**_SHAPES_SPLITS, "test": 2}
_RELATIONS = {"left of": lambda a, b: a.cell[1] < b.cell[1],
              "right of": lambda a, b: a.cell[1] > b.cell[1],
              "above": lambda a, b: a.cell[0] < b.cell[0],
              "below": lambda a, b: a.cell[0] > b.cell[0]}
# (phrase suffix, key to minimise): the referent is the strict extreme of its kind.
_EXTREMES = (("on the left", lambda s: s.cell[1]), ("on the right", lambda s: -s.cell[1]),
             ("at the top", lambda s: s.cell[0]), ("at the bottom", lambda s: -s.cell[0]))


def _unique_names(shapes: tuple[Shape, ...], i: int) -> list[str]:
    """Names of object i that no other object of the scene shares."""
    s, others = shapes[i], [o for j, o in enumerate(shapes) if j != i]
    out = []
    if not any((o.color, o.shape) == (s.color, s.shape) for o in others):
        out.append(f"the {s.color} {s.shape}")
    if not any(o.shape == s.shape for o in others):
        out.append(f"the {s.shape}")
    if not any(o.color == s.color for o in others):
        out.append(f"the {s.color} object")
    return out


def referring_expressions(scene: Scene) -> list[tuple[int, str]]:
    """Every (object index, expression) whose expression refers to that object only."""
    shapes = scene.shapes
    out = [(i, name) for i in range(len(shapes)) for name in _unique_names(shapes, i)]
    for i, s in enumerate(shapes):
        same_shape = [o for j, o in enumerate(shapes) if j != i and o.shape == s.shape]
        same_kind = [o for o in same_shape if o.color == s.color]
        for suffix, key in _EXTREMES:
            if same_shape and all(key(s) < key(o) for o in same_shape):
                out.append((i, f"the {s.shape} {suffix}"))
            elif same_kind and all(key(s) < key(o) for o in same_kind):
                out.append((i, f"the {s.color} {s.shape} {suffix}"))
        for j, landmark in enumerate(shapes):
            names = _unique_names(shapes, j) if j != i else []
            if not names:
                continue
            for rel, holds in _RELATIONS.items():
                rivals = [o for k, o in enumerate(shapes) if k not in (i, j)
                          and (o.color, o.shape) == (s.color, s.shape)]
                if holds(s, landmark) and not any(holds(o, landmark) for o in rivals):
                    out.append((i, f"the {s.color} {s.shape} {rel} {names[0]}"))
    return out


# The layout of `synthetic._sample_scene` (3x3 grid, box side 0.52-0.72 of a cell, centre
# jitter +-0.08 cell, canvas widened or heightened by up to half a side, 1-3 objects).
DEFAULT_LAYOUT = dict(grid=3, fill=(0.52, 0.72), jitter=0.08, max_extra=0.5, max_objects=3,
                      styles=",".join(BACKGROUND_STYLES))


def layout(options=None) -> dict:
    """`DEFAULT_LAYOUT` updated with `options` (a dict or ConfigDict, e.g. `input.synthetic`),
    checked. Keys: grid (cells per side), fill ((lo, hi) box side / cell side), jitter (max
    centre offset / cell side), max_extra (max canvas widening / scene side; 0 = square
    images), max_objects (1..3 objects per scene, at most grid^2), styles (the background
    styles drawn from, comma-separated: solid, gradient, noise)."""
    opts = dict(options or {})
    unknown = set(opts) - set(DEFAULT_LAYOUT)
    if unknown:
        raise ValueError(f"unknown synthetic grounding layout keys {sorted(unknown)}; valid: "
                         f"{sorted(DEFAULT_LAYOUT)}")
    out = {**DEFAULT_LAYOUT, **opts}
    grid, max_objects = int(out["grid"]), int(out["max_objects"])
    lo, hi = (float(v) for v in out["fill"])
    jitter, extra = float(out["jitter"]), float(out["max_extra"])
    if grid < 1:
        raise ValueError(f"synthetic grounding grid must be >= 1, got {grid}")
    if not 1 <= max_objects <= min(3, grid * grid):
        raise ValueError(f"max_objects must be in 1..{min(3, grid * grid)} for a {grid}x{grid} "
                         f"grid, got {max_objects}")
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"fill must be (lo, hi) with 0 < lo <= hi <= 1, got {out['fill']}")
    if jitter < 0 or hi / 2 + jitter > 0.5:
        raise ValueError(f"jitter must be >= 0 and keep the shape in its cell (fill hi / 2 + "
                         f"jitter <= 0.5), got jitter {jitter} with fill hi {hi}")
    if extra < 0:
        raise ValueError(f"max_extra must be >= 0, got {extra}")
    styles = [v.strip() for v in str(out["styles"]).split(",") if v.strip()]
    if not styles or set(styles) - set(BACKGROUND_STYLES):
        raise ValueError(f"styles must be a comma-separated subset of {BACKGROUND_STYLES}, got "
                         f"{out['styles']!r}")
    return dict(grid=grid, fill=(lo, hi), jitter=jitter, max_extra=extra,
                max_objects=max_objects, styles=",".join(styles))


def sample_scene(rng: np.random.Generator, lay: dict) -> Scene:
    """A shapes scene (as `synthetic._sample_scene`: same colours, shapes, backgrounds and
    repeated kinds) on the grid of a checked `layout`."""
    grid = lay["grid"]
    n = int(rng.integers(1, lay["max_objects"] + 1))
    cells = rng.choice(grid * grid, size=n, replace=False)
    kinds = [(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))) for _ in range(n)]
    # Repeated kinds make the positional and relational expressions necessary.
    if n >= 2 and rng.random() < 0.4:
        kinds[1] = kinds[0]
        if n == 3 and rng.random() < 0.5:
            kinds[2] = kinds[0]
    step = 1.0 / grid
    shapes = []
    for (color, shape), cell in zip(kinds, cells):
        row, col = divmod(int(cell), grid)
        jx, jy = rng.uniform(-lay["jitter"], lay["jitter"], size=2) * step
        half = float(rng.uniform(*lay["fill"])) * step / 2
        shapes.append(Shape(color, shape, (col + 0.5) * step + float(jx),
                            (row + 0.5) * step + float(jy), half, (row, col)))
    return Scene(str(rng.choice(list(BACKGROUNDS))), str(rng.choice(lay["styles"].split(","))),
                 tuple(shapes))


def sample_with_scene(split: str, index: int, image_size: int = 64, seed: int = 0,
                      options=None) -> tuple[np.ndarray, list[float], str, Scene, int]:
    """`sample` plus the scene and the referent's index in `scene.shapes`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
    lay = layout(options)
    rng = np.random.default_rng([seed, SPLITS[split], index, 11])
    while True:
        scene = sample_scene(rng, lay)
        exprs = referring_expressions(scene)
        if exprs:
            break
    obj, phrase = exprs[int(rng.integers(len(exprs)))]
    s = image_size
    tile = render(scene, s, rng)
    extra = int(rng.integers(0, int(s * lay["max_extra"]) + 1))
    wide = bool(rng.random() < 0.5)
    w, h = (s + extra, s) if wide else (s, s + extra)
    ox, oy = (int(rng.integers(0, extra + 1)), 0) if wide else (0, int(rng.integers(0, extra + 1)))
    canvas = np.full((h, w, 3), BACKGROUNDS[scene.background], np.uint8)
    canvas[oy:oy + s, ox:ox + s] = tile
    sh = scene.shapes[obj]
    box = [ox + (sh.cx - sh.half) * s, oy + (sh.cy - sh.half) * s, 2 * sh.half * s,
           2 * sh.half * s]
    return canvas, [round(float(v), 2) for v in box], phrase, scene, obj


def sample(split: str, index: int, image_size: int = 64, seed: int = 0, options=None
           ) -> tuple[np.ndarray, list[float], str]:
    """Record `index` of `split`: (uint8[H, W, 3] image, [x, y, w, h] pixel box, phrase);
    a pure function of (seed, split, index, layout `options`)."""
    return sample_with_scene(split, index, image_size, seed, options)[:3]


def split_file(root: str, split: str) -> str:
    """Path of a split's json under `root` (official `<split_root>/<name>/<name>_<split>`)."""
    return os.path.join(root, NAME, f"{NAME}_{split}.json")


def write_split(root: str, split: str, size: int, *, image_size: int = 64,
                seed: int = 0, options=None) -> str:
    """Write `size` records of `split` (PNG images + the json split file) with layout
    `options` (see `layout`); returns the split file path. Skipped when a complete copy with
    the same settings is already there."""
    path = split_file(root, split)
    marker = path + ".done"
    lay = layout(options)
    stamp = json.dumps({"size": size, "image_size": image_size, "seed": seed,
                        "layout": {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in lay.items()}})
    if os.path.isfile(marker) and open(marker).read() == stamp:
        return path
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = []
    for i in range(size):
        img, box, phrase = sample(split, i, image_size, seed, lay)
        name = f"{split}_{i:06d}.png"
        Image.fromarray(img).save(os.path.join(root, "images", name))
        rows.append([name, i, box, phrase, []])
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    os.replace(tmp, path)
    with open(marker, "w") as f:
        f.write(stamp)
    return path
