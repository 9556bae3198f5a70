"""Built-in synthetic retrieval data: shapes scenes written as ALBEF-format json + image files.

The same reader (`formats.retrieval.read`, via `retrieval_input`) then serves real COCO / Flickr30k
files and this data. Layout of `write_files(directory, ...)`:

  directory/images/{train,val,test}_{i:06d}.png    rendered scenes (`synthetic.render`)
  directory/retrieval_train.json   [{"image", "caption", "image_id"}], one record per caption
  directory/retrieval_val.json     [{"image", "caption": [captions]}], one record per image
  directory/retrieval_test.json    same, other scenes
  directory/DONE                   written last (a complete set)

Train scenes come from the `train` stream of `synthetic.SyntheticShapes`, val and test from
its `heldout` stream (val: the first `eval_images`, test: the next `eval_images`), so no
evaluation scene is a training scene. Each image gets `captions_per_image` captions, drawn
with `synthetic.caption` from their own generators (they may repeat for simple scenes).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from mplug_jax.data.synthetic.shapes import SPLITS, SyntheticShapes, caption

SPLIT_FILES = {s: f"retrieval_{s}.json" for s in ("train", "val", "test")}
_CAPTION_STREAM = 2000  # far from the streams synthetic.py and caption_input use


def captions_of(shapes: SyntheticShapes, i: int, n: int) -> list[str]:
    """The `n` captions of image `i` of `shapes`."""
    scene = shapes.scene(i)
    return [caption(scene, np.random.default_rng(
        [shapes.seed, SPLITS[shapes.split], i, _CAPTION_STREAM + j])) for j in range(n)]


def write_files(directory: str, *, train_images: int, eval_images: int,
                captions_per_image: int = 2, image_size: int = 64, seed: int = 0) -> dict:
    """Write the set (module docstring) unless `directory/DONE` exists; returns
    {'train', 'val', 'test': json paths, 'image_root': directory}.

    Written to a temporary sibling first and renamed, so concurrent writers and interrupted
    runs never leave a partial set behind."""
    if min(train_images, eval_images, captions_per_image) < 1:
        raise ValueError(f"need >= 1 train image, eval image and caption per image, got "
                         f"{train_images} / {eval_images} / {captions_per_image}")
    out = {s: os.path.join(directory, f) for s, f in SPLIT_FILES.items()}
    out["image_root"] = directory
    if os.path.isfile(os.path.join(directory, "DONE")):
        return out
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_retrieval_", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "images"))
        train = SyntheticShapes("train", train_images, image_size=image_size, seed=seed)
        held = SyntheticShapes("heldout", 2 * eval_images, image_size=image_size, seed=seed)
        rows: dict[str, list] = {"train": [], "val": [], "test": []}
        for split, shapes, indices in (("train", train, range(train_images)),
                                       ("val", held, range(eval_images)),
                                       ("test", held, range(eval_images, 2 * eval_images))):
            for n, i in enumerate(indices):
                rel = f"images/{split}_{n:06d}.png"
                Image.fromarray(shapes[i]["image"]).save(os.path.join(tmp, rel))
                caps = captions_of(shapes, i, captions_per_image)
                if split == "train":
                    rows[split] += [{"image": rel, "caption": c, "image_id": f"{split}_{n}"}
                                    for c in caps]
                else:
                    rows[split].append({"image": rel, "caption": caps})
        for split, name in SPLIT_FILES.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(rows[split], f)
        open(os.path.join(tmp, "DONE"), "w").close()
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished first (directory exists and is not empty)
            if not os.path.isfile(os.path.join(directory, "DONE")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
