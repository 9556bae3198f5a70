"""Video-caption input of mPLUG-2 retrieval and pretraining, and the mixed image + video
batches of mPLUG-2 pretraining.

Video-caption records, by `config.input.dataset`:
- 'json': MSRVTT retrieval jsonl (`formats.msrvtt_retrieval.read`: `clip_name`, `caption`, one
  line per caption; several lines may name one clip: they are positives of each other), train
  `input.annotations`, videos under `input.video_root` (frame folders or files);
- 'synthetic': the built-in moving-shape videos (`data.synthetic_video`, split 'train'),
  written once as real files under `input.synthetic_dir` (a fresh temporary folder when
  empty): frame folders + a retrieval jsonl with `input.captions_per_video` captions per
  video (independent template draws), then read exactly as 'json'.

Frames as mPLUG-2's video tasks (`mplug2.input`): `model.num_frames` per clip, one random
frame per segment in training, `video.train_clip` when `input.augment.enabled` else
`video.eval_clip`. Captions `pre_caption` to `input.max_words` and tokenised "[CLS] caption"
to `input.max_tokens`. A clip that cannot be used is skipped and counted (`pipeline`).

Video batch (per process, B rows):
  video float32[B, T, R, R, 3]; text_ids / text_mask int32[B, L]; idx int32[B] (record);
  video_index int32[B] (the clip's number: equal for captions of one clip).

Mixed pretraining batch (`pretrain_train_batches`): `video`, `video_text_ids`, `video_text_mask`,
`video_idx` from the video batch, and the image-caption batch of `data.inputs.pretrain` (built-in
shapes, or json / tfds, configured by `input.images`) with keys `image`, `image_text_ids`,
`image_text_mask`, `image_idx`: `input.batch_size` clips and `input.image_batch_size` images per
step (global; an epoch counts the video records). The iterator is checkpointable (`get_state` /
`set_state` of both streams).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import grain
import numpy as np

from mplug_jax.data import pipeline
from mplug_jax.data.formats import msrvtt_retrieval as msrvtt_retrieval_format
from mplug_jax.mplug2 import input as mplug2_input
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.ops import tokenizer

DATASETS = ("synthetic", "json")
RETRIEVAL_FILE = "msrvtt_retrieval_train.jsonl"


def synthetic_files(input_cfg, seed: int) -> tuple[str, str]:
    """(retrieval jsonl, frames root) of the built-in train videos, written on first use under
    `input.synthetic_dir` (kept: later runs with the same settings reuse them)."""
    from mplug_jax.data.synthetic import video as synthetic_video
    size, caps = int(input_cfg.train_size), int(input_cfg.get("captions_per_video", 1))
    raw, res = int(input_cfg.synthetic_raw_frames), int(input_cfg.synthetic_image_size)

    def write(tmp):
        paths = synthetic_video.write_video_files(tmp, size, split="train", num_frames=raw,
                                                  image_size=res, seed=seed, mp4=False,
                                                  qa_per_video=1, refs_per_video=max(caps, 1))
        with open(paths["video_caption"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(tmp, RETRIEVAL_FILE), "w", encoding="utf-8") as f:
            for r in rows:
                for cap in r["golden_captions"][:max(caps, 1)]:
                    f.write(json.dumps({"clip_name": r["video_id"], "caption": cap}) + "\n")

    sub = mplug2_input.synthetic_folder(input_cfg, f"train_{size}_{caps}_{raw}_{res}_{seed}",
                                        RETRIEVAL_FILE, write, prefix="mplug2_videos_",
                                        tmp_prefix="train_")
    return os.path.join(sub, RETRIEVAL_FILE), os.path.join(sub, "frames")


def video_text_source(input_cfg, seed: int = 0):
    """(records {'video', 'video_id', 'caption'}, int32[N] video_index) of the train set."""
    kind = input_cfg.dataset
    if kind == "synthetic":
        ann, root = synthetic_files(input_cfg, seed)
    elif kind == "json":
        ann, root = input_cfg.get("annotations"), input_cfg.get("video_root")
        if not ann or not root:
            raise ValueError("input.dataset='json' needs input.annotations (an MSRVTT "
                             "retrieval jsonl: clip_name, caption) and input.video_root")
    else:
        raise ValueError(f"unknown input.dataset {kind!r}; valid: {', '.join(DATASETS)}")
    src = msrvtt_retrieval_format.read(str(ann), str(root),
                                       max_words=int(input_cfg.get("max_words", 40)),
                                       max_skip_rate=float(input_cfg.max_skip_rate))
    ids: dict[str, int] = {}
    index = np.asarray([ids.setdefault(r["video_id"], len(ids)) for r in src.records], np.int32)
    return src, index


def to_example(record: dict, rng: pipeline.RecordRng, *, num_frames: int, image_size: int,
               augment: dict | None, train: bool, max_tokens: int,
               video_index: np.ndarray) -> dict[str, Any]:
    """One video-caption record -> {video, text_ids, text_mask, video_index} (module
    docstring); frames drawn from stream 3 of `rng`. Raises BadRecord."""
    clip = mplug2_input.read_clip(record["video"], num_frames, image_size, train=train,
                                  rng=rng.stream(3), augment=augment)
    caption = record["caption"]
    ids, mask = tokenizer.get_tokenizer().encode([caption], max_length=max_tokens,
                                                 pad_to=max_tokens)
    return {"video": clip.astype(np.float32), "text_ids": ids[0], "text_mask": mask[0],
            "video_index": np.int32(video_index[rng.index])}


def video_text_dataset(src, video_index, input_cfg, *, num_frames: int, image_size: int,
                       batch_size: int, seed: int = 0, shard_index: int = 0,
                       shard_count: int = 1, num_epochs: int | None = None
                       ) -> grain.IterDataset:
    """Shuffled train batches of video-caption records (module docstring)."""
    fn = functools.partial(to_example, video_index=video_index,
                           max_tokens=int(input_cfg.max_tokens),
                           **mplug2_input.clip_options(input_cfg, num_frames=num_frames,
                                                       image_size=image_size, train=True,
                                                       frames_key="model.num_frames"))
    return pipeline.dataset(src, fn, batch_size=batch_size, seed=seed,
                            shard_index=shard_index, shard_count=shard_count,
                            num_epochs=num_epochs, workers=int(input_cfg.get("workers", 0)),
                            max_skip_rate=float(input_cfg.max_skip_rate),
                            what="video-caption")


def _check_batch(batch_size: int, process_count: int, key: str) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"input.{key}={batch_size} must be a positive multiple of the "
                         f"{process_count} processes")
    return batch_size // process_count


def retrieval_train_batches(config, process_index: int, process_count: int
                            ) -> tuple[Any, int]:
    """(checkpointable iterator of this process's video batches, records per epoch)."""
    inp = config.input
    b = _check_batch(int(inp.batch_size), process_count, "batch_size")
    src, index = video_text_source(inp, config.seed)
    ds = video_text_dataset(src, index, inp, num_frames=int(config.model.num_frames),
                            image_size=int(config.model.image_size), batch_size=b,
                            seed=int(inp.shuffle_seed), shard_index=process_index,
                            shard_count=process_count)
    return iter(ds), len(src)


class MixedIterator:
    """Zips a video-caption and an image-caption batch iterator into one mixed batch
    (module docstring); checkpointable."""

    def __init__(self, videos, images):
        self.videos, self.images = videos, images

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        v, i = next(self.videos), next(self.images)
        out = {"video": v["video"], "video_text_ids": v["text_ids"],
               "video_text_mask": v["text_mask"], "video_idx": v["idx"],
               "image": i["image"], "image_text_ids": i["text_ids"],
               "image_text_mask": i["text_mask"], "image_idx": i["idx"]}
        return out

    def get_state(self) -> dict:
        return {"videos": self.videos.get_state(), "images": self.images.get_state()}

    def set_state(self, state: dict) -> None:
        self.videos.set_state(state["videos"])
        self.images.set_state(state["images"])


def image_input_config(inp):
    """The `data.inputs.pretrain` view of the mixed config: `input.images` (dataset, sizes,
    annotations ...) with the shared text and skip settings."""
    import ml_collections
    c = ml_collections.ConfigDict(inp.images)
    with c.unlocked():
        c.batch_size = int(inp.image_batch_size)
        c.max_tokens = int(inp.max_tokens)
        c.max_words = int(inp.get("max_words", 30))
        c.max_skip_rate = float(inp.max_skip_rate)
        c.shuffle_seed = int(inp.shuffle_seed)
        c.workers = int(inp.get("workers", 0))
        if "augment" not in c:
            c.augment = dict(enabled=False)
    return c


def pretrain_train_batches(config, process_index: int, process_count: int
                           ) -> tuple[MixedIterator, int]:
    """(checkpointable iterator of mixed image + video batches, video records per epoch)."""
    inp = config.input
    bv = _check_batch(int(inp.batch_size), process_count, "batch_size")
    _check_batch(int(inp.image_batch_size), process_count, "image_batch_size")
    src, index = video_text_source(inp, config.seed)
    vids = video_text_dataset(src, index, inp, num_frames=int(config.model.num_frames),
                              image_size=int(config.model.image_size), batch_size=bv,
                              seed=int(inp.shuffle_seed), shard_index=process_index,
                              shard_count=process_count)
    import ml_collections
    image_config = ml_collections.ConfigDict({"input": image_input_config(inp),
                                              "model": {"image_size": config.model.image_size},
                                              "seed": config.seed})
    imgs, _ = pretrain_input.train_batches(image_config, process_index, process_count)
    return MixedIterator(iter(vids), imgs), len(src)
