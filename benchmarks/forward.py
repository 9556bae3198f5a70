"""Per-component forward times of mPLUG-base vs the official PyTorch CPU numbers.

Settings are those of docs/official-timing.md: float32, random weights, batch 4,
ViT-B/16 at 224 px (197 visual tokens), question 30 tokens (no padding), answer 10 tokens,
median of 5 timed calls after 1 warm-up, wall clock, 2 CPU threads. Each component is one
jitted function; rows: visual encoder, text encoder, fusion at stride 1/3/6, text decoder
(12 layers teacher-forced on 10 tokens over 197 + 30 states, with the 30522-way LM head), one
co-attention layer, one connected layer, and the full VQA training forward at stride 3 (visual
+ text + fusion + decoder + loss, as `mplug_jax.parity.vqa_caption.official_forward` + `token_nll`).

Threads: before JAX is imported we set
XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2" and pin the
process to 2 cores (`os.sched_setaffinity`); XLA:CPU sizes its Eigen pool from those cores.

Profiling experiments (`--experiments`, on by default in full runs) time what limits each part:
decoder stack vs LM head, LM-head layouts, matmul precision, XLA cost analysis (GFLOP/s).

    python benchmarks/forward.py [--repeats 5] [--batch 4] [--out-dir DIR] [--no-experiments]
    python benchmarks/forward.py --quick      # base dims, 3 repeats, no experiments
    python benchmarks/forward.py --smoke      # tiny model, seconds; used by the smoke test

Prints (and records as `runtime_s`) its total runtime.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets sys.path to the repo root; must not import jax)

OFFICIAL_NOTE = "docs/official-timing.md (AliceMind a6d5afe, torch 2.13 CPU)"
# name -> (what runs, official median seconds)
ROWS = {
    "visual": ("visual encoder: 12 ViT-B/16 blocks on B x 197 tokens, through ln_post", 1.359),
    "text": ("text encoder: 6 BERT layers on B x 30 tokens", 0.119),
    "fusion_S1": ("fusion, stride 1: 1 co-attention + 5 connected", 0.601),
    "fusion_S3": ("fusion, stride 3 (official base): 5 co-attention + 1 connected", 0.277),
    "fusion_S6": ("fusion, stride 6: 6 co-attention", 0.216),
    "decoder": ("text decoder: 12 layers on 10 tokens over 197+30 states + 30522-way LM head",
                0.376),
    "layer_coattn": ("one co-attention layer: text self-attn + cross-attn to 197 + FFN", 0.036),
    "layer_connected": ("one connected layer: self-attn + FFN over 227 tokens", 0.114),
    "vqa_forward_S3": ("full VQA training forward, stride 3: visual+text+fusion+decoder+loss",
                       1.917),
}
BASE = dict(variant="base", image_size=224, text_tokens=30, answer_tokens=10)
SMOKE = dict(variant="tiny", image_size=32, text_tokens=5, answer_tokens=4)


def build(dims: dict, batch: int, smoke: bool) -> dict:
    """Model, params, inputs and one forward fn per row: {name: (fn, args)}."""
    import functools

    import jax
    import jax.numpy as jnp

    from configs.common import model_config
    from mplug_jax.parity.vqa_caption import token_nll
    from mplug_jax.models.fusion import FusionLayer
    from mplug_jax.models.mplug import MPLUG

    jit = not smoke
    model = MPLUG.from_config(model_config(dims["variant"]), image_size=dims["image_size"],
                              fusion_stride=3)
    d, n_img = model.hidden_size, (dims["image_size"] // model.patch_size) ** 2 + 1
    ks = jax.random.split(jax.random.PRNGKey(0), 12)
    image = jax.random.normal(ks[0], (batch, dims["image_size"], dims["image_size"], 3))
    ids = jax.random.randint(ks[1], (batch, dims["text_tokens"]), 1000, model.vocab_size)
    mask = jnp.ones_like(ids)
    tgt = jax.random.randint(ks[2], (batch, dims["answer_tokens"]), 1000, model.vocab_size)
    tgt_mask = jnp.ones_like(tgt)
    labels, weights = tgt, jnp.ones((batch,), jnp.float32)  # one answer per question
    img = jax.random.normal(ks[3], (batch, n_img, d))
    txt = jax.random.normal(ks[4], (batch, dims["text_tokens"], d))
    states = jnp.concatenate([img, txt], 1)
    states_mask = jnp.ones(states.shape[:2], jnp.int32)

    params = common.make_params(model.init, ks[5], image, ids, mask, tgt, tgt_mask,
                                constant=smoke)
    rows: dict = {}

    def apply(m, method):
        return common.maybe_jit(functools.partial(m.apply, method=method), jit)

    rows["visual"] = (apply(model, "encode_image"), (params, image))
    rows["text"] = (apply(model, "encode_text"), (params, ids, mask))
    for s in (1, 3, 6):
        m = model.clone(fusion_stride=s)
        p = params if s == 3 else common.make_params(functools.partial(m.init, method="fuse"),
                                                     ks[5 + s], img, txt, mask, constant=smoke)
        rows[f"fusion_S{s}"] = (apply(m, "fuse"), (p, img, txt, mask))
    rows["decoder"] = (apply(model, "decode"), (params, tgt, tgt_mask, states, states_mask))
    for name, kind in (("layer_coattn", "a"), ("layer_connected", "c")):
        layer = FusionLayer(kind=kind, num_heads=model.num_heads, mlp_dim=model.mlp_dim)
        p = common.make_params(layer.init, ks[11], img, txt, mask, constant=smoke)
        rows[name] = (common.maybe_jit(layer.apply, jit), (p, img, txt, mask))

    def vqa_loss(v, image, ids, mask, tgt, tgt_mask, labels, weights):
        """parity.official_forward (task 'vqa', k = 1 answer per question) + weighted NLL."""
        i = model.apply(v, image, method="encode_image")
        t = model.apply(v, ids, mask, method="encode_text")
        f_img, f_txt = model.apply(v, i, t, mask, method="fuse")
        st = jnp.concatenate([f_img, f_txt], 1)
        st_mask = jnp.concatenate([jnp.ones(f_img.shape[:2], mask.dtype), mask], 1)
        logits = model.apply(v, tgt, tgt_mask, st, st_mask, method="decode")
        nll, _ = token_nll(logits, labels)
        return (weights * nll.sum(1)).sum() / image.shape[0]

    rows["vqa_forward_S3"] = (common.maybe_jit(vqa_loss, jit),
                              (params, image, ids, mask, tgt, tgt_mask, labels, weights))
    return {"model": model, "params": params, "rows": rows, "h": jax.random.normal(
        ks[6], (batch, dims["answer_tokens"], d)), "states": states, "ids": tgt,
        "states_mask": states_mask, "mask": tgt_mask, "image": image, "n_img": n_img}


def flops_of(fn, args) -> float | None:
    """XLA's flop estimate for the compiled `fn(*args)` (None if unavailable)."""
    import jax

    try:
        lowered = jax.jit(fn).lower(*args)
        cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops")) if cost and cost.get("flops") is not None else None
    except Exception:  # noqa: BLE001  (cost analysis is best-effort diagnostics)
        return None


def experiments(b: dict, res: dict, repeats: int, jit: bool) -> dict:
    """What limits each component: FLOP rates, decoder stack vs LM head, LM-head layout,
    matmul precision. Every number here is measured in this run."""
    import jax
    import jax.numpy as jnp

    model, params = b["model"], b["params"]
    out: dict = {}

    # 1. Achieved GFLOP/s (ours and the official time against the same XLA flop count).
    rates = {}
    for name, (fn, args) in b["rows"].items():
        fl = flops_of(fn, args)
        ours = res["rows"][name]["ours_median_s"]
        off = ROWS[name][1]
        rates[name] = {"gflop": None if fl is None else fl / 1e9,
                       "ours_gflop_per_s": common.ratio(fl and fl / 1e9, ours),
                       "official_gflop_per_s": common.ratio(fl and fl / 1e9, off)}
    out["gflop_rates"] = rates

    # 2. Decoder: stack of 12 layers vs the tied 30522-way LM head.
    def dec_hidden(v, ids, mask, st, st_mask):
        return model.apply(v, ids, mask, st, st_mask, method=lambda m, *a: m.decoder.hidden(*a))

    def lm_head(v, h):
        return model.apply(v, h, method=lambda m, x: m.decoder.lm_logits(x))

    table = params["params"]["decoder"]["embeddings"]["word"]["embedding"]
    table = getattr(table, "value", table)
    table_t = jnp.asarray(table).T.copy()  # float[D, V]: the layout a [D, V] kernel would have

    def lm_head_dv(v, h, table_t):
        """Same math with the output table stored transposed (float[D, V])."""
        def f(m, x):
            x = m.decoder.lm_ln(jax.nn.gelu(m.decoder.lm_transform(x), approximate=False))
            return x @ table_t + m.decoder.lm_bias
        return model.apply(v, h, method=f)

    dec_args = (params, b["ids"], b["mask"], b["states"], b["states_mask"])
    parts = {"decoder_stack_only": (dec_hidden, dec_args),
             "lm_head_only [V,D] table (ours)": (lm_head, (params, b["h"])),
             "lm_head_only [D,V] table (experiment)": (lm_head_dv, (params, b["h"], table_t))}
    out["decoder_split"] = {}
    for name, (fn, args) in parts.items():
        r = common.time_call(common.maybe_jit(fn, jit), *args, repeats=repeats)
        out["decoder_split"][name] = r["median_s"]
        print(f"  experiment {name:<40} {r['median_s']:.4f} s", flush=True)

    # 3. Matmul precision (CPU float32 matmuls should not depend on it).
    out["matmul_precision"] = {}
    for prec in ("highest", "bfloat16"):
        with jax.default_matmul_precision(prec):
            for name in ("decoder", "layer_connected"):
                fn, args = b["rows"][name]  # jit retraces: the precision is in its cache key
                r = common.time_call(fn, *args, repeats=repeats)
                out["matmul_precision"][f"{name} @ {prec}"] = r["median_s"]
                print(f"  experiment {name} @ precision {prec:<10} {r['median_s']:.4f} s",
                      flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()

    def experiments_flag(p):
        p.add_argument("--experiments", action=argparse.BooleanOptionalAction, default=None,
                       help="profiling experiments (default: on, off with --smoke / --quick)")

    args, threads, run = common.model_bench_args(__doc__.splitlines()[0], argv,
                                                 experiments_flag)
    dims = SMOKE if args.smoke else BASE
    repeats, batch = run["repeats"], run["batch"]
    run_exp = (not (args.smoke or args.quick)) if args.experiments is None else args.experiments

    res: dict = {"benchmark": "forward", "device": common.machine_info(), "threads": threads,
                 "load_avg_start": common.load_average(),
                 "settings": {**dims, "batch": batch, "repeats": repeats, "warmup": 1,
                              "dtype": "float32", "weights": "random" if not args.smoke else
                              "constant 0.02", "fusion_stride_full_model": 3,
                              "jit": not args.smoke, "smoke": args.smoke,
                              "quick": args.quick,
                              "timing": "wall clock, block_until_ready, median; components "
                                        "timed round-robin"},
                 "official": {"source": OFFICIAL_NOTE}, "rows": {}}
    b = build(dims, batch, args.smoke)
    res["settings"]["image_tokens"] = b["n_img"]
    timed = common.time_interleaved(b["rows"], repeats=repeats)
    for name, r in timed.items():
        off = ROWS[name][1]
        res["rows"][name] = {"what": ROWS[name][0], "ours_median_s": r["median_s"],
                             "official_median_s": off,
                             "official_over_ours": common.ratio(off, r["median_s"]),
                             "ours_times_s": r["times_s"], "ours_warmup_s": r["warmup_s"]}
        print(f"{name:<16} ours {r['median_s']:.4f} s  official {off:.3f} s  "
              f"official/ours {off / r['median_s']:.2f}", flush=True)
    res["experiments"] = experiments(b, res, repeats, not args.smoke) if run_exp else {}
    res["load_avg_end"] = common.load_average()
    res["runtime_s"] = time.perf_counter() - t_start

    print(f"\nforward times, {res['device']['device_kind']}, jax {res['device']['jax']}, batch "
          f"{batch}, median of {repeats}, load avg {res['load_avg_start'][0]:.1f} -> "
          f"{res['load_avg_end'][0]:.1f}")
    print(f"{'component':<16} {'ours s':>8} {'official s':>10} {'official/ours':>14}")
    for name, r in res["rows"].items():
        print(f"{name:<16} {r['ours_median_s']:>8.4f} {r['official_median_s']:>10.3f} "
              f"{common.fmt(r['official_over_ours'], '.2f'):>14}")

    stem = os.path.join(args.out_dir, f"forward_{'smoke_' if args.smoke else ''}"
                                      f"cpu{res['device']['cpus']}")
    names = list(res["rows"])
    return common.write_results(stem, res, t_start, lambda png: common.bar_plot(
        png, names,
        {"ours (JAX)": [res["rows"][n]["ours_median_s"] for n in names],
         "official PyTorch (note)": [res["rows"][n]["official_median_s"] for n in names]},
        title=f"mPLUG-base forward, B={batch}, float32, {res['device']['device_kind']}"
              f", {args.threads} threads, load {res['load_avg_start'][0]:.1f}"))


if __name__ == "__main__":
    main()
