"""VQA input by `config.input.dataset` (the VQA task and evaluator share it).

- 'synthetic': the built-in `SyntheticVQA` ('train' / 'heldout' splits, official record format);
- 'json': official VQA / VG / GQA json files (`formats.vqa.read`): `input.annotations` for training,
  `input.eval_annotations` for evaluation, images under `input.roots[record['dataset']]`
  (the official vqa_root / vg_root / gqa_root).

Official target construction (docs/official-formats.md#vqa): a 'vqa' record's distinct answers
weighted count / #answers, a 'vg'/'gqa' record's single answer weight 0.5; every answer gets
"[SEP]" appended. Static shapes: `max_answers` (A) answer slots per question; padding slots
have weight 0 and an all-zero mask; a question with more distinct answers keeps its A
heaviest (ties: first seen) and the others are counted in `answers_dropped` (and logged).

Train batch (per process, B rows):
  image float32[B, R, R, 3] (uint8 with `input.image_dtype='uint8'`, normalised on the device;
  `input.reduced_decode`: see `pipeline.process_image`);
  question_ids / question_mask int32[B, Lq];
  answer_ids / answer_mask int32[B, A, La] ([CLS] answer [SEP], right-padded);
  answer_weights float32[B, A]; answers_dropped int32[B]; idx int32[B] (source index).
Eval batch: image, question_ids, question_mask, idx (no shuffling, no augmentation).
Questions are truncated to `input.max_question_tokens` in evaluation too (static shapes; the
official evaluation pads to the longest question of the batch without truncating).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

import grain
import numpy as np

from mplug_jax.data import eval_loader, pipeline
from mplug_jax.data.formats import vqa as vqa_format
from mplug_jax.data.inputs import json_annotations
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.synthetic.shapes import SyntheticVQA
from mplug_jax.data.ops.image import BadRecord

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "json")


def source(input_cfg, split: str, size: int, image_size: int, seed: int):
    """Random-access VQA records of `input.dataset` for `split` ('train' or 'heldout');
    `size` applies to the synthetic data only (0 = the json file's records)."""
    kind = input_cfg.dataset
    if kind == "synthetic":
        return SyntheticVQA(split, size, image_size=image_size, seed=seed)
    if kind == "json":
        files = json_annotations(input_cfg, split, "official VQA json files")
        roots = dict(input_cfg.get("roots") or {})
        if not roots:
            raise ValueError("input.dataset='json' needs input.roots = {dataset tag: image "
                             "folder}, e.g. {'vqa': 'coco_2014/', 'vg': 'visual_genome/'}")
        return vqa_format.read(files, roots, train=split == "train",
                           max_skip_rate=input_cfg.max_skip_rate)
    raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")


def select_answers(answers: list[str], weights: list[float], max_answers: int
                   ) -> tuple[list[str], list[float], int]:
    """The `max_answers` heaviest (answer, weight) pairs (stable on ties) and the number
    dropped."""
    order = sorted(range(len(answers)), key=lambda i: -weights[i])[:max_answers]
    order.sort()  # keep the record's order among the kept ones
    return [answers[i] for i in order], [weights[i] for i in order], \
        max(len(answers) - max_answers, 0)


def encode_answers(answers: list[str], max_answers: int, max_tokens: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`answer + "[SEP]"` (official eos) -> int32[A, La] ids and mask, padded slots all 0.

    An answer longer than La keeps its first La - 1 tokens and ends in [SEP]."""
    ids = np.zeros((max_answers, max_tokens), np.int32)
    mask = np.zeros((max_answers, max_tokens), np.int32)
    if answers:
        enc, m = tokenizer.get_tokenizer().encode([a + tokenizer.EOS for a in answers])
        for j in range(len(answers)):
            n = int(m[j].sum())
            if n > max_tokens:
                logger.warning("answer %r has %d tokens, truncated to input.max_answer_tokens="
                               "%d", answers[j], n, max_tokens)
                ids[j] = enc[j, :max_tokens]
                ids[j, -1] = tokenizer.SEP_ID
                mask[j] = 1
            else:
                ids[j, :n], mask[j, :n] = enc[j, :n], 1
    return ids, mask


_warned_answers = [False]  # "more answers than task.max_answers" is logged once per process


def to_example(record: Any, rng: pipeline.RecordRng, *, image_size: int,
               max_question_tokens: int, max_answer_tokens: int, max_answers: int,
               augment: dict | None, add_ocr: bool, add_object: bool, train: bool,
               image_dtype: str = "float32", reduced_decode: bool = False) -> dict[str, Any]:
    """One VQA record -> example (module docstring; answers only when `train`); the image is
    drawn from stream 1 of `rng`. Raises BadRecord."""
    if not isinstance(record, dict) or "image" not in record or "question" not in record:
        raise BadRecord("bad_record", "record lacks 'image'/'question'")
    question = vqa_format.question_text(record, add_ocr, add_object)
    image = pipeline.process_image(record["image"], image_size, rng.stream(1), augment=augment,
                                   image_dtype=image_dtype, reduced_decode=reduced_decode)
    if train:
        if "answers" in record:  # parsed by formats.vqa.read
            answers, weights = record["answers"], record["weights"]
        else:  # raw official format (the synthetic records)
            answers, weights = vqa_format.answer_weights(record)
    lq = max_question_tokens
    q_ids, q_mask = tokenizer.get_tokenizer().encode([question], max_length=lq, pad_to=lq)
    out = {"image": image, "question_ids": q_ids[0], "question_mask": q_mask[0]}
    if train:
        answers, weights, dropped = select_answers(list(answers), list(weights), max_answers)
        if dropped and not _warned_answers[0]:
            _warned_answers[0] = True
            logger.warning(
                "question %s has %d distinct answers, more than task.max_answers=%d: the "
                "lightest are dropped (counted in train/answers_dropped_total; warned once)",
                record.get("question_id", rng.index), len(answers) + dropped, max_answers)
        a_ids, a_mask = encode_answers(answers, max_answers, max_answer_tokens)
        w = np.zeros((max_answers,), np.float32)
        w[:len(weights)] = weights
        out.update(answer_ids=a_ids, answer_mask=a_mask, answer_weights=w,
                   answers_dropped=np.int32(dropped))
    return out


def example_fn(input_cfg, *, image_size: int, max_answers: int, train: bool):
    """`to_example` with the options of `input_cfg` bound (picklable); augmentation (when
    `input.augment.enabled`), uint8 images and reduced decoding are training options."""
    return functools.partial(
        to_example, image_size=image_size, max_answers=max_answers, train=train,
        max_question_tokens=int(input_cfg.max_question_tokens),
        max_answer_tokens=int(input_cfg.max_answer_tokens),
        augment=pipeline.augment_options(input_cfg.get("augment"), pipeline.DEFAULT_AUGMENT)
        if train else None,
        add_ocr=bool(input_cfg.get("add_ocr", False)),
        add_object=bool(input_cfg.get("add_object", False)),
        image_dtype=pipeline.check_image_dtype(input_cfg.get("image_dtype", "float32"))
        if train else "float32",
        reduced_decode=train and bool(input_cfg.get("reduced_decode", False)))


def dataset(src, input_cfg, *, image_size: int, max_answers: int, batch_size: int,
            train: bool, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
            num_epochs: int | None = None, drop_remainder: bool = True,
            shuffle: bool | None = None) -> grain.IterDataset:
    """Batches of `src` (see module docstring) by `pipeline.dataset`. `train`: answer targets,
    per-process shards, and augmentation when `input.augment.enabled`; `shuffle` (default =
    `train`): a new order every epoch."""
    workers = int(input_cfg.get("workers", 0)) if train else 0
    return pipeline.dataset(
        src, example_fn(input_cfg, image_size=image_size, max_answers=max_answers, train=train),
        batch_size=batch_size, seed=seed, shuffle=train if shuffle is None else shuffle,
        shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
        drop_remainder=drop_remainder, workers=workers, max_skip_rate=input_cfg.max_skip_rate,
        what="VQA", read_threads=pipeline.read_threads(input_cfg, workers))


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    src = source(inp, "train", inp.train_size, config.model.image_size, config.seed)
    fn = example_fn(inp, image_size=config.model.image_size,
                    max_answers=int(config.task.max_answers), train=True)
    return pipeline.train_batches(inp, src, fn, process_index, process_count, what="VQA")


def eval_batches(config, src, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Every usable record of `src` in order (`eval_loader.batches`; unusable records skipped
    and logged), in batches of `batch_size` (the last one may be shorter; the evaluator pads
    it): image, question_ids, question_mask, idx."""
    fn = example_fn(config.input, image_size=config.model.image_size, max_answers=1,
                    train=False)
    return eval_loader.batches(src, fn, batch_size=batch_size, process_index=process_index,
                               process_count=process_count, bad="skip", pad=None, what="VQA")
