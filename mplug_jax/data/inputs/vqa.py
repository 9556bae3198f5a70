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
  `input.reduced_decode`: see `pipeline.pretrain_dataset`);
  question_ids / question_mask int32[B, Lq];
  answer_ids / answer_mask int32[B, A, La] ([CLS] answer [SEP], right-padded);
  answer_weights float32[B, A]; answers_dropped int32[B]; idx int32[B] (source index).
Eval batch: image, question_ids, question_mask, idx (no shuffling, no augmentation).
Questions are truncated to `input.max_question_tokens` in evaluation too (static shapes; the
official evaluation pads to the longest question of the batch without truncating).
"""
from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from mplug_jax.data import pipeline
from mplug_jax.data.formats import vqa as vqa_format
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
        key = "annotations" if split == "train" else "eval_annotations"
        files = input_cfg.get(key)
        if not files:
            raise ValueError(f"input.dataset='json' needs input.{key} (official VQA json files)")
        roots = dict(input_cfg.get("roots") or {})
        if not roots:
            raise ValueError("input.dataset='json' needs input.roots = {dataset tag: image "
                             "folder}, e.g. {'vqa': 'coco_2014/', 'vg': 'visual_genome/'}")
        return vqa_format.read(list(files), roots, train=split == "train",
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


class _VQARecord:
    """(position, index) -> processed example; picklable for grain worker processes."""

    def __init__(self, source, *, image_size: int, max_question_tokens: int,
                 max_answer_tokens: int, max_answers: int, seed: int, augment: dict | None,
                 epoch_length: int, add_ocr: bool, add_object: bool, train: bool,
                 image_dtype: str = "float32", reduced_decode: bool = False):
        self.source, self.image_size, self.seed, self.augment = source, image_size, seed, augment
        self.lq, self.la, self.na = max_question_tokens, max_answer_tokens, max_answers
        self.epoch_length, self.add_ocr, self.add_object = epoch_length, add_ocr, add_object
        self.train, self.image_dtype, self.reduced_decode = train, image_dtype, reduced_decode
        self._warned = False

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        epoch = position // max(self.epoch_length, 1)
        index = int(index)
        record = None
        try:
            record = self.source[index]
            if not isinstance(record, dict) or "image" not in record or "question" not in record:
                raise BadRecord("bad_record", f"record {index} lacks 'image'/'question'")
            question = vqa_format.question_text(record, self.add_ocr, self.add_object)
            image = pipeline.process_image(
                record["image"], self.image_size,
                np.random.default_rng([self.seed, epoch, index, 1]), augment=self.augment,
                image_dtype=self.image_dtype, reduced_decode=self.reduced_decode)
            if self.train:
                if "answers" in record:  # parsed by formats.vqa.read
                    answers, weights = record["answers"], record["weights"]
                else:  # raw official format (the synthetic records)
                    answers, weights = vqa_format.answer_weights(record)
        except BadRecord as e:
            logger.warning("skipping VQA record %d (%s): %s", index, e.reason, e)
            return {pipeline._SKIP_KEY: e.reason}
        except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
            logger.warning("skipping VQA record %d (bad_record): %r", index, e)
            return {pipeline._SKIP_KEY: "bad_record"}
        q_ids, q_mask = tokenizer.get_tokenizer().encode([question], max_length=self.lq,
                                                         pad_to=self.lq)
        out = {"image": image, "question_ids": q_ids[0],
               "question_mask": q_mask[0], "idx": np.int32(index)}
        if self.train:
            answers, weights, dropped = select_answers(list(answers), list(weights), self.na)
            if dropped and not self._warned:
                self._warned = True
                logger.warning(
                    "question %s has %d distinct answers, more than task.max_answers=%d: the "
                    "lightest are dropped (counted in train/answers_dropped_total; warned once)",
                    record.get("question_id", index), len(answers) + dropped, self.na)
            a_ids, a_mask = encode_answers(answers, self.na, self.la)
            w = np.zeros((self.na,), np.float32)
            w[:len(weights)] = weights
            out.update(answer_ids=a_ids, answer_mask=a_mask, answer_weights=w,
                       answers_dropped=np.int32(dropped))
        return out


def dataset(src, input_cfg, *, image_size: int, max_answers: int, batch_size: int,
            train: bool, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
            num_epochs: int | None = None, drop_remainder: bool = True,
            shuffle: bool | None = None) -> grain.IterDataset:
    """Batches of `src` (see module docstring); checkpointable iterator (grain state plus skip
    counters). `train`: answer targets, per-process shards, and augmentation when
    `input.augment.enabled`; `shuffle` (default = `train`): a new order every epoch."""
    n = len(src)
    per_shard = n // shard_count
    if train and per_shard < batch_size:
        raise ValueError(f"{n} VQA records over {shard_count} processes give {per_shard} per "
                         f"process, fewer than the batch of {batch_size}")
    augment = None
    aug = input_cfg.get("augment")
    if train and aug is not None and aug.get("enabled"):
        augment = {**pipeline.DEFAULT_AUGMENT,
                   **{k: v for k, v in aug.items() if k != "enabled"}}
    # uint8 images and reduced decoding are options of the training batches only.
    image_dtype = pipeline.check_image_dtype(input_cfg.get("image_dtype", "float32")) \
        if train else "float32"
    ds = grain.MapDataset.range(n)
    if train if shuffle is None else shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[shard_index:per_shard * shard_count:shard_count] if train else ds
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(_VQARecord(
        src, image_size=image_size, max_question_tokens=int(input_cfg.max_question_tokens),
        max_answer_tokens=int(input_cfg.max_answer_tokens), max_answers=max_answers, seed=seed,
        augment=augment, epoch_length=per_shard if train else n,
        add_ocr=bool(input_cfg.get("add_ocr", False)),
        add_object=bool(input_cfg.get("add_object", False)), train=train,
        image_dtype=image_dtype, reduced_decode=train and bool(input_cfg.get("reduced_decode",
                                                                              False))))
    return pipeline.batched(ds, batch_size, drop_remainder=drop_remainder,
                            workers=int(input_cfg.get("workers", 0)) if train else 0,
                            max_skip_rate=input_cfg.max_skip_rate)


def train_batches(config, process_index: int, process_count: int) -> tuple[Any, int]:
    """(checkpointable iterator of this process's train batches, records per epoch)."""
    inp = config.input
    batch_size = pipeline.process_batch_size(inp, process_count)
    src = source(inp, "train", inp.train_size, config.model.image_size, config.seed)
    ds = dataset(src, inp, image_size=config.model.image_size,
                 max_answers=int(config.task.max_answers),
                 batch_size=batch_size, train=True,
                 seed=inp.shuffle_seed, shard_index=process_index, shard_count=process_count)
    return iter(ds), len(src)


def eval_batches(src, input_cfg, image_size: int, batch_size: int) -> list[dict]:
    """Every record of `src` in order, in batches of `batch_size` (the last one may be
    shorter; the evaluator pads it)."""
    ds = dataset(src, input_cfg, image_size=image_size, max_answers=1, batch_size=batch_size,
                 train=False, num_epochs=1, drop_remainder=False)
    return list(ds)
