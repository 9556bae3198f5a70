"""Built-in synthetic NLVR2: pairs of shapes scenes with true / false statements about them.

Scenes and rendering are `mplug_jax.data.synthetic.shapes`'s (1-3 coloured shapes on a white, gray or
black background). Each record is a pair (left, right) and one statement of a `KINDS` kind:

  more        "the left image has more circles than the right image" (or fewer; the shape is
              present in at least one of the two images)
  both        "both images contain a red square"
  side        "the right image contains a blue triangle"
  background  "the left image has a black background"
  same_bg     "both images have a gray background"

Labels are balanced per kind: the kind and the target label are drawn first, then scene pairs
are drawn until one admits a statement of that kind with that truth value, and the statement
is chosen uniformly among those. So neither the kind nor the words of a statement predict its
label (a text-only model stays at 50%); the images have to be read. Every statement names the
left / right image, so the official left <-> right swap keeps its label.

Records are a pure function of (seed, split, index); `write_nlvr2_files` writes a split in the
official NLVR2 json format (docs/official-formats.md#nlvr2: `images` = two paths relative to the
image root, `sentence`, `label` "True" / "False") with PNG files, so `formats.nlvr2.read` reads it
like the real data. Train images live directly under `train/` (the reader rewrites any path
containing "train" to `train/<basename>`, the official flattening).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from mplug_jax.data.synthetic.shapes import (BACKGROUNDS, COLORS, PLURALS, SHAPES, SPLITS, Scene,
                                             _article, _sample_scene, render)

KINDS = ("more", "both", "side", "background", "same_bg")
SIDES = ("left", "right")
_MAX_DRAWS = 1000  # scene pairs tried per record (a kind/label needs ~1-10 on average)


def _has(scene: Scene, color: str, shape: str) -> bool:
    return any(s.color == color and s.shape == shape for s in scene.shapes)


def _count(scene: Scene, shape: str) -> int:
    return sum(s.shape == shape for s in scene.shapes)


def statements(kind: str, left: Scene, right: Scene) -> list[tuple[str, bool]]:
    """Every (statement, truth) of `kind` about the pair (left, right)."""
    pair = dict(zip(SIDES, (left, right)))
    out = []
    if kind == "more":
        for shape in SHAPES:
            n = {side: _count(sc, shape) for side, sc in pair.items()}
            if not any(n.values()):
                continue
            for a, b in (SIDES, SIDES[::-1]):
                out.append((f"the {a} image has more {PLURALS[shape]} than the {b} image",
                            n[a] > n[b]))
                out.append((f"the {a} image has fewer {PLURALS[shape]} than the {b} image",
                            n[a] < n[b]))
    elif kind in ("both", "side"):
        for color in COLORS:
            for shape in SHAPES:
                obj = f"{_article(color)} {color} {shape}"
                if kind == "both":
                    out.append((f"both images contain {obj}",
                                _has(left, color, shape) and _has(right, color, shape)))
                else:
                    out += [(f"the {side} image contains {obj}", _has(sc, color, shape))
                            for side, sc in pair.items()]
    elif kind == "background":
        out = [(f"the {side} image has {_article(bg)} {bg} background", sc.background == bg)
               for side, sc in pair.items() for bg in BACKGROUNDS]
    elif kind == "same_bg":
        out = [(f"both images have {_article(bg)} {bg} background",
                left.background == bg == right.background) for bg in BACKGROUNDS]
    else:
        raise ValueError(f"unknown statement kind {kind!r}; valid: {KINDS}")
    return out


class SyntheticNLVR2:
    """Random-access synthetic NLVR2 records.

    Record: {'images': [uint8[S, S, 3], uint8[S, S, 3]] (left, right), 'sentence': str,
    'label': 'True' | 'False', 'kind': one of `KINDS`, 'id': int}.

    Args:
      split: 'train' or 'heldout' (disjoint random streams).
      size: number of records.
      image_size: side S of the rendered images.
      seed: record i uses ``default_rng([seed, split_id, i, stream])``.
    """

    def __init__(self, split: str = "train", size: int = 1000, *, image_size: int = 64,
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

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} records")
        rng = self._rng(index, 0)
        kind = KINDS[int(rng.integers(len(KINDS)))]
        target = bool(rng.random() < 0.5)
        for _ in range(_MAX_DRAWS):
            left, right = _sample_scene(rng), _sample_scene(rng)
            options = [s for s, truth in statements(kind, left, right) if truth == target]
            if options:
                break
        else:  # unreachable for the kinds above; guards against a future kind that is
            raise RuntimeError(f"no {target} statement of kind {kind!r} in {_MAX_DRAWS} pairs")
        sentence = options[int(rng.integers(len(options)))]
        return {"images": [render(left, self.image_size, self._rng(index, 1)),
                           render(right, self.image_size, self._rng(index, 2))],
                "sentence": sentence, "label": str(target), "kind": kind, "id": index}

    def __repr__(self) -> str:
        return (f"SyntheticNLVR2(split={self.split!r}, size={self.size}, "
                f"image_size={self.image_size}, seed={self.seed})")


def write_nlvr2_files(directory: str, split: str = "heldout", size: int = 64, *,
                      image_size: int = 64, seed: int = 0) -> dict[str, str]:
    """Write a `SyntheticNLVR2` split as the official NLVR2 json `nlvr2_<split>.json` plus PNG
    images under `<directory>/<split>/` (paths in the json relative to `directory`, the
    official `image_root`).

    Returns {'root': directory, 'json': path of the json}.
    """
    ds = SyntheticNLVR2(split, size, image_size=image_size, seed=seed)
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    records = []
    for i in range(len(ds)):
        r = ds[i]
        names = [f"{split}/{split}-{i:06d}-img{k}.png" for k in range(2)]
        for name, img in zip(names, r["images"]):
            Image.fromarray(img).save(os.path.join(directory, name), compress_level=1)
        records.append({"images": names, "sentence": r["sentence"], "label": r["label"],
                        "identifier": f"{split}-{i}", "kind": r["kind"]})
    path = os.path.join(directory, f"nlvr2_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return {"root": directory, "json": path}


def cached_files(split: str, size: int, *, image_size: int, seed: int = 0,
                 cache_dir: str = "") -> dict[str, str]:
    """`write_nlvr2_files` once per (split, size, image_size, seed) under `cache_dir` (default:
    the system temp dir); later calls (other processes too) reuse the files. The split is
    written to a private directory and renamed into place, so a reader never sees half of it.
    """
    root = cache_dir or os.path.join(tempfile.gettempdir(), "mplug_jax_synthetic_nlvr2")
    target = os.path.join(root, f"{split}_n{size}_r{image_size}_s{seed}")
    paths = {"root": target, "json": os.path.join(target, f"nlvr2_{split}.json")}
    if os.path.isfile(paths["json"]):
        return paths
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=root)
    write_nlvr2_files(tmp, split, size, image_size=image_size, seed=seed)
    try:
        os.rename(tmp, target)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(paths["json"]):
            raise
    return paths
