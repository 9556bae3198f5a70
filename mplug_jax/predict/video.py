"""`VideoPredictor`: mPLUG-2 video QA answers and video captions (see `mplug_jax.predict`)."""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate, tasks
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.predict.common import (VIDEO_TASKS, Settings, answer_or_caption,
                                      image_checkpoint_error, run_generation_settings)

# mPLUG-2 workdir task names -> video predictor tasks.
VIDEO_WORKDIR_TASKS = {"mplug2.video_qa": "video_qa", "mplug2.video_caption": "video_caption"}


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
        trained = VIDEO_WORKDIR_TASKS.get(tasks.canonical(config.task.name))
        if trained is None:
            raise image_checkpoint_error(path, config.task.name)
        if task is not None and task != trained:
            raise ValueError(f"{path} holds a {config.task.name!r} checkpoint, not a {task!r} "
                             "one (wrong task)")
        params = workdir.restore_params(path, step=step or None).params
        model = tasks.model(config)
        mine = run_generation_settings(config)
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
        return answer_or_caption(self, video, question, "video_qa", "video")
