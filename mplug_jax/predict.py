"""Answer a question about a photo, caption it, or locate a referring expression in it, from a
checkpoint: the Python API behind `mplug-jax predict`.

    from mplug_jax.predict import Predictor
    vqa = Predictor.from_checkpoint("runs/vqa_base")                 # a VQA workdir of ours
    vqa.answer(["photo.jpg"], ["what is the man holding?"])          # -> ['a frisbee']
    cap = Predictor.from_checkpoint("converted/", task="caption")   # `mplug-jax convert` dir
    cap.caption(["photo.jpg"])
    grd = Predictor.from_checkpoint("runs/grounding")                # a grounding workdir
    grd.ground(["photo.jpg"], ["the man on the left"])               # -> [[x1, y1, x2, y2]]
    vid = Predictor.from_checkpoint("runs/m2vqa")                    # an mPLUG-2 video workdir
    vid.answer(["clip.mp4"], ["which way does it move?"])            # -> a VideoPredictor
    Predictor.from_checkpoint("runs/m2cap").caption(["frames_dir/"])  # video captioning

Generation is the official one (beam 5, docs/fixtures.md#generation-settings): VQA from the fused
[image; question] states (min 1, max 10 tokens), captions from the image states alone (min 8,
max 25; a workdir's own `task.generation` settings take precedence), texts post-processed as
the official evaluation. A pretraining workdir captions zero-shot: the prompt "a picture of"
goes through the text encoder and fusion as a prefix (the pretraining prefix-LM split, paper
section 5.3), the decoder continues it from [CLS].

Video (`VideoPredictor`, returned by `Predictor.from_checkpoint` for an mPLUG-2 workdir of task
`mplug2_video_qa` or `mplug2_video_caption`, or a `mplug-jax convert` mPLUG-2 directory with
task 'video_qa' / 'video_caption'): a video file (PyAV or OpenCV) or a folder of frame images,
`model.num_frames` frames at the segment middles and the release's test transform
(`data.video.eval_clip`: nearest resize, CLIP normalisation); answers by the official beam
search over [fused video; fused question] (5 / 1 / 10), captions over the video's image_embeds
from [CLS] (5 / 4 / 20), the prompt split off as the release does.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate, tasks
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.scoring.caption import decode_text
from mplug_jax.tasks import base

TASKS = ("vqa", "caption", "grounding")
VIDEO_TASKS = ("video_qa", "video_caption")
# mPLUG-2 workdir task names -> video predictor tasks.
_VIDEO_WORKDIR_TASKS = {"mplug2.video_qa": "video_qa", "mplug2.video_caption": "video_caption"}
ZERO_SHOT_PROMPT = "a picture of"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Generation settings of one task (official values by default)."""

    beam_size: int = 5
    min_length: int = 1
    max_length: int = 10
    official: bool = True  # docs/fixtures.md#official-beam-search, or the standard one

    def __post_init__(self):
        if self.beam_size < 1 or self.max_length < 1 or self.min_length < 0:
            raise ValueError(f"generation needs beam_size >= 1, max_length >= 1 and "
                             f"min_length >= 0, got {self.beam_size} / {self.max_length} / "
                             f"{self.min_length}")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} is above max_length "
                             f"{self.max_length}: no output could satisfy both")

    @classmethod
    def for_task(cls, task: str, **overrides) -> "Settings":
        """Official defaults of `task` (grounding ignores them: 4 greedy coordinate tokens)."""
        base = cls() if task == "vqa" else cls(min_length=8, max_length=25)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items()
                                            if v is not None})

    @classmethod
    def for_video_task(cls, task: str, **overrides) -> "Settings":
        """The mPLUG-2 release's defaults: video QA 5 / 1 / 10, video caption 5 / 4 / 20."""
        base = cls() if task == "video_qa" else cls(min_length=4, max_length=20)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items()
                                            if v is not None})


def _states(model, params, image, ids, mask):
    """Decoder states: image embeddings alone (ids None), else [fused image; fused text]."""
    def apply(p, method, *args, rng=None):
        return model.apply({"params": p}, *args, method=method)

    img = apply(params, "encode_image", image)
    if ids is None:
        return img, jnp.ones(img.shape[:2], jnp.int32)
    return base.fused_states(apply, params, img, ids, mask)


def image_checkpoint_error(checkpoint: str, task: str) -> ValueError:
    """The error for videos given to an image checkpoint."""
    return ValueError(f"{checkpoint} is an image checkpoint (task {task!r}): it takes --image, "
                      "not --video; videos need an mPLUG-2 workdir (mplug2_video_qa / "
                      "mplug2_video_caption) or a converted mPLUG-2 directory with --task "
                      "video_qa / video_caption")


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
        if trained in _VIDEO_WORKDIR_TASKS:
            if task is not None:
                raise ValueError(f"{path} holds an mPLUG-2 {trained!r} checkpoint, not a "
                                 f"{task!r} one: it takes videos (task "
                                 f"{_VIDEO_WORKDIR_TASKS[trained]!r})")
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
        gen = (config.task.get("generation") or {}) if trained == task else {}
        trained_settings = {k: gen[k] for k in ("beam_size", "min_length", "max_length")
                            if k in gen}
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
        out = np.asarray(self._search(self.params, pixels, ids, mask))
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
        tokens = np.asarray(self._ground(self.params, np.stack(pixels), ids, mask))
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
        if self.task == "vqa":
            if question is None:
                raise ValueError("a VQA checkpoint needs a question")
            return self.answer([image], [question])[0]
        if question is not None:
            raise ValueError("a caption checkpoint takes no question")
        return self.caption([image])[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _video_search(model, settings: Settings, params, video, ids, mask):
    """Top beam-search ids int32[B, max_length + 1] of video float32[B, T, R, R, 3]: over
    [fused video; fused question] (ids / mask int32[B, Lq]) or, ids None, over the video's
    image_embeds. Jitted once per (model, settings), shared by every predictor."""
    from mplug_jax.mplug2 import model as mplug2
    from mplug_jax.mplug2.tasks import video_qa as qa
    if ids is None:
        img = model.apply({"params": params}, video, method=qa.video_embeds)
        states, smask = img, jnp.ones(img.shape[:2], jnp.int32)
    else:
        states, smask = model.apply({"params": params}, video, ids, mask,
                                    method=qa.video_states)
    return generate.beam_search(mplug2.decoder_module(model), params["decoder"], states, smask,
                                beam_size=settings.beam_size, min_length=settings.min_length,
                                max_length=settings.max_length,
                                official=settings.official)["ids"][:, 0]


class VideoPredictor:
    """mPLUG-2 video QA answers or video captions (see module docstring).

    Args:
      model: the `MPLUG2` module; params: its parameter tree.
      task: 'video_qa' or 'video_caption'.
      prompt: the caption prompt split off the output (release post-processing; '' = none).
      settings: generation settings (QA 5 / 1 / 10, caption 5 / 4 / 20 by default).
      num_frames: frames sampled per video (default `model.num_frames`).
      max_question_tokens: questions are cut to this many ids ([CLS] included).
    """

    def __init__(self, model, params, task: str, *, prompt: str = "",
                 settings: Settings | None = None, num_frames: int | None = None,
                 max_question_tokens: int = 50):
        if task not in VIDEO_TASKS:
            raise ValueError(f"video task must be one of {VIDEO_TASKS}, got {task!r}")
        self.model, self.params, self.task, self.prompt = model, params, task, prompt
        self.settings = settings or Settings.for_video_task(task)
        self.num_frames = int(num_frames or model.num_frames)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        self.max_question_tokens = int(max_question_tokens)
        self.tokenizer = get_tokenizer()

    @classmethod
    def from_checkpoint(cls, path: str, task: str | None = None, *, step: int = 0,
                        **settings) -> "VideoPredictor":
        """From an mPLUG-2 video workdir of ours (its task, generation settings, prompt and
        frames from its config) or a `mplug-jax convert` mPLUG-2 directory (`task`
        required: 'video_qa' or 'video_caption')."""
        from mplug_jax import workdir
        from mplug_jax.mplug2 import convert as mplug2_convert
        path = os.fspath(path)
        overrides = {k: v for k, v in settings.items() if v is not None}
        if mplug2_convert.is_converted_dir(path):
            if task not in VIDEO_TASKS:
                raise ValueError(f"{path} is a converted mPLUG-2 checkpoint: pass task= / "
                                 f"--task, one of {VIDEO_TASKS}")
            conv = mplug2_convert.load_converted(path)
            return cls(conv.model, conv.params, task,
                       prompt="a video of" if task == "video_caption" else "",
                       settings=Settings.for_video_task(task, **overrides))
        if not os.path.isfile(os.path.join(path, workdir.CONFIG)):
            raise FileNotFoundError(f"{path} is neither a workdir of ours ({workdir.CONFIG}) "
                                    "nor a `mplug-jax convert` mPLUG-2 directory")
        config = workdir.read_config(path)
        trained = _VIDEO_WORKDIR_TASKS.get(tasks.canonical(config.task.name))
        if trained is None:
            raise image_checkpoint_error(path, config.task.name)
        if task is not None and task != trained:
            raise ValueError(f"{path} holds a {config.task.name!r} checkpoint, not a {task!r} "
                             "one (wrong task)")
        params = workdir.restore_params(path, step=step or None).params
        model = tasks.model(config)
        gen = dict(config.task.get("generation") or {})
        mine = {k: gen[k] for k in ("beam_size", "min_length", "max_length") if k in gen}
        prompt = str(config.task.get("prompt", "") or "") if trained == "video_caption" else ""
        lq = int(config.input.get("max_question_tokens", 50) or 50)
        return cls(model, params, trained, prompt=prompt, max_question_tokens=lq,
                   settings=Settings.for_video_task(trained, **{**mine, **overrides}))

    def load_video(self, path: Any) -> np.ndarray:
        """Video file or frame folder -> float32[T, R, R, 3] (segment-middle frames, the
        release's test transform); FileNotFoundError / ValueError naming it when unusable."""
        from mplug_jax.data.ops import video as video_lib
        from mplug_jax.data.ops.image import BadRecord, DataError
        name = os.fspath(path)
        if not os.path.exists(name):
            raise FileNotFoundError(f"video {name} does not exist (a video file or a folder of "
                                    "frame images)")
        try:
            frames = video_lib.load_frames(name, self.num_frames)
            return video_lib.eval_clip(frames, self.model.image_size)
        except BadRecord as err:
            raise ValueError(f"cannot use video {name}: no decodable frame ({err})") from err
        except DataError as err:
            raise ValueError(f"cannot decode video {name}: {err}") from err

    def _generate(self, videos: Sequence[Any], questions: Sequence[str] | None) -> list[str]:
        if isinstance(videos, (str, os.PathLike)):
            raise TypeError("pass a list of videos (one path per example)")
        clips = np.stack([self.load_video(v) for v in videos])
        ids = mask = None
        if questions is not None:
            from mplug_jax.data.ops import text
            if isinstance(questions, str):
                raise TypeError("pass a list of questions (one per video)")
            if len(questions) != len(videos):
                raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
            for i, q in enumerate(questions):
                if not isinstance(q, str) or not q.strip():
                    raise ValueError(f"question {i} is empty or not a string: {q!r}")
            # official test-time question processing: pre_question to 50 words
            ids, mask = self.tokenizer.encode([text.pre_question(q, 50) for q in questions],
                                              max_length=self.max_question_tokens)
        out = np.asarray(_video_search(self.model, self.settings, self.params, clips, ids, mask))
        texts = [self.tokenizer.decode_official([int(i) for i in row]) for row in out]
        if self.prompt:
            texts = [t.split(self.prompt)[-1].strip() for t in texts]
        return texts

    def answer(self, videos: Sequence[Any], questions: Sequence[str]) -> list[str]:
        """Video QA: one answer per (video, question)."""
        if self.task != "video_qa":
            raise ValueError(f"this predictor captions videos (task {self.task!r}); load a "
                             "video QA checkpoint to answer questions")
        return self._generate(videos, questions)

    def caption(self, videos: Sequence[Any]) -> list[str]:
        """Video captioning: one caption per video."""
        if self.task != "video_caption":
            raise ValueError(f"this predictor answers questions (task {self.task!r}); load a "
                             "video caption checkpoint to caption")
        return self._generate(videos, None)

    def __call__(self, video: Any, question: str | None = None) -> str:
        """One video: its answer to `question` (video QA) or its caption."""
        if self.task == "video_qa":
            if question is None:
                raise ValueError("a video QA checkpoint needs a question")
            return self.answer([video], [question])[0]
        if question is not None:
            raise ValueError("a video caption checkpoint takes no question")
        return self.caption([video])[0]
