"""Generation engine for the prefix-LM decoder, with a key/value cache.

The decoder reads each generated token once: `prefill` runs the prefix (usually [CLS] alone)
and computes the cross-attention keys/values of the encoder states; every later step feeds one
token at its position and attends over the cached keys/values (`TextDecoder.decode_step`).
Shapes are static (cache float[N, B, T, H, K] for T = max_len), so a whole search is one
`jax.jit`-able function; the loops are `lax.while_loop`s that stop once every row has ended.

Searches:
  greedy        argmax decoding -> int32[B, T] ([CLS] w1 .. [SEP] then [PAD]).
  beam_search   the official mPLUG beam search with all its quirks
                (docs/fixtures.md#official-beam-search), or (official=False) the standard beam
                search -> n-best ids / lengths / scores (+ optional per-step trace).
  sample        temperature / top-k / top-p sampling, N samples per example, with the
                log-probs of the samples (SCST).
  make_search   any of them jitted over a device mesh, the batch split over data / fsdp.

Modules: `decode` (the cache steps, greedy, sampling), `beam` (beam search), `search`
(`make_search`).

`model` is the `MPLUG` module (params = its full tree) or a bare `TextDecoder` (params = the
decoder's tree); the parameter tree is the one training uses, nothing is added to it.
"""
from __future__ import annotations

from mplug_jax.generate.beam import beam_search
from mplug_jax.generate.decode import (coordinate_greedy, decode_step, greedy, init_cache,
                                       prefill, sample)
from mplug_jax.generate.search import SEARCHES, make_search

__all__ = ["SEARCHES", "beam_search", "coordinate_greedy", "decode_step", "greedy", "init_cache",
           "make_search", "prefill", "sample"]
