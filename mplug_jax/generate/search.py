"""`make_search`: any search of `mplug_jax.generate` jitted over a device mesh."""
from __future__ import annotations

import contextlib

import jax
from jax.sharding import NamedSharding, PartitionSpec

from mplug_jax import sharding as shd
from mplug_jax.generate.beam import beam_search
from mplug_jax.generate.decode import greedy, sample
from mplug_jax.models import layers

_BEAM_OUTPUTS = ("ids", "lengths", "scores", "end_step")
_TRACE_OUTPUTS = ("hyp_ids", "hyp_lengths", "hyp_scores", "hyp_count", "trace_token",
                  "trace_parent", "trace_score", "trace_cum_logprob")
SEARCHES = ("greedy", "beam", "sample")


def make_search(model, mesh, param_shardings, kind: str, *, rules: tuple | None = None,
                **settings):
    """A search jitted over `mesh`: the batch is split over the ('data', 'fsdp') axes, the
    params follow `param_shardings` (e.g. `TrainState.params` shardings of the trainer).

    Args:
      model: the MPLUG module (or a TextDecoder), as for the searches themselves.
      mesh: a `sharding.make_mesh` mesh.
      param_shardings: a tree of NamedShardings matching params (or one sharding for all).
      kind: 'greedy' (settings: max_len and greedy's keywords), 'beam' (beam_search's
        keywords) or 'sample' (sample's keywords, max_len included).
      rules: logical-axis rules (`sharding.rules(preset)`) for the model's activation
        constraints; None traces without them.
    Returns:
      fn(params, states float[B, S, D], states_mask int[B, S][, key]) -> the search's output
      (key only for 'sample'), every output split over the batch shards along its example
      axis (axis 1 of the per-step trace arrays). B must be divisible by the number of batch
      shards (mesh data * fsdp), else ValueError.
    """
    if kind not in SEARCHES:
        raise ValueError(f"unknown search kind {kind!r}; valid: {SEARCHES}")
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = shd.batch_sharding(mesh)
    if kind == "greedy":
        if "max_len" not in settings:
            raise ValueError("make_search('greedy') needs max_len=")

        def fn(params, states, states_mask):
            return greedy(model, params, states, states_mask, **settings)
        out = batch
    elif kind == "beam":
        def fn(params, states, states_mask):
            return beam_search(model, params, states, states_mask, **settings)
        trace = NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES))
        names = _BEAM_OUTPUTS + (_TRACE_OUTPUTS if settings.get("return_trace") else ())
        out = {n: trace if n.startswith("trace_") else batch for n in names}
    else:
        if "max_len" not in settings:
            raise ValueError("make_search('sample') needs max_len=")

        def fn(params, states, states_mask, key):
            return sample(model, params, states, states_mask, key, **settings)
        out = {n: batch for n in ("ids", "lengths", "logprobs")}
    in_shardings = (param_shardings, batch, batch) + ((shd.replicated(mesh),)
                                                      if kind == "sample" else ())
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out)

    def run(params, states, states_mask, *key):
        if kind == "sample" and len(key) != 1:
            raise ValueError("the 'sample' search takes (params, states, states_mask, key)")
        if kind != "sample" and key:
            raise ValueError(f"the {kind!r} search takes (params, states, states_mask) only")
        if states.ndim < 1 or states.shape[0] % n_shards:
            raise ValueError(f"batch {states.shape[0] if states.ndim else None} is not divisible "
                             f"by the {n_shards} batch shards of mesh {dict(mesh.shape)} "
                             "(data x fsdp); pad the batch")
        args = jax.device_put((params, states, states_mask) + key, in_shardings)
        ctx = layers.activation_sharding(rules) if rules else contextlib.nullcontext()
        with jax.set_mesh(mesh), ctx:
            return jitted(*args)

    return run
