"""Built-in synthetic SNLI-VE: (image premise, text premise, text hypothesis, 3-way label) over
the shapes scenes of `mplug_jax.data.synthetic.shapes`, written as both official formats:
`ve_<split>.json` (ALBEF, docs/official-formats.md#snli-ve) = [{"image": id, "sentence": str,
"label": "entailment"|"neutral"|"contradiction"}] and `snli_ve_<split>.jsonl` (the original
release, `formats.snli_ve_jsonl`) = one {"sentence1": premise, "sentence2": hypothesis,
"Flikr30kID": "<id>.jpg", "gold_label"} per line, plus the `<id>.jpg` images, so the readers of
real data serve synthetic data alike.

Why three genuinely image-dependent classes: a scene may carry a *cover*, a striped box over
one empty grid cell that could hide a shape. A hypothesis names one (colour, shape) object in
one of three forms:
  positive  "there is a red circle"        visible: entailment; absent, no cover: contradiction;
                                            absent but a cover: neutral (it may be underneath);
  negative  "there is no red circle"       visible: contradiction; absent, no cover: entailment;
                                            absent but a cover: neutral;
  unknowable "the red circle is made of wood" (a property no image shows): visible: neutral;
                                            absent, no cover: contradiction (SNLI convention for
                                            claims about things not there); absent, cover: neutral.
The same sentence gets any of its labels depending on the image, so a hypothesis-only model
cannot solve it (`hypothesis_only_accuracy` measures how far it gets). Labels are drawn
uniformly first (a balanced set), then a form allowed for the label, then scene facts that
make it true: the object (present or a colour-shape pair absent from the scene) and whether
the scene has a cover.

The text premise (jsonl only; drawn from a stream of its own, so the image, hypothesis and
json label above are what they were before premises existed) is what the hypothesis was written
from, as in SNLI: a sentence about the hypothesis's object saying whether it is there, including
what the image cannot show, namely what the cover hides:
  visible                      "a drawing with a red circle"
  absent, no cover             "a drawing with no red circle"
  absent, cover, hidden (1/2)  "the striped box hides a red circle"
  absent, cover, not hidden    "the striped box hides no red circle"
With the premise the cover leaves no doubt: the jsonl label is `label_of(form, visible or
hidden, cover=False)`, so a covered scene's absent object is entailed or contradicted, never
neutral. The two labels differ only there (about a fifth of the records): a model that sees
the image and the hypothesis but not the premise cannot know them (`best_guess_accuracy` with
`visible` and `cover` as features: what a perfect image reader reaches without the premise).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from mplug_jax.data.formats.snli_ve import LABELS as SNLI_VE_LABELS
from mplug_jax.data.synthetic.shapes import (COLORS, GRID, SHAPES, Scene, _article, _sample_scene,
                                             render)

LABELS = tuple(sorted(SNLI_VE_LABELS, key=SNLI_VE_LABELS.get))  # index = official class id
SPLITS = {"train": 0, "val": 1, "test": 2}  # disjoint random streams
FORMS = ("positive", "negative", "unknowable")
_TEMPLATES = {
    "positive": ("there is {a} {c} {s}", "the image shows {a} {c} {s}",
                 "{a} {c} {s} is in the picture"),
    "negative": ("there is no {c} {s}", "the image shows no {c} {s}",
                 "no {c} {s} is in the picture"),
    "unknowable": ("the {c} {s} was drawn yesterday", "the {c} {s} is made of wood",
                   "the {c} {s} is heavy", "someone painted the {c} {s} by hand"),
}
# Forms that can carry each label (positive/negative claims are never neutral about a visible
# object; an unknowable property is never entailed).
_FORMS_OF = {"entailment": ("positive", "negative"),
             "contradiction": ("positive", "negative", "unknowable"),
             "neutral": ("positive", "negative", "unknowable")}
_PREMISE_TEMPLATES = {"with": "a drawing with {a} {c} {s}",
                      "without": "a drawing with no {c} {s}",
                      "hides": "the striped box hides {a} {c} {s}",
                      "hides_no": "the striped box hides no {c} {s}"}
_STREAM = 100  # generator streams of ours (synthetic.py uses 0-5 per record); premise: +1
_VERSION = 2  # bump when the generated content changes (the file cache is keyed by it)


def label_of(form: str, visible: bool, cover: bool) -> str:
    """The gold label of a hypothesis form about an object given what the image shows."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {FORMS}")
    if visible:
        return {"positive": "entailment", "negative": "contradiction",
                "unknowable": "neutral"}[form]
    if cover:
        return "neutral"
    return "entailment" if form == "negative" else "contradiction"


def draw_cover(image: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """uint8[S, S, 3] with a black-and-white striped box over grid `cell` (row, col), big
    enough to hide any shape drawn in that cell."""
    size = image.shape[0]
    step = size / GRID
    pad = 0.05 * step
    x0, y0 = cell[1] * step + pad, cell[0] * step + pad
    x1, y1 = x0 + step - 2 * pad, y0 + step - 2 * pad
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    draw.rectangle((x0, y0, x1, y1), fill=(245, 245, 245))
    stripe = max(round(size / 20), 2)  # survives JPEG and resizing at 32-64 px
    y = y0
    while y < y1:
        draw.rectangle((x0, y, x1, min(y + stripe - 1, y1)), fill=(15, 15, 15))
        y += 2 * stripe
    return np.asarray(img, dtype=np.uint8).copy()


def example(split: str, index: int, *, image_size: int = 64, seed: int = 0) -> dict:
    """Record `index` of `split` (a pure function of its arguments): {'image': uint8[S, S, 3],
    'sentence' (hypothesis), 'label' (name; without the premise), 'form', 'visible', 'cover',
    'premise', 'premise_label' (name; with the premise), 'hidden' (the cover hides the
    hypothesis's object)}."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], int(index), _STREAM])
    scene: Scene = _sample_scene(rng)
    label = LABELS[int(rng.integers(3))]
    forms = _FORMS_OF[label]
    form = forms[int(rng.integers(len(forms)))]
    # Facts that make (form, label) true; see the module docstring's table.
    if label == "neutral":
        visible = form == "unknowable" and rng.random() < 0.5
        cover = not visible or rng.random() < 0.5
    else:
        visible = form == ("positive" if label == "entailment" else "negative")
        cover = visible and rng.random() < 0.5
    present = sorted({(s.color, s.shape) for s in scene.shapes})
    if visible:
        color, shape = present[int(rng.integers(len(present)))]
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = absent[int(rng.integers(len(absent)))]
    assert label_of(form, visible, cover) == label
    image = render(scene, image_size, rng)
    if cover:
        used = {s.cell for s in scene.shapes}
        free = [divmod(i, GRID) for i in range(GRID * GRID) if divmod(i, GRID) not in used]
        image = draw_cover(image, free[int(rng.integers(len(free)))])
    templates = _TEMPLATES[form]
    sentence = templates[int(rng.integers(len(templates)))].format(
        a=_article(color), c=color, s=shape)
    premise, hidden = _premise(np.random.default_rng([seed, SPLITS[split], int(index),
                                                      _STREAM + 1]),
                               (color, shape), visible=visible, cover=cover)
    return {"image": image, "sentence": sentence, "label": label, "form": form,
            "visible": bool(visible), "cover": bool(cover), "premise": premise,
            "hidden": hidden, "premise_label": label_of(form, visible or hidden, False)}


def _premise(rng: np.random.Generator, obj: tuple[str, str], *, visible: bool,
             cover: bool) -> tuple[str, bool]:
    """(premise sentence about the hypothesis's object `obj`, whether the cover hides it); see
    the module docstring. An absent `obj` in a covered scene is hidden with probability 1/2."""
    c, s = obj
    hidden = cover and not visible and rng.random() < 0.5
    if visible:
        key = "with"
    elif cover:
        key = "hides" if hidden else "hides_no"
    else:
        key = "without"
    return _PREMISE_TEMPLATES[key].format(a=_article(c), c=c, s=s), bool(hidden)


def image_id(split: str, index: int) -> str:
    """The `image` field of record `index` (official: a Flickr30k id, file `<id>.jpg`)."""
    return f"synth_{split}_{index:07d}"


def write_files(directory: str, split: str, size: int, *, image_size: int = 64,
                seed: int = 0) -> dict[str, str]:
    """Write `size` records of `split` under `directory`: images `images/<id>.jpg`, the ALBEF
    annotation `ve_<split>.json` (hypothesis, label without the premise) and the original
    `snli_ve_<split>.jsonl` (premise, hypothesis, label with the premise). Returns
    {'annotation' (the json), 'original' (the jsonl), 'image_root'}."""
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    records, lines = [], []
    for i in range(size):
        ex = example(split, i, image_size=image_size, seed=seed)
        name = image_id(split, i)
        Image.fromarray(ex["image"]).save(os.path.join(images, f"{name}.jpg"), quality=95)
        records.append({"image": name, "sentence": ex["sentence"], "label": ex["label"]})
        lines.append(json.dumps({"sentence1": ex["premise"], "sentence2": ex["sentence"],
                                 "Flikr30kID": f"{name}.jpg",
                                 "gold_label": ex["premise_label"], "pairID": f"{name}#0"}))
    paths = _paths(directory, split)
    with open(paths["annotation"], "w", encoding="utf-8") as f:
        json.dump(records, f)
    with open(paths["original"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return paths


def _paths(directory: str, split: str) -> dict[str, str]:
    return {"annotation": os.path.join(directory, f"ve_{split}.json"),
            "original": os.path.join(directory, f"snli_ve_{split}.jsonl"),
            "image_root": os.path.join(directory, "images")}


def ensure_files(root: str, split: str, size: int, *, image_size: int = 64,
                 seed: int = 0) -> dict[str, str]:
    """`write_files` (same keys) into a cache folder under `root` named by the arguments,
    written once: later calls (other runs, other processes) reuse it. The folder appears
    atomically (written elsewhere, then renamed), so a crashed or concurrent writer never leaves
    half a split."""
    if size < 1:
        raise ValueError(f"synthetic SNLI-VE {split} size must be >= 1, got {size}")
    final = os.path.join(root, f"{split}_n{size}_r{image_size}_s{seed}_v{_VERSION}")
    paths = _paths(final, split)
    if os.path.isfile(paths["annotation"]):
        return paths
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}_", dir=root)
    try:
        write_files(tmp, split, size, image_size=image_size, seed=seed)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy (same content)
            if not os.path.isfile(paths["annotation"]):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def template(sentence: str) -> str:
    """`sentence` with its colour, shape and article words removed."""
    words = set(COLORS) | set(SHAPES) | {"a", "an"}
    return " ".join(w for w in sentence.split() if w not in words)


def best_guess_accuracy(train: list[dict], heldout: list[dict], features=("sentence",),
                        label: str = "label") -> float:
    """Accuracy on `heldout` of the best guess of `label` per value of `features` (text fields
    reduced to their `template`), learned on `train`: what a model that knows only those
    features can reach at most on this data. Records: `example`'s dicts."""
    def key(r):
        return tuple(template(r[f]) if isinstance(r[f], str) else r[f] for f in features)

    counts: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in train:
        counts[key(r)][r[label]] += 1
    overall = collections.Counter(r[label] for r in train).most_common(1)[0][0]
    hits = 0
    for r in heldout:
        c = counts.get(key(r))
        hits += (c.most_common(1)[0][0] if c else overall) == r[label]
    return hits / max(len(heldout), 1)


def hypothesis_only_accuracy(train: list[dict], heldout: list[dict]) -> float:
    """Accuracy on `heldout` of the best blind guess per hypothesis template, learned on
    `train`: what a model that ignores the image can reach at most. Records: {'sentence',
    'label'}."""
    return best_guess_accuracy(train, heldout, ("sentence",), "label")
