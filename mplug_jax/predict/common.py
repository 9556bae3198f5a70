"""What the image and video predictors share: generation `Settings`, the run's own generation
settings, the one-input call and the error for inputs of the wrong kind."""
from __future__ import annotations

import dataclasses
from typing import Any

TASKS = ("vqa", "caption", "grounding")
VIDEO_TASKS = ("video_qa", "video_caption")


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


def run_generation_settings(config) -> dict:
    """The generation settings a workdir's run config names (`task.generation`: beam_size,
    min_length, max_length), which take precedence over the official defaults."""
    gen = dict(config.task.get("generation") or {})
    return {k: gen[k] for k in ("beam_size", "min_length", "max_length") if k in gen}


def answer_or_caption(predictor, item: Any, question: str | None, qa_task: str,
                      kind: str = "") -> str:
    """One input's answer to `question` (a predictor of task `qa_task`) or its caption;
    ValueError for a missing / unexpected question. `kind` ('' or 'video') names the
    checkpoint in the errors."""
    qa_name, cap_name = ("video QA", "video caption") if kind == "video" else ("VQA", "caption")
    if predictor.task == qa_task:
        if question is None:
            raise ValueError(f"a {qa_name} checkpoint needs a question")
        return predictor.answer([item], [question])[0]
    if question is not None:
        raise ValueError(f"a {cap_name} checkpoint takes no question")
    return predictor.caption([item])[0]


def image_checkpoint_error(checkpoint: str, task: str) -> ValueError:
    """The error for videos given to an image checkpoint."""
    return ValueError(f"{checkpoint} is an image checkpoint (task {task!r}): it takes --image, "
                      "not --video; videos need an mPLUG-2 workdir (mplug2_video_qa / "
                      "mplug2_video_caption) or a converted mPLUG-2 directory with --task "
                      "video_qa / video_caption")
