"""SNLI-VE input (the SNLI-VE task and the shared `classify` evaluator use it).

Annotation files, either official format (told apart by content, `snli_ve_jsonl.is_original`):
the original SNLI-VE release's JSON lines `snli_ve_<split>.jsonl` (premise `sentence1`,
hypothesis `sentence2`, `Flikr30kID`, `gold_label`; `formats.snli_ve_jsonl`, a malformed
line is an error) or ALBEF's `ve_<split>.json` (docs/official-formats.md#snli-ve: image id,
hypothesis `sentence`, `label`, no premise; `formats.snli_ve.read`, malformed records skipped and
counted). Both: image `<image_root>/<id>.jpg`, text pre_caption, label entailment=2 /
neutral=1 / contradiction=0.

Text (`config.task.premise`): True (default) feeds the text premise with the hypothesis, as
mPLUG section 5.2.5 ("the image premise, text premise and text hypothesis are fed to the
encoder"): `[CLS] premise [SEP] hypothesis`, the BERT sentence-pair layout (the paper does not
say how the two are joined; this is ours), truncated longest-first to `input.max_text_tokens`
so a long premise cannot cut the hypothesis away. It needs the jsonl: an ALBEF file is refused
with a one-line error. False: `[CLS] hypothesis` from either format (the ALBEF-based models').

Datasets (`config.input.dataset`):
- 'json': `input.train_file` / `val_file` / `test_file` (single files, as official) and
  `input.image_root` (Flickr30k images);
- 'synthetic': `mplug_jax.data.synthetic.snli_ve` writes both formats once into a cache folder
  (`input.synthetic_dir`, default `<tmp>/mplug_jax_synthetic_snli_ve`; `train_size` /
  `eval_size` records, `test` = a third disjoint stream); premise=True reads the jsonl (labels
  given the premise), False the json (the hypothesis-only data, unchanged).

Train batch (per process, B rows): image float32[B, R, R, 3]; text_ids / text_mask int32[B, L]
(see Text; right-padded to L = `input.max_text_tokens`); label int32[B]; idx int32[B] (record
index). Records whose image fails to decode are skipped and counted
(pipeline skip accounting, `input.max_skip_rate`).

Evaluation (`eval_records` / `eval_batches`, the `classify` evaluator contract): the records of
`ecfg.split` ('val' or 'test'; the first `ecfg.num_examples`, 0 = all) in file order, minus those
whose image file does not exist (logged, counted in `skipped_missing_image`), so every process
sees the same list; a global batch j holds records [j B, (j + 1) B) (B = `ecfg.batch_size`),
process p gets its rows [p B / P, (p + 1) B / P); the last batch is padded with copies of its
first row (valid = 0). `idx` is the record's index in the reader's list of the annotation file,
which `scoring.snli_ve.score_file` rebuilds from the same file. An image that exists but does
not decode at evaluation time is an error naming the file (a skipped row would leave the
processes with different batches).
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import snli_ve as snli_ve_format
from mplug_jax.data.formats import snli_ve_jsonl
from mplug_jax.data.formats.base import RecordSource
from mplug_jax.data.synthetic import snli_ve as synthetic_snli_ve
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.image import BadRecord, DataError

logger = logging.getLogger(__name__)

# Class names, index = official class id (contradiction 0, neutral 1, entailment 2).
LABELS = tuple(sorted(snli_ve_format.LABELS, key=snli_ve_format.LABELS.get))
DATASETS = ("synthetic", "json")
EVAL_SPLITS = ("val", "test")
_FILE_KEYS = {"train": "train_file", "val": "val_file", "test": "test_file"}


def premise_on(config) -> bool:
    """`config.task.premise`; False for a config saved before the option existed (its runs
    were hypothesis only). `configs/snli_ve.py` sets True."""
    task = config.get("task")
    return bool(task.get("premise", False)) if task is not None else False


def files(config, split: str) -> tuple[str, str]:
    """(annotation file, image root) of `split` ('train', 'val', 'test')."""
    if split not in _FILE_KEYS:
        raise ValueError(f"unknown SNLI-VE split {split!r}; valid: {sorted(_FILE_KEYS)}")
    inp = config.input
    if inp.dataset == "synthetic":
        size = int(inp.train_size if split == "train" else inp.eval_size)
        root = inp.get("synthetic_dir") or os.path.join(tempfile.gettempdir(),
                                                        "mplug_jax_synthetic_snli_ve")
        paths = synthetic_snli_ve.ensure_files(root, split, size,
                                               image_size=int(config.model.image_size),
                                               seed=int(config.seed))
        return paths["original" if premise_on(config) else "annotation"], paths["image_root"]
    if inp.dataset == "json":
        key = _FILE_KEYS[split]
        if not inp.get(key):
            name = "dev" if split == "val" else split
            raise ValueError(f"input.dataset='json' needs input.{key} (the official SNLI-VE "
                             f"{split} file: snli_ve_{name}.jsonl, or ALBEF's ve_{name}.json "
                             "with task.premise=False)")
        if not inp.get("image_root"):
            raise ValueError("input.dataset='json' needs input.image_root (the Flickr30k image "
                             "folder holding <id>.jpg)")
        return str(inp[key]), str(inp.image_root)
    raise ValueError(f"unknown input.dataset {inp.dataset!r}; valid: {', '.join(DATASETS)}")


def read(annotation: str, image_root: str, *, max_words: int = 30,
         max_skip_rate: float = 0.01) -> RecordSource:
    """Records of an SNLI-VE file of either official format (see module docstring); jsonl
    records carry a 'premise'."""
    if snli_ve_jsonl.is_original(annotation):
        return snli_ve_jsonl.read(annotation, image_root, max_words=max_words)
    return snli_ve_format.read(annotation, image_root, max_words=max_words,
                           max_skip_rate=max_skip_rate)


def source(config, split: str) -> RecordSource:
    """The parsed records of `split` (`read`); with `task.premise`, a file without premises
    (ALBEF's json) is a ValueError saying what to pass instead."""
    annotation, root = files(config, split)
    src = read(annotation, root, max_words=int(config.input.max_words),
               max_skip_rate=float(config.input.max_skip_rate))
    if premise_on(config) and len(src) and "premise" not in src[0]:
        raise ValueError(f"task.premise=True feeds the text premise (mPLUG 5.2.5) but "
                         f"{annotation} is ALBEF's SNLI-VE json, which has none: pass the "
                         "original SNLI-VE "
                         f"jsonl (snli_ve_{'dev' if split == 'val' else split}.jsonl: sentence1, "
                         "sentence2, Flikr30kID, gold_label) as input."
                         f"{_FILE_KEYS[split]}, or set --config.task.premise=False "
                         "(hypothesis only)")
    return src


def encode_text(sentences: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] sentence` ids and mask int32[N, max_tokens] (truncated, right-padded)."""
    return tokenizer.get_tokenizer().encode(list(sentences), max_length=max_tokens,
                                            pad_to=max_tokens)


def encode_pair(premises: list[str], hypotheses: list[str], max_tokens: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] premise [SEP] hypothesis` ids and mask int32[N, max_tokens], right-padded; when
    too long, tokens are dropped from the end of the longer part first (premise on ties), so
    both keep as much as they can."""
    tok = tokenizer.get_tokenizer()
    if max_tokens < 4:
        raise ValueError(f"input.max_text_tokens must be >= 4 for premise and hypothesis, got "
                         f"{max_tokens}")
    ids = np.zeros((len(premises), max_tokens), np.int32)
    mask = np.zeros_like(ids)
    p_ids, p_mask = tok.encode(list(premises))
    h_ids, h_mask = tok.encode(list(hypotheses))
    for i in range(len(premises)):
        p = p_ids[i, 1:p_mask[i].sum()].tolist()  # drop [CLS]: one sequence is `[CLS] tokens`
        h = h_ids[i, 1:h_mask[i].sum()].tolist()
        budget = max_tokens - 2
        while len(p) + len(h) > budget:
            if len(p) >= len(h):
                p.pop()
            else:
                h.pop()
        row = [tokenizer.CLS_ID, *p, tokenizer.SEP_ID, *h]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def encode(records: list[dict], max_tokens: int, premise: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """The text ids and mask int32[N, max_tokens] of records (see module docstring)."""
    if premise:
        return encode_pair([r["premise"] for r in records], [r["sentence"] for r in records],
                           max_tokens)
    return encode_text([r["sentence"] for r in records], max_tokens)


def to_example(record: Any, rng: pipeline.RecordRng, *, image_size: int, max_tokens: int,
               augment: dict | None, premise: bool) -> dict[str, Any]:
    """One SNLI-VE record -> {image float32[R, R, 3], text_ids, text_mask, label} (and `idx`
    when the record carries one: the evaluation records); the image augmented with stream 1 of
    `rng`; text by `encode`. Raises BadRecord (an image that does not decode: 'bad_image')."""
    try:
        img = transforms.decode_image(record["image"])
        if augment is None:
            image = transforms.eval_transform(img, image_size)
        else:
            image = transforms.train_transform(img, image_size, rng.stream(1), **augment)
    except BadRecord:
        raise
    except (OSError, ValueError) as e:
        raise BadRecord("bad_image", repr(e)) from e
    ids, mask = encode([record], max_tokens, premise)
    out = {"image": image.astype(np.float32), "text_ids": ids[0], "text_mask": mask[0],
           "label": np.int32(record["label"])}
    if "idx" in record:
        out["idx"] = np.int32(record["idx"])
    return out


def example_fn(config, train: bool):
    """`to_example` with the options of `config` bound (picklable; augmentation when `train`
    and `input.augment.enabled`)."""
    aug = config.input.get("augment") if train else None
    return functools.partial(to_example, image_size=int(config.model.image_size),
                             max_tokens=int(config.input.max_text_tokens),
                             augment=pipeline.augment_options(aug, pipeline.DEFAULT_AUGMENT),
                             premise=premise_on(config))


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    return pipeline.train_batches(config.input, source(config, "train"),
                                  example_fn(config, True), process_index, process_count,
                                  what="SNLI-VE")


def eval_records(config, ecfg) -> list[dict]:
    """The evaluated records of `ecfg.split`: {'image' path, 'sentence', 'label' int, 'idx'}
    (+ 'premise' from a jsonl)
    (see module docstring); a clear error when none is left."""
    split = str(ecfg.get("split", "val"))
    if split not in EVAL_SPLITS:
        raise ValueError(f"evals.<classify>.split must be one of {EVAL_SPLITS}, got {split!r}")
    src = source(config, split)
    n = int(ecfg.get("num_examples", 0) or 0)
    chosen = range(min(n, len(src)) if n > 0 else len(src))
    out, missing = [], 0
    for i in chosen:
        r = src[i]
        if not os.path.isfile(r["image"]):
            missing += 1
            if missing <= 5:
                logger.warning("SNLI-VE %s record %d: image %s not found, not evaluated",
                               split, i, r["image"])
            continue
        out.append({**r, "idx": i})
    if missing:
        logger.warning("SNLI-VE %s: %d of %d records not evaluated (image file missing)",
                       split, missing, len(chosen))
    if not out:
        raise DataError(f"SNLI-VE {split}: no record to evaluate ({len(src)} parsed, "
                        f"{missing} with a missing image, parse skips {src.skipped})")
    return out


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """This process's rows of every evaluation batch of the records `src` (`eval_records`), in
    order (see module docstring): image float32[b, R, R, 3], text_ids / text_mask int32[b, L],
    label / valid / idx int32[b], b = batch_size / process_count. Same number of batches on
    every process."""
    return eval_loader.batches(src, example_fn(config, False), batch_size=batch_size,
                               process_index=process_index, process_count=process_count,
                               bad="raise", pad="first", what="SNLI-VE")
