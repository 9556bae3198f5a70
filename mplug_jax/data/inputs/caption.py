"""Caption fine-tuning input: Karpathy-split COCO (official files) or built-in synthetic shapes
captions in the same format, train batches with decoder targets, and eval records.

Datasets (`config.input.dataset`):
- 'karpathy': official `coco_caption_{train,test}_ocr.json`-style files
  (docs/official-formats.md#coco-caption) through `formats.coco_caption.read`, images under
  `input.coco_root`;
- 'synthetic': `SyntheticCaptions`, Karpathy-format entries of `mplug_jax.data.synthetic.shapes` scenes
  with `refs_per_image` references each (the scene's `caption(scene, rng)` drawn with
  different generators), images rendered on access.

Train records are one per reference sentence (official: ~5 per image); every record carries
`image_index`, the position of its image in the split, so SCST can look up all the references
of an image. Decoder targets follow the official caption dataset: `prompt + caption` only
lowercased (no `pre_caption`), "[SEP]" appended, `[CLS] ... [SEP]` truncated to
`input.max_tokens` (official `max_input_length` 25; truncation can cut the [SEP], as there).

Train batch: image float32[B, R, R, 3], dec_ids / dec_mask int32[B, L], image_index int32[B],
idx int32[B] (record index).
"""
from __future__ import annotations

import collections.abc
import functools
import json
from typing import Any, Iterator

import numpy as np

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import coco_caption as coco_caption_format
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.synthetic.shapes import SPLITS, SyntheticShapes, caption

DATASETS = ("synthetic", "karpathy")
# Generator streams of the references: synthetic.py uses streams 0-3 per record; ours are
# far away so that no reference repeats the record's own `caption` stream by construction.
_REF_STREAM = 1000


class SyntheticCaptions:
    """Karpathy-format captions of `SyntheticShapes` scenes (random access, picklable).

    Args:
      split: 'train' or 'heldout' (disjoint scenes).
      size: number of images.
      image_size: rendered side.
      seed: base seed (scenes as `SyntheticShapes(split, size, seed=seed)`).
      refs_per_image: references per image (official COCO: 5).
    """

    def __init__(self, split: str, size: int, *, image_size: int = 64, seed: int = 0,
                 refs_per_image: int = 5):
        if refs_per_image < 1:
            raise ValueError(f"refs_per_image must be >= 1, got {refs_per_image}")
        self.shapes = SyntheticShapes(split, size, image_size=image_size, seed=seed)
        self.split, self.refs_per_image = split, refs_per_image
        self._refs: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def filename(self, i: int) -> str:
        # COCO-like names, so the COCO-server result form can parse an integer id.
        return f"SYNTH_{self.split}_{i:012d}.png"

    def references(self, i: int) -> list[str]:
        """The `refs_per_image` captions of image i."""
        if self._refs is None:
            self._refs = [self._make_refs(j) for j in range(len(self))]
        return self._refs[i]

    def _make_refs(self, i: int) -> list[str]:
        scene = self.shapes.scene(i)
        return [caption(scene, np.random.default_rng(
            [self.shapes.seed, SPLITS[self.split], i, _REF_STREAM + j])) for j in
            range(self.refs_per_image)]

    def image(self, i: int) -> np.ndarray:
        """uint8[R, R, 3] rendering of image i."""
        return self.shapes[i]["image"]

    def karpathy(self) -> list[dict]:
        """The split as official Karpathy entries (filepath, filename, sentences[].raw)."""
        return [{"filepath": f"synthetic_{self.split}", "filename": self.filename(i),
                 "sentences": [{"raw": r} for r in self.references(i)]}
                for i in range(len(self))]


class _Records(collections.abc.Sequence):
    """Records of the pipeline from a list of (image getter key, fields) without decoding."""

    def __init__(self, rows: list[dict], images: Any = None):
        self.rows, self.images = rows, images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        row = dict(self.rows[i])
        if self.images is not None:  # synthetic: render on access
            row["image"] = self.images.image(row.pop("_image"))
        return row


class CaptionSplit:
    """One split: per-image references and the records the pipeline reads.

    Attributes:
      image_ids: [num images] file names (results' `question_id`).
      references: [num images] lists of lowercased reference sentences.
      train_records: one per reference: {'image', 'caption', 'image_id', 'image_index'}.
      eval_records: one per image: {'image', 'image_id', 'gold_captions', 'image_index'}.
    """

    def __init__(self, image_ids: list[str], references: list[list[str]],
                 train_rows: list[dict], eval_rows: list[dict], images: Any = None):
        self.image_ids, self.references = image_ids, references
        self.train_records = _Records(train_rows, images)
        self.eval_records = _Records(eval_rows, images)

    def karpathy(self) -> list[dict]:
        """Karpathy-format entries of this split (for scoring result files)."""
        return [{"filepath": "", "filename": f, "sentences": [{"raw": r} for r in refs]}
                for f, refs in zip(self.image_ids, self.references)]


def _split_from_synthetic(ds: SyntheticCaptions) -> CaptionSplit:
    ids = [ds.filename(i) for i in range(len(ds))]
    refs = [[r.lower() for r in ds.references(i)] for i in range(len(ds))]
    train = [{"_image": i, "caption": r, "image_id": ids[i], "image_index": i}
             for i in range(len(ds)) for r in refs[i]]
    evals = [{"_image": i, "caption": refs[i], "gold_captions": refs[i], "image_id": ids[i],
              "image_index": i} for i in range(len(ds))]
    return CaptionSplit(ids, refs, train, evals, images=ds)


def _split_from_karpathy(annotations, coco_root: str, max_skip_rate: float) -> CaptionSplit:
    src = coco_caption_format.read(annotations, coco_root, train=False,
                                   max_skip_rate=max_skip_rate)
    ids, refs, train, evals = [], [], [], []
    for i, rec in enumerate(src):
        ids.append(rec["image_id"])
        refs.append(list(rec["gold_captions"]))
        base = {"image": rec["image"], "image_id": rec["image_id"], "image_index": i}
        train += [{**base, "caption": c} for c in rec["gold_captions"]]
        evals.append({**base, "caption": list(rec["gold_captions"]),
                      "gold_captions": list(rec["gold_captions"])})
    return CaptionSplit(ids, refs, train, evals)


def load_split(input_cfg, split: str, image_size: int, seed: int) -> CaptionSplit:
    """The 'train' or 'eval' split of `input.dataset` (see module docstring)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    kind = input_cfg.dataset
    if kind == "synthetic":
        size = input_cfg.train_size if split == "train" else input_cfg.eval_size
        return _split_from_synthetic(SyntheticCaptions(
            "train" if split == "train" else "heldout", int(size), image_size=image_size,
            seed=seed, refs_per_image=int(input_cfg.get("refs_per_image", 5))))
    if kind == "karpathy":
        key = "train_annotations" if split == "train" else "eval_annotations"
        files = input_cfg.get(key)
        if not files or not input_cfg.get("coco_root"):
            raise ValueError(f"input.dataset='karpathy' needs input.{key} (official "
                             "coco_caption_*_ocr.json / Karpathy dataset_coco entries) and "
                             "input.coco_root (the folder holding train2014_img/val2014_img)")
        return _split_from_karpathy(list(files) if not isinstance(files, str) else files,
                                    input_cfg.coco_root, float(input_cfg.max_skip_rate))
    raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")


def target_text(caption_text: str, prompt: str = "") -> str:
    """Official decoder target text: `prompt + caption`, lowercased, "[SEP]" appended."""
    if prompt and not prompt.endswith(" "):
        prompt += " "
    return (prompt + caption_text).lower().strip() + " " + tokenizer.EOS


def encode_targets(texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Target texts -> ([CLS] ... [SEP] ids, mask) int32[N, max_tokens] (truncated)."""
    return tokenizer.get_tokenizer().encode(texts, max_length=max_tokens, pad_to=max_tokens)


def scst_placeholders(config) -> dict:
    """{name: (per-row shape, dtype)} of the SCST fields a caption task fills in
    `prepare_batch` (empty unless `task.scst.enabled`; `mplug_jax.scst`): zero arrays in every
    train batch, so that the compiled step knows their shapes."""
    scst = config.task.get("scst") or {}
    if not scst.get("enabled", False):
        return {}
    k = int(scst.get("num_samples", 0) or config.task.generation.beam_size)
    t = int(config.task.generation.max_length) + 1
    return {"scst_ids": ((k, t), np.int32), "scst_lengths": ((k,), np.int32),
            "scst_advantage": ((k,), np.float32), "scst_reward": ((k,), np.float32)}


def placeholder_zeros(placeholders: dict, lead: tuple = ()) -> dict:
    """Zero arrays of the `scst_placeholders` {name: (shape, dtype)}, shape `lead + shape`
    (lead (): one example; (B,): a batch)."""
    return {name: np.zeros(tuple(lead) + tuple(shape), dtype)
            for name, (shape, dtype) in placeholders.items()}


def to_example(record: dict, rng: pipeline.RecordRng, *, image_size: int, max_tokens: int,
               prompt: str, augment: dict | None, placeholders: dict) -> dict[str, Any]:
    """One train record {image, caption, image_index} -> {image, dec_ids, dec_mask,
    image_index} and the zero `placeholders` (module docstring); the image augmented with
    stream 1 of `rng`. A caption empty after `pre_caption` is a BadRecord ('bad_caption')."""
    text.choose_caption(record["caption"], rng.stream(0), 10_000)
    image = pipeline.process_image(record["image"], image_size, rng.stream(1), augment=augment,
                                   image_dtype="float32")
    ids, mask = encode_targets([target_text(record["caption"], prompt)], max_tokens)
    out = {"image": image, "dec_ids": ids[0], "dec_mask": mask[0],
           "image_index": np.int32(record["image_index"])}
    return {**out, **placeholder_zeros(placeholders)}


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch): the
    'train' split of `config.input`, targets with `task.prompt`, `scst_placeholders`."""
    inp = config.input
    split = load_split(inp, "train", config.model.image_size, config.seed)
    fn = functools.partial(
        to_example, image_size=config.model.image_size, max_tokens=int(inp.max_tokens),
        prompt=str(config.task.get("prompt", "") or ""), placeholders=scst_placeholders(config),
        augment=pipeline.augment_options(inp.get("augment"), pipeline.DEFAULT_AUGMENT))
    return pipeline.train_batches(inp, split.train_records, fn, process_index, process_count)


def _eval_example(record: dict, rng: pipeline.RecordRng, *, image_size: int) -> dict:
    return {"image": pipeline.process_image(record["image"], image_size, None, augment=None,
                                            image_dtype="float32")}


class _Padded(collections.abc.Sequence):
    """`records` followed by copies of its last record up to `length`."""

    def __init__(self, records, length: int):
        self.records, self.length = records, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        return self.records[min(int(i), len(self.records) - 1)]


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Batches of the eval records `src` (e.g. the first N of `CaptionSplit.eval_records`) with
    the official test transform, in order; the last batch is filled up to `batch_size` with
    copies of the last image (their idx run on past len(src); their outputs are dropped).
    Batch: image, idx (= image position)."""
    n = len(src)
    if n == 0:
        raise ValueError("the caption eval split has no images")
    padded = _Padded(src, -(-n // batch_size) * batch_size)
    fn = functools.partial(_eval_example, image_size=config.model.image_size)
    return eval_loader.batches(padded, fn, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, bad="raise", pad=None,
                               what="caption")


def write_karpathy(entries: list[dict], path: str) -> None:
    """Write Karpathy-format entries as a JSON array (what `scoring.caption.score_file` and
    `formats.coco_caption.read` read)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
