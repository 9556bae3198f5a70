"""Forward time of the fusion encoder alone: skip strides and the paper's fusion networks.

Times `mplug_jax.models.fusion.FusionEncoder` (jitted, float32, random weights) at base
dimensions (hidden 768, 12 heads, FFN 3072, 6 running layers, 197 image + 30 text tokens,
batch 4) for the official skip rule ('skip' layout) at strides 1, 2, 3, 6 and for the fusion
networks the paper compares: all connected/merged attention ('connected'), symmetric
co-attention ('coattn'), asymmetric co-attention only ('asym') and skip-connected (S=3). Single
layers of each kind are timed too. Prints our time ratios next to the paper's and next to those
implied by the official PyTorch CPU timings (../shared/notes/official-cpu-timing.md), and writes
``benchmarks/results/fusion_cpu<N>.json`` and ``.png``.

    python benchmarks/fusion.py [--repeats 5] [--batch 4] [--threads 2] [--out-dir DIR]
    python benchmarks/fusion.py --smoke     # tiny dims, seconds; used by the smoke test
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets sys.path to the repo root; must not import jax)

PAPER_NOT_FOUND = "paper value not found"
# What we searched (search tool, corpora pages/docs/code, and exact-string search) for the
# paper's fusion-speed numbers; only abstracts, reviews and the official README came back.
PAPER_SEARCH_NOTE = (
    "Searched public pages/docs/code for mPLUG (Li et al., EMNLP 2022, arXiv 2205.12005) "
    "fusion-efficiency figure (time vs stride S) and the fusion-method comparison table "
    "(connected attention / co-attention / skip-connected with speed): only abstracts, "
    "summaries and the official README were retrievable, no speed numbers. No paper ratio is "
    "reported here rather than one from memory.")

# Official PyTorch mPLUG-base, 2-core CPU, batch 4, 197 + 30 tokens (official-cpu-timing.md).
OFFICIAL_S = {"skip_S1": 0.601, "skip_S3": 0.277, "skip_S6": 0.216,
              "layer_c": 0.114, "layer_a": 0.036}
OFFICIAL_NOTE = "../shared/notes/official-cpu-timing.md (torch 2.13 CPU, 2 threads, float32)"

BASE = dict(hidden=768, heads=12, mlp=3072, layers=6, image_tokens=197, text_tokens=30)
# Smoke: tiny dims, op-by-op (no jit) and constant weights, so it runs in seconds.
SMOKE = dict(hidden=32, heads=2, mlp=64, layers=6, image_tokens=17, text_tokens=5)


def networks(layers: int) -> dict[str, tuple[str, str]]:
    """name -> (layout argument, description) of every timed fusion network."""
    from mplug_jax.models.fusion import fusion_pattern

    out = {f"skip_S{s}": (fusion_pattern("skip", layers, s), f"skip rule, stride {s}")
           for s in (1, 2, 3, 6)}
    out["connected"] = (fusion_pattern("connected", layers, 1), "all merged attention")
    out["coattn"] = (fusion_pattern("coattn", layers, 1), "all symmetric co-attention")
    out["asym"] = (fusion_pattern("asym", layers, 1), "all asymmetric co-attention")
    for kind, desc in (("a", "asymmetric co-attention"), ("c", "connected (official)"),
                       ("m", "merged attention"), ("s", "symmetric co-attention")):
        out[f"layer_{kind}"] = (kind, f"one {desc} layer")
    return out


def build_network(pattern: str, dims: dict, batch: int, jit: bool = True) -> tuple:
    """(forward fn, args) of a FusionEncoder following `pattern`, with random params
    (`jit=False`: smoke run, constant params, op-by-op)."""
    import jax
    import jax.numpy as jnp

    from mplug_jax.models.fusion import FusionEncoder

    enc = FusionEncoder(pattern, num_heads=dims["heads"], mlp_dim=dims["mlp"])
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    img = jax.random.normal(k1, (batch, dims["image_tokens"], dims["hidden"]), jnp.float32)
    txt = jax.random.normal(k2, (batch, dims["text_tokens"], dims["hidden"]), jnp.float32)
    mask = jnp.ones((batch, dims["text_tokens"]), jnp.int32)
    params = common.make_params(enc.init, k3, img, txt, mask, constant=not jit)
    return common.maybe_jit(enc.apply, jit), (params, img, txt, mask)


def ratio_rows(med: dict[str, float]) -> list[dict]:
    """Our ratios with the paper's (not found) and the official-note references."""
    off = OFFICIAL_S
    return [
        {"name": "fusion time S=1 / S=6", "ours": common.ratio(med["skip_S1"], med["skip_S6"]),
         "paper": PAPER_NOT_FOUND,
         "official_note": common.ratio(off["skip_S1"], off["skip_S6"]),
         "official_how": "0.601 s / 0.216 s (measured fusion rows)"},
        {"name": "connected-attention net / skip-connected (S=3)",
         "ours": common.ratio(med["connected"], med["skip_S3"]), "paper": PAPER_NOT_FOUND,
         "official_note": common.ratio(6 * off["layer_c"], off["skip_S3"]),
         "official_how": "derived: 6 x one connected layer 0.114 s / stride-3 fusion 0.277 s"},
        {"name": "co-attention net / skip-connected (S=3)",
         "ours": common.ratio(med["coattn"], med["skip_S3"]), "paper": PAPER_NOT_FOUND,
         "official_note": None, "official_how": "no symmetric co-attention row in the note"},
        {"name": "one connected layer / one co-attention layer",
         "ours": common.ratio(med["layer_c"], med["layer_a"]), "paper": PAPER_NOT_FOUND,
         "official_note": common.ratio(off["layer_c"], off["layer_a"]),
         "official_how": "0.114 s / 0.036 s (official co-attention = asymmetric)"},
    ]


def print_tables(res: dict) -> None:
    runs = res["runs"]
    print(f"\nfusion encoder forward, {res['device']['device_kind']}, jax {res['device']['jax']}, "
          f"batch {res['settings']['batch']}, median of {res['settings']['repeats']}")
    print(f"{'network':<12} {'pattern':<8} {'ours s':>8} {'official s':>10}  description")
    for name, r in runs.items():
        print(f"{name:<12} {r['pattern']:<8} {r['median_s']:>8.4f} "
              f"{common.fmt(OFFICIAL_S.get(name), '.3f'):>10}  {r['description']}")
    print(f"\n{'time ratio':<48} {'ours':>6} {'paper':>22} {'official note':>14}")
    for row in res["ratios"]:
        print(f"{row['name']:<48} {common.fmt(row['ours'], '.2f'):>6} "
              f"{row['paper']:>22} {common.fmt(row['official_note'], '.2f'):>14}")
    print(f"\npaper: {PAPER_SEARCH_NOTE}")


def main(argv: list[str] | None = None) -> dict:
    args, threads, run = common.model_bench_args(__doc__.splitlines()[0], argv)
    dims = SMOKE if args.smoke else BASE
    repeats, batch = run["repeats"], run["batch"]

    res: dict = {"benchmark": "fusion", "device": common.machine_info(), "threads": threads,
                 "load_avg_start": common.load_average(),
                 "settings": {**dims, "batch": batch, "repeats": repeats, "warmup": 1,
                              "dtype": "float32", "weights": "random", "smoke": args.smoke,
                              "jit": not args.smoke,
                              "timing": "forward, wall clock, block_until_ready, median; "
                                        "configurations timed round-robin"},
                 "runs": {}}
    nets = networks(dims["layers"])
    calls = {name: build_network(pattern, dims, batch, jit=not args.smoke)
             for name, (pattern, _) in nets.items()}
    timed = common.time_interleaved(calls, repeats=repeats)
    for name, (pattern, desc) in nets.items():
        res["runs"][name] = {"pattern": pattern, "description": desc, **timed[name]}
    med = {k: v["median_s"] for k, v in res["runs"].items()}
    res["median_s"] = med
    res["ratios"] = ratio_rows(med)
    res["paper"] = {"status": PAPER_NOT_FOUND, "searched": PAPER_SEARCH_NOTE}
    res["official"] = {"source": OFFICIAL_NOTE, "median_s": OFFICIAL_S}
    res["load_avg_end"] = common.load_average()
    print_tables(res)

    stem = os.path.join(args.out_dir, f"fusion_{'smoke_' if args.smoke else ''}"
                                      f"cpu{res['device']['cpus']}")
    common.write_json(stem + ".json", res)
    names = list(res["runs"])
    common.bar_plot(stem + ".png", [f"{n} ({res['runs'][n]['pattern']})" for n in names],
                    {"ours (JAX)": [med[n] for n in names],
                     "official PyTorch (note)": [OFFICIAL_S.get(n) for n in names]},
                    title=f"fusion encoder forward, B={batch}, {dims['image_tokens']}+"
                          f"{dims['text_tokens']} tokens, {res['device']['device_kind']}, "
                          f"{args.threads} threads, load {res['load_avg_start'][0]:.1f}")
    print(f"wrote {stem}.json and {stem}.png")
    return res


if __name__ == "__main__":
    main()
