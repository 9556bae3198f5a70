"""Evaluation input of the zero-shot video tasks (paper section 5.4.2): sampled frames of each
video at the official test transform, in fixed-shape batches, plus per-record text fields.

Frames: `num_frames` per video by the uniform rule of `mplug_jax.data.ops.video.frame_indices`
(segment middles; a shorter video repeats its last frame), each resized to R x R (bicubic) and
CLIP-normalised as `transforms.eval_transform` (the official loaders decode straight at R x R
with decord, /255, CLIP mean/std; the resampling filter inside decord may differ).

A video that cannot be used (missing, empty, undecodable, no frame) is skipped: logged with its
id and reason, counted in `VideoEval.skipped` (reason -> count) and listed in
`VideoEval.skipped_ids`; the evaluators report those counts next to their metrics. A missing
decoder library (neither PyAV nor OpenCV for a video file) is a `DataError`, not a skip.

Batch (B = batch_size; the last batch is padded by repeating its last real row):
  frames float32[B, T, R, R, 3]; idx int32[B] (source index); valid bool[B] (False = padding);
  for each text field `name`: `<name>_ids` / `<name>_mask` int32[B, L] (padded to L).
"""
from __future__ import annotations

import logging
import time
from typing import Iterator, Sequence

import numpy as np

from mplug_jax.data import eval_loader
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import video
from mplug_jax.data.ops.image import SKIP_REASONS

logger = logging.getLogger(__name__)


RESIZES = ("bicubic", "nearest")


def load_clip(path: str, num_frames: int, image_size: int, resize: str = "bicubic"
              ) -> np.ndarray:
    """`num_frames` uniformly sampled frames of a frame folder or video file ->
    float32[T, R, R, 3] by the official test transform: 'bicubic' = the image transform per
    frame (mPLUG v1 zero-shot), 'nearest' = mPLUG-2's `video.eval_clip`. Raises BadRecord for
    an unusable video."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if resize not in RESIZES:
        raise ValueError(f"video resize must be one of {RESIZES}, got {resize!r}")
    frames = video.load_frames(path, num_frames)
    if resize == "nearest":
        return video.eval_clip(frames, image_size)
    return np.stack([transforms.eval_transform(f, image_size) for f in frames]).astype(
        np.float32)


def progress(what: str, done: int, total: int, t0: float) -> str:
    """'<what> done/total, <elapsed>s elapsed, ETA <s>s' (linear extrapolation)."""
    spent = time.perf_counter() - t0
    eta = spent / max(done, 1) * (total - done)
    return f"  {what} {done}/{total}, {spent:.0f}s elapsed, ETA {eta:.0f}s"


class VideoEval:
    """Iterable over the eval batches of a video record source (see module docstring).

    Args:
      source: random-access records with 'video' (path) and 'video_id' (`data.formats`).
      num_frames: T frames per video.
      image_size: R.
      batch_size: B videos per batch.
      text_fields: {name: max tokens L}: record field `name` (a string) tokenised as
        "[CLS] text", truncated / padded to L (e.g. {'question': 25}).
      workers: threads decoding videos (deterministic order whatever the number).
      resize: 'bicubic' (image transform per frame, v1) or 'nearest' (mPLUG-2 `eval_clip`).
      text_prep: {field: fn} applied to a text field before tokenising (e.g. pre_question).
      limit: evaluate the first `limit` records only (0 = all).
      log_every: print a progress line with an ETA every this many batches (0 = never).
    """

    def __init__(self, source: Sequence[dict], *, num_frames: int, image_size: int,
                 batch_size: int, text_fields: dict[str, int] | None = None, workers: int = 4,
                 limit: int = 0, log_every: int = 0, name: str = "video eval",
                 resize: str = "bicubic", text_prep: dict | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_frames < 1 or image_size < 1:
            raise ValueError(f"need num_frames >= 1 and image_size >= 1, got {num_frames}, "
                             f"{image_size}")
        n = len(source) if not limit else min(int(limit), len(source))
        if n == 0:
            raise ValueError(f"{name}: the annotation file has no usable record")
        self.source, self.n = source, n
        self.num_frames, self.image_size, self.batch_size = num_frames, image_size, batch_size
        self.text_fields = dict(text_fields or {})
        self.text_prep = dict(text_prep or {})  # {field: fn(str) -> str} before tokenising
        self.workers, self.log_every, self.name = max(int(workers), 1), int(log_every), name
        if resize not in RESIZES:
            raise ValueError(f"{name}: resize must be one of {RESIZES}, got {resize!r}")
        self.resize = resize
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.skipped_ids: list[str] = []

    @classmethod
    def from_eval_block(cls, ecfg, config, fmt: str, name: str, **kwargs) -> "VideoEval":
        """The batches an eval block asks for: the records of `eval_source(ecfg, fmt,
        config.seed)` (kept as `.source`), `ecfg.num_frames` frames at the model's resolution,
        `ecfg.batch_size` videos, and `workers` / `limit` / `log_every` / `resize` from the
        block when set; `kwargs` (text_fields, text_prep) pass through."""
        source = eval_source(ecfg, fmt, int(config.seed))
        return cls(source, num_frames=int(ecfg.num_frames), image_size=config.model.image_size,
                   batch_size=int(ecfg.batch_size), workers=int(ecfg.get("workers", 4)),
                   limit=int(ecfg.get("limit", 0) or 0),
                   log_every=int(ecfg.get("log_every", 0) or 0), name=name,
                   resize=str(ecfg.get("resize", "bicubic")), **kwargs)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_example(self, record: dict, rng=None) -> dict:
        """One video record -> {frames float32[T, R, R, 3], `<field>_ids` / `_mask` int32[L]
        of every text field}; raises BadRecord for an unusable video."""
        out = {"frames": load_clip(record["video"], self.num_frames, self.image_size,
                                   self.resize)}
        tok = tokenizer.get_tokenizer()
        for field, length in self.text_fields.items():
            prep = self.text_prep.get(field, str)
            ids, mask = tok.encode([prep(record[field])], max_length=length, pad_to=length)
            out[f"{field}_ids"], out[f"{field}_mask"] = ids[0], mask[0]
        return out

    def __iter__(self) -> Iterator[dict]:
        """Batches in source order (`eval_loader.batches`, unusable videos skipped, the last
        batch padded); resets the skip counts (each pass counts afresh)."""
        counts = eval_loader.SkipCounts()
        self.skipped, self.skipped_ids = counts.skipped, counts.ids
        total = -(-self.n // self.batch_size)
        t0 = time.perf_counter()
        # Decoded a window at a time: memory stays bounded whatever the number of videos.
        for done, batch in enumerate(eval_loader.batches(
                eval_loader.Head(self.source, self.n), self.to_example, batch_size=self.batch_size,
                bad="skip", pad="last", threads=self.workers,
                window=2 * max(self.batch_size, self.workers), what=self.name, stats=counts,
                id_key="video_id"), 1):
            batch["valid"] = batch["valid"].astype(bool)
            yield batch
            if self.log_every and done % self.log_every == 0:
                print(progress(f"{self.name}: batch", done, total, t0), flush=True)
        if self.num_skipped:
            logger.warning("%s: skipped %d of %d videos: %s", self.name, self.num_skipped,
                           self.n, ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v))


# ---- shared by the video evaluators ---------------------------------------------------------

DATASETS = ("synthetic", "json")
# Reader and synthetic file of each annotation format (`data.formats`, `data.synthetic_video`).
FORMATS = {"msrvtt_retrieval": "msrvtt_retrieval", "video_qa": "msrvtt_qa",
           "vatex_caption": "vatex", "video_caption": "video_caption"}


def eval_source(ecfg, fmt: str, seed: int = 0):
    """Records of an eval block: `ecfg.dataset` 'json' reads `ecfg.annotations` with videos
    under `ecfg.video_root`; 'synthetic' first writes `ecfg.synthetic_size` synthetic videos
    (`data.synthetic_video.write_video_files`, into `ecfg.synthetic_dir` or a fresh temporary
    folder; `ecfg.synthetic_video` 'frames' or 'mp4') and reads those files the same way."""
    from mplug_jax.data import formats
    from mplug_jax.data.synthetic import video as synthetic_video
    if fmt not in FORMATS:
        raise ValueError(f"unknown video annotation format {fmt!r}; valid: {sorted(FORMATS)}")
    kind = ecfg.get("dataset", "json")
    if kind == "synthetic":
        import tempfile
        folder = ecfg.get("synthetic_dir") or tempfile.mkdtemp(prefix="mplug_synthetic_video_")
        which = ecfg.get("synthetic_video", "frames")
        if which not in ("frames", "mp4"):
            raise ValueError(f"synthetic_video must be 'frames' or 'mp4', got {which!r}")
        paths = synthetic_video.write_video_files(
            folder, int(ecfg.get("synthetic_size", 16)),
            num_frames=int(ecfg.get("synthetic_frames", 12)),
            image_size=int(ecfg.get("synthetic_image_size", 64)), seed=seed,
            mp4=which == "mp4" or None)
        annotation, root = paths[FORMATS[fmt]], paths[f"{which}_root"]
    elif kind == "json":
        annotation, root = ecfg.get("annotations"), ecfg.get("video_root")
        if not annotation or not root:
            raise ValueError(f"a {fmt} eval block with dataset='json' needs annotations (the "
                             "official annotation file) and video_root (the video folder)")
    else:
        raise ValueError(f"unknown eval dataset {kind!r}; valid: {DATASETS}")
    skip = float(ecfg.get("max_skip_rate", 0.01))
    reader = formats.get(fmt).read
    if fmt == "video_caption":
        return reader(annotation, root, train=False, max_skip_rate=skip)
    return reader(annotation, root, max_skip_rate=skip)


def frames_to_tokens(encode_image, params, frames):
    """Frames float32[B, T, R, R, 3] -> float[B, T * N, D]: one batched `encode_image` call on
    the B * T frames (each with the image model's positional embeddings; no temporal
    embedding), the T frames' N tokens concatenated along the sequence (official v1)."""
    b, t = frames.shape[:2]
    img = encode_image(params, frames.reshape((b * t,) + frames.shape[2:]))
    return img.reshape(b, t * img.shape[1], img.shape[2])


def video_encoder(predict_fns: dict, evaluator: str):
    """fn(params, frames float[B, T, R, R, 3]) -> float[B, N, D] video states: the task's own
    `encode_video` (mPLUG-2: temporal modules, universal layers) when it has one, else the
    image encoder on every frame with the tokens concatenated (`frames_to_tokens`, mPLUG v1)."""
    if "encode_video" in predict_fns:
        return predict_fns["encode_video"]
    if "encode_image" not in predict_fns:
        raise ValueError(f"evaluator {evaluator!r} needs predict fn 'encode_video' or "
                         f"'encode_image'; the task has {sorted(predict_fns)}")
    encode = predict_fns["encode_image"]
    return lambda params, frames: frames_to_tokens(encode, params, frames)


def put_batch(mesh, *arrays):
    """Whole-batch numpy arrays (the same on every process) -> global arrays split over the
    mesh's batch axes; each process passes the rows of its devices."""
    import jax

    from mplug_jax.data.pipeline import make_global_batch
    n, pid = jax.process_count(), jax.process_index()
    local = [np.asarray(a)[pid * len(a) // n:(pid + 1) * len(a) // n] for a in arrays]
    return make_global_batch(local, mesh)


def default_mesh(mesh, batch_size: int):
    """`mesh` (or a 1-device mesh on this process's first device) after checking that
    `batch_size` splits over its batch axes."""
    import jax

    from mplug_jax.sharding import make_mesh
    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"eval batch_size {batch_size} must be a multiple of the {shards} "
                         f"batch shards of mesh {dict(mesh.shape)}")
    return mesh
