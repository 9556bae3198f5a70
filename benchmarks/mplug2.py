"""mPLUG-2 video path: frame count, local temporal modules and universal-layer latent queries.

Times `mplug_jax.mplug2.model.MPLUG2` at the paper's base dimensions (configs/mplug2/models.py
`mplug2_base`: ViT-B/16 video encoder, 12 blocks of width 768, BERT-base text encoder whose last
S = 2 layers are universal), float32, random weights, CPU, one jitted function per case:

1. video encoder + universal layers (`vision` -> `image_embeds`: float32[B, T, R, R, 3] ->
   float[B, 1 + T*L, 768]) for T = 4 / 8 / 16 frames, WITH the two local temporal (LT) modules
   per block (the release) and WITHOUT them (`DualVisionEncoder(temporal=False)`: the spatial
   blocks only, the LT params dropped); median wall time of `--repeats` calls after a warm-up,
   plus XLA's compiled memory analysis (peak = arguments + outputs + temporaries - aliased)
   and its flop count;
2. the universal layers alone (`MPLUG2.universal` on random vision embeddings float[B, N, 768],
   N = 1 + T*L) for 25 / 50 / 100 learnable latent queries (the release hard-codes 50). The
   last universal layer runs self-attention and the FFN on all N image tokens (queries = image
   tokens, keys = the latents only in its cross-attention), so its cost grows with N^2 and
   hardly with the latent count, while the ViT blocks attend within each frame (linear in T);
3. with `--vqa`: the whole VQA forward (video + 30-token question -> fusion -> decoder logits of
   a 10-token answer), LT on and off.

Ratios in the JSON (`ratios`): LT overhead in % (time, peak memory, flops) per frame count,
largest / smallest frame count per setting (against the linear frame ratio), largest / smallest
latent count per frame count, and the universal layers' share of the encoder time. Cases are
timed round-robin (`common.time_interleaved`) so load changes on a shared CPU hit all alike.
Writes ``benchmarks/results/mplug2_cpu<N>.json`` and ``.png`` and prints the total runtime.

    python benchmarks/mplug2.py [--repeats 3] [--batch 1] [--image-size 224] [--threads 2]
    python benchmarks/mplug2.py --frames 4 8 --latents 25 50 --vqa   # subsets / whole forward
    python benchmarks/mplug2.py --quick      # base dims, 3 repeats
    python benchmarks/mplug2.py --smoke      # mplug2_tiny, 1 vision block; the smoke test
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets sys.path to the repo root; must not import jax)

FRAMES = (4, 8, 16)
LATENTS = (25, 50, 100)
SMOKE_FRAMES = (1, 2)
SMOKE_LATENTS = (4, 8)
QUESTION_TOKENS, ANSWER_TOKENS = 30, 10  # as benchmarks/forward.py (official CPU timing)
# Smoke runs are nearly all XLA:CPU compilation; these options cut it by ~40% (same buffers).
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True}


def _args(p) -> None:
    p.set_defaults(batch=1, repeats=3)
    p.add_argument("--image-size", type=int, default=None,
                   help="frame side in pixels (default: the preset's, 224 at base)")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help=f"frame counts (default {FRAMES}; smoke {SMOKE_FRAMES})")
    p.add_argument("--latents", type=int, nargs="+", default=None,
                   help=f"latent-query counts (default {LATENTS}; smoke {SMOKE_LATENTS})")
    p.add_argument("--latent-frames", type=int, nargs="+", default=None,
                   help="frame counts of the latent sweep (default: all --frames; smoke: the "
                        "largest)")
    p.add_argument("--vqa", action="store_true",
                   help="also time the whole VQA forward (LT on and off) per frame count")


def _encoder(m, video, temporal: bool):
    """Video encoder + universal layers: float32[B, T, R, R, 3] -> float[B, 1 + T*L, H]."""
    return m.image_embeds(m.vision(video, temporal=temporal))


def _vqa(m, video, q_ids, q_mask, a_ids, a_mask, temporal: bool):
    """Whole VQA forward -> decoder logits float32[B, La, V] (`MPLUG2.__call__` with the LT
    switch)."""
    from mplug_jax.mplug2.model import vqa_states

    img = _encoder(m, video, temporal)
    txt = m.encode_text(q_ids, q_mask)
    f_img, f_txt = m.fuse(img, txt, q_mask)
    return m.decode(a_ids, a_mask, *vqa_states(f_img, f_txt, q_mask))


def build_model(smoke: bool, image_size: int | None):
    """MPLUG2 of the base preset (smoke: tiny with one vision block), float32, optionally at
    another frame size."""
    from configs.mplug2.models import model_config
    from mplug_jax.mplug2.model import MPLUG2

    over = {} if image_size is None else {"image_size": image_size}
    if smoke:  # one vision block: the smoke run's time is nearly all XLA compilation
        over["vision_layers"] = 1
    return MPLUG2.from_config(model_config("mplug2_tiny" if smoke else "mplug2_base"),
                              dtype="float32", param_dtype="float32", **over)


def init_params(model, full: bool, smoke: bool) -> dict:
    """Unboxed params: the encoder path only (vision, latents + universal layers,
    visn_emb_norm), or with `full` the whole model. Smoke: constant 0.02, nothing compiled."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    r = model.image_size
    video = jnp.zeros((1, 2, r, r, 3), jnp.float32)
    ids = jnp.ones((1, 4), jnp.int32)
    if full:
        def init(rng, v, i):
            return model.init(rng, v, i, i, i, i)
        args = (video, ids)
    else:
        def init(rng, v):
            return model.init(rng, v, True, method=_encoder)
        args = (video,)
    params = common.make_params(init, jax.random.PRNGKey(0), *args, constant=smoke)
    return nn.meta.unbox(params)["params"]


def without_temporal(params: dict) -> dict:
    """`params` minus every block's LT modules ('lmhra1' / 'lmhra2')."""
    vision = {k: ({n: p for n, p in v.items() if not n.startswith("lmhra")}
                  if k.startswith("blocks_") else v) for k, v in params["vision"].items()}
    return {**params, "vision": vision}


def universal_params(params: dict, model, latents: int) -> dict:
    """Params of `MPLUG2.universal` only, with `latents` fresh N(0, 1) latent queries."""
    import jax
    import jax.numpy as jnp

    first = model.text_layers - model.universal_layers
    text = {k: v for k, v in params["text"].items()
            if k.startswith("layer_") and int(k.split("_")[1]) >= first}
    text["latents"] = jax.random.normal(jax.random.PRNGKey(latents),
                                        (latents, model.hidden_size), jnp.float32)
    return {"text": text, "visn_emb_norm": params["visn_emb_norm"]}


def count(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree)))


def compile_case(fn, args: tuple, options: dict | None = None) -> tuple:
    """(compiled fn, stats): jit + AOT compile (with XLA `options`), compile seconds, XLA
    memory analysis (bytes) and flop count of one call."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options or None)
    stats = {"compile_s": time.perf_counter() - t0}
    mem = compiled.memory_analysis()
    for key in ("argument", "output", "temp", "alias", "generated_code"):
        stats[f"{key}_bytes"] = int(getattr(mem, f"{key}_size_in_bytes", 0) or 0)
    # XLA:CPU allocates the whole temp arena at once, so the peak is arguments + outputs + temp
    # (aliased buffers counted once). Its `peak_memory_in_bytes` is recorded too but reads below
    # the temp arena alone at 16 frames (472 vs 927 MiB), so it is not used.
    stats["peak_bytes"] = (stats["argument_bytes"] + stats["output_bytes"]
                           + stats["temp_bytes"] - stats["alias_bytes"])
    stats["xla_peak_memory_bytes"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    stats["xla_gflops"] = float(cost.get("flops", 0.0)) / 1e9
    return compiled, stats


def build_cases(model, params: dict, frames, latents, latent_frames, batch: int,
                vqa: bool, options: dict | None = None) -> dict:
    """name -> (compiled fn, args, row metadata) of every timed case."""
    import functools

    import jax
    import jax.numpy as jnp

    from mplug_jax.mplug2.model import MPLUG2

    r, h = model.image_size, model.hidden_size
    tokens_per_frame = (r // model.patch_size) ** 2
    enc_keys = ("vision", "text", "visn_emb_norm")
    enc = {True: {k: params[k] for k in enc_keys}}
    enc[False] = without_temporal(enc[True])
    cases = {}
    key = jax.random.PRNGKey(1)
    for t in frames:
        video = jax.random.normal(jax.random.fold_in(key, t), (batch, t, r, r, 3), jnp.float32)
        n = 1 + t * tokens_per_frame
        for lt in (True, False):
            fn = functools.partial(_lt_apply, model, lt)
            compiled, stats = compile_case(fn, (enc[lt], video), options)
            cases[f"encoder_T{t}_{'lt' if lt else 'nolt'}"] = (compiled, (enc[lt], video), {
                "part": "encoder", "frames": t, "temporal": lt, "tokens": n,
                "params": count(enc[lt]), **stats})
        v = jax.random.normal(jax.random.fold_in(key, 1000 + t), (batch, n, h), jnp.float32)
        for nl in latents if t in latent_frames else ():
            m = model.clone(num_latents=nl)
            p = universal_params(params, model, nl)
            compiled, stats = compile_case(
                lambda p_, v_, m=m: m.apply({"params": p_}, v_, method=MPLUG2.universal), (p, v),
                options)
            cases[f"universal_T{t}_L{nl}"] = (compiled, (p, v), {
                "part": "universal", "frames": t, "latents": nl, "tokens": n,
                "params": count(p), **stats})
        if vqa:
            ids = jnp.full((batch, QUESTION_TOKENS), 1000, jnp.int32)
            ans = jnp.full((batch, ANSWER_TOKENS), 1000, jnp.int32)
            for lt in (True, False):
                p = params if lt else without_temporal(params)
                args = (p, video, ids, jnp.ones_like(ids), ans, jnp.ones_like(ans))
                compiled, stats = compile_case(functools.partial(_vqa_apply, model, lt), args,
                                               options)
                cases[f"vqa_T{t}_{'lt' if lt else 'nolt'}"] = (compiled, args, {
                    "part": "vqa", "frames": t, "temporal": lt, "tokens": n,
                    "params": count(p), **stats})
    return cases


def _lt_apply(model, temporal, params, video):
    return model.apply({"params": params}, video, temporal, method=_encoder)


def _vqa_apply(model, temporal, params, video, q_ids, q_mask, a_ids, a_mask):
    return model.apply({"params": params}, video, q_ids, q_mask, a_ids, a_mask, temporal,
                       method=_vqa)


def ratios(rows: dict, frames, latents, latent_frames, preset_latents: int) -> dict:
    """Derived ratios; every one is computed from `rows` of this run. 'time' = ratio of the
    medians, 'time_min' = of the minima, 'time_paired' = `paired` (the steadiest on a shared
    CPU)."""
    out: dict = {"lt_overhead_pct": {}, "frames": {}, "latents": {}, "universal_share": {}}
    pct = lambda a, b: None if common.ratio(a, b) is None else 100 * (a / b - 1)  # noqa: E731
    for part in ("encoder", "vqa"):
        for t in frames:
            on, off = rows.get(f"{part}_T{t}_lt"), rows.get(f"{part}_T{t}_nolt")
            if on is None:
                continue
            row = {k: pct(on[src], off[src]) for k, src in (
                ("time", "median_s"), ("time_min", "min_s"), ("peak_memory", "peak_bytes"),
                ("temp_memory", "temp_bytes"), ("xla_flops", "xla_gflops"),
                ("params", "params"))}
            tp = common.paired(on, off)
            row["time_paired"] = None if tp is None else 100 * (tp - 1)
            out["lt_overhead_pct"][f"{part}_T{t}"] = row
        lo, hi = min(frames), max(frames)
        for lt in ("lt", "nolt"):
            a, b = rows.get(f"{part}_T{hi}_{lt}"), rows.get(f"{part}_T{lo}_{lt}")
            if a is None or lo == hi:
                continue
            out["frames"][f"{part}_{lt}_T{hi}_over_T{lo}"] = dict(common.row_ratios(a, b),
                                                                  linear=hi / lo)
    lo, hi = min(latents), max(latents)
    for t in latent_frames:
        if lo != hi:
            a, b = rows[f"universal_T{t}_L{hi}"], rows[f"universal_T{t}_L{lo}"]
            out["latents"][f"universal_T{t}_L{hi}_over_L{lo}"] = dict(common.row_ratios(a, b),
                                                                      latents=hi / lo)
        u = rows.get(f"universal_T{t}_L{preset_latents}")
        if u is not None:
            out["universal_share"][f"T{t}_L{preset_latents}"] = {
                "of_encoder_lt_time": common.paired(u, rows[f"encoder_T{t}_lt"]),
                "of_encoder_lt_flops": common.ratio(u["xla_gflops"],
                                                    rows[f"encoder_T{t}_lt"]["xla_gflops"])}
    return out


def print_tables(res: dict) -> None:
    st = res["settings"]
    print(f"\nmPLUG-2 {st['model']}, {st['image_size']} px, batch {st['batch']}, "
          f"{res['device']['device_kind']}, median of {st['repeats']}; load "
          f"{res['load_avg_start']} -> {res['load_avg_end']}")
    print(f"{'case':<24} {'tokens':>7} {'median s':>9} {'peak MiB':>9} {'temp MiB':>9} "
          f"{'GFLOP':>8} {'compile s':>9}")
    for name, r in res["rows"].items():
        print(f"{name:<24} {r['tokens']:>7} {r['median_s']:>9.4f} {r['peak_bytes'] / 2**20:>9.1f} "
              f"{r['temp_bytes'] / 2**20:>9.1f} {r['xla_gflops']:>8.2f} {r['compile_s']:>9.1f}")
    rt = res["ratios"]
    print("\nLT overhead (%): " + "; ".join(
        f"{k}: time {common.fmt(v['time_paired'], '.1f')}, peak mem {common.fmt(v['peak_memory'], '.1f')}"
        f", flops {common.fmt(v['xla_flops'], '.1f')}" for k, v in rt["lt_overhead_pct"].items()))
    for k, v in {**rt["frames"], **rt["latents"]}.items():
        lin = v.get("linear", v.get("latents"))
        print(f"{k}: time {common.fmt(v['time_paired'], '.2f')}, peak mem "
              f"{common.fmt(v['peak_memory'], '.2f')}, flops {common.fmt(v['xla_flops'], '.2f')}"
              f" (input ratio {lin:.2f})")
    for k, v in rt["universal_share"].items():
        print(f"universal layers {k}: {common.fmt(100 * v['of_encoder_lt_time'], '.1f')}% of "
              f"encoder time, {common.fmt(100 * v['of_encoder_lt_flops'], '.1f')}% of its flops")


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, st = res["rows"], res["settings"]
    frames, latents = st["frames"], st["latents"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for part, style in (("encoder", "-"), ("vqa", ":")):
        for lt, color in (("lt", "tab:blue"), ("nolt", "tab:gray")):
            if f"{part}_T{frames[0]}_{lt}" not in rows:
                continue
            label = f"{part}, {'with' if lt == 'lt' else 'without'} LT"
            rs = [rows[f"{part}_T{t}_{lt}"] for t in frames]
            axes[0].plot(frames, [r["median_s"] for r in rs], style, marker="o", color=color,
                         label=label)
            axes[1].plot(frames, [r["peak_bytes"] / 2**20 for r in rs], style, marker="o",
                         color=color, label=label)
    for t in st["latent_frames"]:
        axes[2].plot(latents, [rows[f"universal_T{t}_L{n}"]["median_s"] for n in latents],
                     marker="o", label=f"T={t} ({rows[f'universal_T{t}_L{latents[0]}']['tokens']}"
                                       " tokens)")
    for ax, title, xl in ((axes[0], "median forward time (s)", "frames"),
                          (axes[1], "XLA peak memory (MiB)", "frames"),
                          (axes[2], "universal layers time (s)", "latent queries")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl)
        ax.set_xticks(latents if ax is axes[2] else frames)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"mPLUG-2 {st['model']} video path, {st['image_size']} px, batch {st['batch']}, "
                 f"{res['device']['device_kind']}, {res['threads']['requested_threads']} threads, "
                 f"load {res['load_avg_start'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args, threads, run = common.model_bench_args(__doc__.splitlines()[0], argv, extra=_args)
    frames = sorted(set(args.frames or (SMOKE_FRAMES if args.smoke else FRAMES)))
    latents = sorted(set(args.latents or (SMOKE_LATENTS if args.smoke else LATENTS)))
    latent_frames = sorted(set(args.latent_frames or (frames[-1:] if args.smoke else frames)))
    if min(frames) < 1 or min(latents) < 1:
        raise ValueError(f"--frames and --latents must be >= 1, got {frames} / {latents}")
    if not set(latent_frames) <= set(frames):
        raise ValueError(f"--latent-frames {latent_frames} must be among --frames {frames}")
    model = build_model(args.smoke, args.image_size)
    repeats, batch = run["repeats"], 1 if args.smoke else run["batch"]
    options = SMOKE_COMPILER_OPTIONS if args.smoke else {}
    res: dict = {"benchmark": "mplug2", "device": common.machine_info(), "threads": threads,
                 "load_avg_start": common.load_average(),
                 "settings": {"model": "mplug2_tiny" if args.smoke else "mplug2_base",
                              "image_size": model.image_size, "patch_size": model.patch_size,
                              "vision_width": model.vision_width,
                              "vision_layers": model.vision_layers,
                              "hidden_size": model.hidden_size,
                              "universal_layers": model.universal_layers,
                              "preset_latents": model.num_latents, "frames": frames,
                              "latents": latents, "latent_frames": latent_frames,
                              "vqa": args.vqa, "batch": batch,
                              "repeats": repeats, "warmup": 1, "dtype": "float32",
                              "weights": "constant 0.02" if args.smoke else "random",
                              "smoke": args.smoke, "quick": args.quick, "jit": True,
                              "compiler_options": options,
                              "timing": "AOT-compiled call, wall clock, block_until_ready, "
                                        "median; all cases timed round-robin",
                              "memory": "XLA memory_analysis of the compiled call: peak = "
                                        "argument + output + temp - alias bytes"}}
    t0 = time.perf_counter()
    params = init_params(model, full=args.vqa, smoke=args.smoke)
    res["settings"]["init_s"] = time.perf_counter() - t0
    cases = build_cases(model, params, frames, latents, latent_frames, batch, args.vqa,
                        options)
    print(f"compiled {len(cases)} cases in {time.perf_counter() - t0:.0f} s (incl. init); "
          f"timing {repeats} rounds", flush=True)
    timed = common.time_interleaved({k: (c, a) for k, (c, a, _) in cases.items()},
                                    repeats=repeats)
    res["rows"] = {k: {**meta, **timed[k]} for k, (_, _, meta) in cases.items()}
    res["median_s"] = {k: r["median_s"] for k, r in res["rows"].items()}
    res["ratios"] = ratios(res["rows"], frames, latents, latent_frames, model.num_latents)
    res["load_avg_end"] = common.load_average()
    res["runtime_s"] = time.perf_counter() - t_start
    print_tables(res)

    tag = "smoke_" if args.smoke else "" if batch == 1 else f"b{batch}_"
    stem = os.path.join(args.out_dir, f"mplug2_{tag}cpu{res['device']['cpus']}")
    return common.write_results(stem, res, t_start, lambda png: plot(res, png))


if __name__ == "__main__":
    main()
