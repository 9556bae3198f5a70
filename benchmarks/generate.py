"""Generation benchmark: key/value cache vs official-style recomputation, per answer/caption.

Base dimensions (configs/common.py `model_config('base')`: 12-layer decoder, width 768,
30522-token vocabulary), random float32 weights, CPU. The decoder cross-attends to random
encoder states shaped as the real ones: VQA = image tokens + an 8-token question, length 10
(the official VQA max_length); caption = image tokens only, length 25 (the official caption
max_length). Lengths are forced (min_length = max_length, so [SEP] is banned at every step)
so that both implementations run the same number of steps. `use_cache=False` re-runs the
decoder on the whole prefix at every step, as the official `TextGenerator` (including the
cross-attention keys/values of the states); the cache computes those once and feeds one token
per step. Greedy and beam 5 (official beam search). Writes
``benchmarks/results/generate_cpu<N>.json`` and ``.png``.

    python benchmarks/generate.py            # base dims, 1 example, 3 repeats (~5 min on 2 cores)
    python benchmarks/generate.py --batch 4 --repeats 2   # 4 examples per call (~10 min)
    python benchmarks/generate.py --smoke    # tiny dims (tests)
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets sys.path for the package; no jax import)

CASES = (("vqa", 10), ("caption", 25))
SEARCHES = ("greedy", "beam5")
SMOKE_LENGTHS = {"vqa": 3, "caption": 4}


def build(dims: dict, batch: int, smoke: bool):
    """(decoder module, params, {task: (states, mask)}) for the benchmark dims."""
    import jax
    import jax.numpy as jnp

    from mplug_jax.models.decoder import TextDecoder
    from mplug_jax.models.mplug import MPLUG

    m = MPLUG.from_config(dims, dtype="float32", param_dtype="float32", remat_policy="none")
    dec = TextDecoder(depth=m.decoder_layers, vocab_size=m.vocab_size,
                      hidden_size=m.hidden_size, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                      max_len=m.max_len, type_vocab_size=m.type_vocab_size, eps=m.text_ln_eps,
                      scan_layers=m.scan_layers, remat_policy="none", opts=m.opts)
    n_img = (m.image_size // m.patch_size) ** 2 + 1
    key = jax.random.PRNGKey(0)
    inputs = {}
    for i, (task, extra) in enumerate((("vqa", 8), ("caption", 0))):
        states = jax.random.normal(jax.random.fold_in(key, i),
                                   (batch, n_img + extra, m.hidden_size), jnp.float32)
        inputs[task] = (states, jnp.ones(states.shape[:2], jnp.int32))
    ids = jnp.full((batch, 2), 101, jnp.int32)
    params = common.make_params(dec.init, key, ids, jnp.ones_like(ids), *inputs["vqa"],
                                constant=smoke)
    import flax.linen as nn
    return dec, nn.meta.unbox(params)["params"], inputs, n_img


def search_fn(dec, search: str, length: int, use_cache: bool):
    """Jitted (params, states, mask) -> output of a forced-length search."""
    import jax

    from mplug_jax import generate

    if search == "greedy":
        return jax.jit(lambda p, s, m: generate.greedy(
            dec, p, s, m, length + 1, min_length=length, use_cache=use_cache))
    return jax.jit(lambda p, s, m: generate.beam_search(
        dec, p, s, m, beam_size=5, min_length=length, max_length=length, use_cache=use_cache)
        ["ids"])


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args, threads, run = common.model_bench_args(
        __doc__.splitlines()[0], argv, extra=lambda p: p.set_defaults(batch=1, repeats=3))
    from configs.common import model_config

    dims = dict(model_config("tiny" if args.smoke else "base"))
    repeats, batch = run["repeats"], 1 if args.smoke else run["batch"]
    res: dict = {"benchmark": "generate", "device": common.machine_info(), "threads": threads,
                 "load_avg_start": common.load_average(),
                 "settings": {"model": "tiny" if args.smoke else "base", "batch": batch,
                              "repeats": repeats, "warmup": 1, "dtype": "float32",
                              "weights": "constant 0.02" if args.smoke else "random",
                              "smoke": args.smoke, "quick": args.quick, "beam_size": 5,
                              "forced_lengths": "min_length = max_length",
                              "timing": "whole jitted search, wall clock, block_until_ready, "
                                        "median; cache / recompute timed round-robin"},
                 "rows": {}}
    dec, params, inputs, n_img = build(dims, batch, args.smoke)
    res["settings"]["image_tokens"] = n_img
    for task, length in CASES:
        length = SMOKE_LENGTHS[task] if args.smoke else length
        states, mask = inputs[task]
        for search in SEARCHES:
            calls = {("cache" if c else "recompute"): (search_fn(dec, search, length, c),
                                                       (params, states, mask))
                     for c in (True, False)}
            timed = common.time_interleaved(calls, repeats=repeats)
            name = f"{task}_{search}"
            row = {"task": task, "search": search, "length": length,
                   "states": int(states.shape[1])}
            for k, t in timed.items():
                row[f"{k}_times_s"], row[f"{k}_median_s"] = t["times_s"], t["median_s"]
                row[f"{k}_warmup_s"] = t["warmup_s"]
                row[f"{k}_per_answer_s"] = t["median_s"] / batch
            row["speedup"] = common.ratio(row["recompute_median_s"], row["cache_median_s"])
            res["rows"][name] = row
            print(f"{name:<16} L={length:<3} recompute {row['recompute_per_answer_s']:8.3f} s  "
                  f"cache {row['cache_per_answer_s']:8.3f} s  speedup "
                  f"{common.fmt(row['speedup'], '.1f')}x", flush=True)
    res["load_avg_end"] = common.load_average()
    res["runtime_s"] = time.perf_counter() - t_start
    tag = "smoke_" if args.smoke else "" if batch == 1 else f"b{batch}_"
    stem = os.path.join(args.out_dir, f"generate_{tag}cpu{res['device']['cpus']}")
    names = list(res["rows"])
    return common.write_results(stem, res, t_start, lambda png: common.bar_plot(
        png, [f"{n} (L={res['rows'][n]['length']})" for n in names],
        {"recompute (official style)": [res["rows"][n]["recompute_per_answer_s"] for n in names],
         "KV cache": [res["rows"][n]["cache_per_answer_s"] for n in names]},
        title=f"generation per answer, {res['settings']['model']} dims, float32, "
              f"{res['device']['device_kind']}, {args.threads} threads, load "
              f"{res['load_avg_start'][0]:.1f}", xlabel="seconds per answer / caption"))


if __name__ == "__main__":
    main()
