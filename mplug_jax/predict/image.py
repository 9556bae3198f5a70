"""`Predictor`: VQA answers, captions and grounding boxes for images (see `mplug_jax.predict`)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import export_cache, generate, tasks
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.predict.common import (TASKS, VIDEO_TASKS, Settings, answer_or_caption,
                                      run_generation_settings)
from mplug_jax.predict.video import VIDEO_WORKDIR_TASKS, VideoPredictor
from mplug_jax.scoring.caption import decode_text
from mplug_jax.tasks import base

ZERO_SHOT_PROMPT = "a picture of"


def _states(model, params, image, ids, mask):
    """Decoder states: image embeddings alone (ids None), else [fused image; fused text]."""
    def apply(p, method, *args, rng=None):
        return model.apply({"params": p}, *args, method=method)

    img = apply(params, "encode_image", image)
    if ids is None:
        return img, jnp.ones(img.shape[:2], jnp.int32)
    return base.fused_states(apply, params, img, ids, mask)


class Predictor:
    """VQA answers or captions for images (paths, PIL images or uint8 arrays).

    Args:
      model: the `MPLUG` module; params: its parameter tree.
      task: 'vqa' or 'caption'.
      prompt: caption prefix fed through the text encoder and fusion (zero-shot captioning);
        '' = the fine-tuned caption model's image-only states.
      settings: generation settings (`Settings.for_task(task)` by default).
      max_pixels: larger images are rejected (JPEGs are decoded at a reduced scale instead).
    """

    def __init__(self, model, params, task: str, *, prompt: str = "",
                 settings: Settings | None = None, max_pixels: int = transforms.MAX_PIXELS):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.model, self.params, self.task, self.prompt = model, params, task, prompt
        self.settings = settings or Settings.for_task(task)
        self.max_pixels = max_pixels
        self.tokenizer = get_tokenizer()
        self._search = jax.jit(self._search_fn)
        self._ground = jax.jit(self._ground_fn)
        # What the traced programs depend on besides their arguments (export_cache's key).
        self._static = repr((self.model, self.settings))

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str, task: str | None = None, *, step: int = 0,
                        **settings) -> "Predictor":
        """A predictor from a workdir of ours (its task from its config; a pretraining workdir
        captions zero-shot) or a `mplug-jax convert` directory (`task` required).

        `settings`: Settings fields (beam_size, min_length, max_length, official)."""
        from mplug_jax import workdir
        path = os.fspath(path)
        if task in VIDEO_TASKS:
            return VideoPredictor.from_checkpoint(path, task, step=step, **settings)
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be one of {TASKS + VIDEO_TASKS}, got {task!r}")
        from mplug_jax.mplug2 import convert as mplug2_convert
        if mplug2_convert.is_converted_dir(path):
            raise ValueError(f"{path} is a converted mPLUG-2 checkpoint: pass task='video_qa' or "
                             "'video_caption' (--task) and videos")
        if os.path.isfile(os.path.join(path, "mplug_config.json")):
            if task is None:
                raise ValueError(f"{path} is a converted official checkpoint, which does not "
                                 f"say its task: pass task= / --task, one of {TASKS}")
            from mplug_jax.interop import convert
            conv = convert.load_converted(path)
            return cls(conv.model, conv.params, task, settings=Settings.for_task(task, **settings))
        if not os.path.isfile(os.path.join(path, workdir.CONFIG)):
            raise FileNotFoundError(
                f"{path} is neither a workdir of ours ({workdir.CONFIG}) nor a `mplug-jax "
                "convert` directory (mplug_config.json); convert official .pth files first")
        config = workdir.read_config(path)
        trained = config.task.name
        if trained in VIDEO_WORKDIR_TASKS:
            if task is not None:
                raise ValueError(f"{path} holds an mPLUG-2 {trained!r} checkpoint, not a "
                                 f"{task!r} one: it takes videos (task "
                                 f"{VIDEO_WORKDIR_TASKS[trained]!r})")
            return VideoPredictor.from_checkpoint(path, step=step, **settings)
        prompt = ""
        if trained == "pretrain":
            if task != "caption":
                raise ValueError(
                    f"{path} is a pretraining workdir: it can caption zero-shot (task="
                    f"'caption', prompt {ZERO_SHOT_PROMPT!r}); for VQA fine-tune it first "
                    "(configs/vqa.py with --config.init.checkpoint=" + path + ")")
            prompt = ZERO_SHOT_PROMPT
        elif task is not None and task != trained:
            raise ValueError(f"{path} holds a {trained!r} checkpoint, not a {task!r} one "
                             f"(wrong task); pass task={trained!r} or another checkpoint")
        task = task or trained
        if task not in TASKS:
            raise ValueError(f"{path} holds a {trained!r} checkpoint; predict handles {TASKS}")
        params = workdir.restore_params(path, step=step or None).params
        model = tasks.model(config)
        # The run's own generation settings (e.g. a tiny model's shorter captions) first.
        trained_settings = run_generation_settings(config) if trained == task else {}
        return cls(model, params, task, prompt=prompt, settings=Settings.for_task(
            task, **{**trained_settings, **{k: v for k, v in settings.items() if v is not None}}))

    # ---- inputs ---------------------------------------------------------------------------

    def load_image(self, image: Any) -> np.ndarray:
        """Path / PIL image / uint8 array -> float32[R, R, 3] (official test transform);
        FileNotFoundError or ValueError naming the input when it cannot be used."""
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        if name is not None and not os.path.isfile(name):
            raise FileNotFoundError(f"image file {name} does not exist")
        try:
            img = transforms.decode_image(image, max_pixels=self.max_pixels)
        except transforms.BadRecord as err:
            raise ValueError(f"cannot use image {name or type(image).__name__}: {err}") from err
        return transforms.eval_transform(img, self.model.image_size)

    def encode_texts(self, texts: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
        """Questions / prompts -> (int32[B, L], int32[B, L]); empty or over-long -> ValueError."""
        texts = [t.strip() if isinstance(t, str) else t for t in texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise ValueError(f"{what} {i} is empty or not a string: {t!r}")
        ids, mask = self.tokenizer.encode(texts)
        if ids.shape[1] > self.model.max_len:
            longest = int(np.argmax(mask.sum(1)))
            raise ValueError(f"{what} {longest} has {int(mask[longest].sum())} tokens; the text "
                             f"encoder takes at most {self.model.max_len}")
        return ids, mask

    # ---- generation -----------------------------------------------------------------------

    def _search_fn(self, params, image, ids, mask):
        states, smask = _states(self.model, params, image, ids, mask)
        s = self.settings
        out = generate.beam_search(self.model, params, states, smask, beam_size=s.beam_size,
                                   min_length=s.min_length, max_length=s.max_length,
                                   official=s.official)
        return out["ids"][:, 0]

    def _generate(self, images: Sequence[Any], texts: Sequence[str] | None,
                  what: str) -> list[str]:
        if isinstance(images, (str, os.PathLike)) or (
                isinstance(images, np.ndarray) and images.ndim == 3):
            raise TypeError("pass a list of images (one path / array per example)")
        pixels = np.stack([self.load_image(x) for x in images])
        ids = mask = None
        if texts is not None:
            if len(texts) != len(images):
                raise ValueError(f"{len(images)} images but {len(texts)} {what}s")
            ids, mask = self.encode_texts(texts, what)
        out = np.asarray(export_cache.call(self._search, "predict.search", self._static,
                                           (self.params, pixels, ids, mask)))
        return [decode_text(row, self.prompt) for row in out]

    def _ground_fn(self, params, image, ids, mask):
        from mplug_jax.scoring import grounding as G
        states, smask = _states(self.model, params, image, ids, mask)
        return generate.coordinate_greedy(self.model, params, states, smask,
                                          first_id=G.FIRST_COORD_ID, num_bins=G.NUM_BINS,
                                          prefix_id=G.PREFIX_ID)

    def ground(self, images: Sequence[Any], phrases: Sequence[str], *,
               max_query_len: int = 20) -> list[list[float]]:
        """Grounding: the box [x1, y1, x2, y2] (original-image pixels, clipped to the image)
        each referring expression picks out in its image (official eval transform: long side
        resized, padded centred; CLIP normalisation as our training). Empty expression ->
        ValueError."""
        from mplug_jax.data.inputs import grounding as grounding_input
        from mplug_jax.evaluators.grounding import to_pixels
        from mplug_jax.scoring import grounding as G
        if self.task != "grounding":
            raise ValueError(f"this predictor's task is {self.task!r}; load a grounding "
                             "checkpoint to locate referring expressions")
        if isinstance(images, (str, os.PathLike)) or isinstance(phrases, str):
            raise TypeError("pass lists of images and phrases (one per example)")
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrases")
        ids, mask = grounding_input.encode_phrases(list(phrases), max_query_len)
        pixels, meta = [], []
        for image in images:
            name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
            if name is not None and not os.path.isfile(name):
                raise FileNotFoundError(f"image file {name} does not exist")
            try:
                img = transforms.decode_image(image, max_pixels=self.max_pixels)
            except transforms.BadRecord as err:
                raise ValueError(f"cannot use image {name or type(image).__name__}: "
                                 f"{err}") from err
            x, ratio, left, top = grounding_input.eval_transform(img, self.model.image_size)
            pixels.append(x)
            meta.append((ratio, left, top, img.size[0], img.size[1]))
        tokens = np.asarray(export_cache.call(self._ground, "predict.ground", self._static,
                                              (self.params, np.stack(pixels), ids, mask)))
        m = np.asarray(meta, np.float64)
        boxes, _ = to_pixels(G.tokens_to_coords(tokens), self.model.image_size, *m.T)
        return [[float(v) for v in b] for b in boxes]

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        """VQA: one answer per (image, question)."""
        if self.task != "vqa":
            raise ValueError(f"this predictor captions (task {self.task!r}); load a VQA "
                             "checkpoint to answer questions")
        return self._generate(images, questions, "question")

    def caption(self, images: Sequence[Any]) -> list[str]:
        """Captioning: one caption per image."""
        if self.task != "caption":
            raise ValueError(f"this predictor answers questions (task {self.task!r}); load a "
                             "caption or pretraining checkpoint to caption")
        prompts = [self.prompt] * len(images) if self.prompt else None
        return self._generate(images, prompts, "prompt")

    def __call__(self, image: Any, question: str | None = None) -> str:
        """One image: its answer to `question` (VQA), its caption, or (grounding) the box
        [x1, y1, x2, y2] that the expression `question` refers to."""
        if self.task == "grounding":
            if question is None:
                raise ValueError("a grounding checkpoint needs a referring expression")
            return self.ground([image], [question])[0]
        return answer_or_caption(self, image, question, "vqa")
