"""bert-base-uncased WordPiece tokenizer with the official mPLUG conventions.

The official repo's tokenizer encodes one sequence as ``[CLS] tokens`` with NO trailing
``[SEP]``; answers and captions end in ``[SEP]`` only because the text "[SEP]" is appended
(`eos`) and kept whole as the special token 102. Generation starts at [CLS] and stops at [SEP].
"""
from __future__ import annotations

import functools
import importlib.resources
from typing import Sequence

import numpy as np

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
EOS = "[SEP]"
VOCAB_SIZE = 30522
# transformers' clean_up_tokenization replacements, in its order.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def vocab_path() -> str:
    """Path of the bert-base-uncased vocab.txt shipped in the package (30522 entries)."""
    return str(importlib.resources.files("mplug_jax") / "assets" / "bert-base-uncased-vocab.txt")


class Tokenizer:
    """Official-convention BERT tokenizer (lower-case, basic + WordPiece) on `tokenizers`."""

    def __init__(self, vocab_file: str | None = None):
        from tokenizers import BertWordPieceTokenizer
        from tokenizers.processors import TemplateProcessing

        tok = BertWordPieceTokenizer(vocab_file or vocab_path(), lowercase=True)
        tok.post_processor = TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A [SEP] $B:1", special_tokens=[("[CLS]", CLS_ID),
                                                                           ("[SEP]", SEP_ID)])
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        for name, want in (("[PAD]", PAD_ID), ("[UNK]", UNK_ID), ("[CLS]", CLS_ID),
                           ("[SEP]", SEP_ID), ("[MASK]", MASK_ID)):
            got = tok.token_to_id(name)
            if got != want:
                raise ValueError(f"vocab {vocab_file}: {name} has id {got}, expected {want}")

    def encode(self, texts: Sequence[str], max_length: int | None = None,
               pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise a batch: ``[CLS] tokens``, right-padded with 0 to the longest (or `pad_to`).

        Args:
          texts: strings; "[SEP]" inside a string stays the special token 102.
          max_length: truncate each sequence to this many ids ([CLS] included), like
            ``truncation=True, max_length=...`` in the official calls.
          pad_to: pad to this fixed length instead of the longest (requires max_length <= pad_to).
        Returns:
          (int32[B, L] ids, int32[B, L] attention mask with 1 = token, 0 = padding).
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, not a string: {t!r}")
        encs = self._tok.encode_batch(list(texts))
        ids = [e.ids[:max_length] if max_length else e.ids for e in encs]
        length = pad_to if pad_to is not None else max((len(x) for x in ids), default=1)
        if any(len(x) > length for x in ids):
            raise ValueError(f"a sequence has {max(len(x) for x in ids)} tokens, more than "
                             f"pad_to={pad_to}; pass max_length to truncate")
        out = np.zeros((len(ids), length), np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for i, x in enumerate(ids):
            out[i, :len(x)] = x
            mask[i, :len(x)] = 1
        return out, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text with [CLS]/[SEP]/[PAD] removed, as the official post-processing."""
        ids = [int(i) for i in ids]
        if SEP_ID in ids[1:]:
            ids = ids[: ids.index(SEP_ID, 1)]
        return self._tok.decode([i for i in ids if i not in (PAD_ID, CLS_ID, SEP_ID)],
                                skip_special_tokens=True).strip()

    def decode_official(self, ids: Sequence[int]) -> str:
        """The official evaluation's text of generated ids (docs/fixtures.md#post-processing):
        ``tokenizer.decode(ids).replace("[SEP]", "").replace("[CLS]", "").replace("[PAD]",
        "").strip()`` of transformers 4.26.1, reproduced token by token.

        Unlike `decode`, nothing is cut at the first [SEP]: a first generated ``##x`` glues
        onto [CLS] (``[CLS]ption`` -> ``ption``), an inner [SEP] leaves two spaces and the
        tokens after it stay, ``[unusedN]`` tokens stay as text.
        """
        tokens = []
        for i in ids:
            tok = self._tok.id_to_token(int(i))
            if tok is None:
                raise ValueError(f"id {int(i)} is outside the vocabulary ({self.vocab_size})")
            tokens.append(tok)
        s = " ".join(tokens).replace(" ##", "").strip()
        for a, b in _CLEAN_UP:
            s = s.replace(a, b)
        return s.replace("[SEP]", "").replace("[CLS]", "").replace("[PAD]", "").strip()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_file: str | None = None) -> Tokenizer:
    """Cached :class:`Tokenizer` (the shipped vocab by default)."""
    return Tokenizer(vocab_file)
