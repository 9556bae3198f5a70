"""Official mPLUG text normalisation (`dataset/utils.py` pre_caption / pre_question) and the
caption choice of a record."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from mplug_jax.data.ops.image import BadRecord

_DELETE = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Normalise a caption as the official pretraining/retrieval datasets do.

    Lower-case, delete ``,.'!?"()*#:;~``, turn '-' and '/' into spaces, ``<person>`` into
    ``person``, collapse whitespace runs, strip, keep the first ``max_words`` words.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}: {caption!r}")
    caption = _DELETE.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Normalise a question as the official `pre_question` (no whitespace collapsing)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}: {question!r}")
    question = _DELETE.sub("", question.lower())
    question = question.replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def choose_caption(caption: Any, rng: np.random.Generator, max_words: int) -> str:
    """Official caption handling: a list -> one uniformly at random; then ``pre_caption``.

    Non-string entries of a list are ignored and bytes are decoded as UTF-8; anything else,
    or a caption that is empty after normalisation, raises ``BadRecord('bad_caption')``.
    """
    if isinstance(caption, (list, tuple)):
        options = [c for c in caption if isinstance(c, (str, bytes)) and
                   (c.decode("utf-8", "replace") if isinstance(c, bytes) else c).strip()]
        if not options:
            raise BadRecord("bad_caption", f"no usable caption in {caption!r:.80}")
        caption = options[int(rng.integers(len(options)))]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", "replace")
    if not isinstance(caption, str):
        raise BadRecord("bad_caption", f"caption of type {type(caption).__name__}")
    caption = pre_caption(caption, max_words)
    if not caption:
        raise BadRecord("bad_caption", "caption is empty after normalisation")
    return caption
