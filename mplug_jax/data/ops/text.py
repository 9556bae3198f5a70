"""Official mPLUG text normalisation (`dataset/utils.py` pre_caption / pre_question)."""
import re

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
