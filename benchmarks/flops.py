"""Hand count of the matmul FLOPs of one pretraining sample (ITC + ITM + MLM + prefix LM).

`pretrain_flops_per_sample(model_cfg, text_len, ...)` walks the computation of
`mplug_jax.tasks.pretrain.PretrainTask.loss` layer by layer and adds up the FLOPs of every
matrix multiplication (2 FLOPs per multiply-add): projections, MLPs, attention scores and
attention-weighted values, the patch embedding, the vocabulary heads and the ITC similarity
matrices. Elementwise work (softmax, LayerNorm, GELU, the optimizer and momentum updates) is
not counted; at base width it is a few percent of the total.

Passes with a gradient cost forward + backward = 3x the forward (the backward computes one
product for the input gradient and one for the weight gradient); the patch embedding only
needs its weight gradient (2x); matmuls whose inputs are all constants for the gradient (the
momentum model, the ITC targets) cost their forward only. Per sample, with B the batch, L the
text length and N the image tokens:

  ViT on N tokens            online (fwd + bwd) and momentum (fwd)
  text encoder on L tokens   ITC online + momentum, MLM online (+ momentum when distilling),
                             prefix LM online
  fusion                     ITM: 3 pairs per sample (positive, hard negative image, hard
                             negative text); MLM online (+ momentum); prefix LM online
  decoder on L tokens        cross-attending to the N + L fused states (prefix LM)
  MLM / LM heads             on the target positions the task gathers (a static capacity:
                             the expected count + 6 standard deviations; `head_tokens`)
  ITC                        projections, and [B, B + queue] similarities (online + momentum)

With `task.prefix_lm.distill` the momentum model also runs the prefix-LM path (text encoder,
fusion, decoder, LM head; forward only).

`remat=True` adds the recomputed forward of the layer stacks of the online passes (the FLOPs
a rematerialised step executes, not model FLOPs): MFU uses the count without it.

`pretrain_flops_per_sample` is plain arithmetic on the model config (no JAX); `from_config`
builds the task (imports JAX, computes nothing) to read its gather capacities.
"""
from __future__ import annotations

from typing import Mapping

LOSSES = ("itc", "itm", "mlm", "prefix_lm")


def _mm(m: float, k: float, n: float) -> float:
    """FLOPs of an [m, k] x [k, n] product."""
    return 2.0 * m * k * n


def attention_flops(lq: int, lkv: int, d: int, kv_width: int | None = None,
                    cross: bool = False, scores: bool = True) -> float:
    """One multi-head attention block, forward: projections, scores, weighted values, output.

    Self-attention projects q, k, v from the lq queries (lkv == lq); cross-attention projects
    q from the queries and k, v from the lkv states of width `kv_width`. `scores=False` leaves
    out q k^T and p v (the "6 x parameters x tokens" convention counts weights only).
    """
    kv_width = d if kv_width is None else kv_width
    if cross:
        proj = _mm(lq, d, d) + 2 * _mm(lkv, kv_width, d)
    else:
        proj = 3 * _mm(lq, d, d)
    return proj + _mm(lq, d, d) + (2 * _mm(lq, d, lkv) if scores else 0.0)


def bert_layer_flops(lq: int, d: int, mlp: int, kv_len: int = 0, kv_width: int | None = None,
                     scores: bool = True) -> float:
    """Post-LN BERT layer: self-attention (+ cross-attention to kv_len states) + MLP."""
    f = attention_flops(lq, lq, d, scores=scores) + 2 * _mm(lq, d, mlp)
    if kv_len:
        f += attention_flops(lq, kv_len, d, kv_width, cross=True, scores=scores)
    return f


def fusion_layer_flops(kind: str, n_img: int, n_txt: int, d: int, mlp: int,
                       scores: bool = True) -> float:
    """One fusion layer of kind 'a' (asymmetric co-attention), 'c'/'m' (connected / merged:
    one BERT layer over [image; text]) or 's' (symmetric co-attention)."""
    if kind == "a":
        return bert_layer_flops(n_txt, d, mlp, kv_len=n_img, scores=scores)
    if kind in "cm":
        return bert_layer_flops(n_img + n_txt, d, mlp, scores=scores)
    if kind == "s":
        return (bert_layer_flops(n_txt, d, mlp, kv_len=n_img, scores=scores)
                + bert_layer_flops(n_img, d, mlp, kv_len=n_txt, scores=scores))
    raise ValueError(f"unknown fusion layer kind {kind!r}")


def fusion_pattern(cfg: Mapping) -> str:
    """The per-layer kinds of the config's fusion (same rule as mplug_jax.models.fusion)."""
    layout, n, s = cfg["fusion_layout"], int(cfg["fusion_layers"]), int(cfg["fusion_stride"])
    if layout == "skip":
        return "".join("c" if r and r % s == 0 else "a" for r in range(n))
    if layout == "skip_alg1":
        return "".join("c" if i % (s + 1) == 0 else "a" for i in range(1, n + 1))
    return {"connected": "m" * n, "coattn": "s" * n, "asym": "a" * n}.get(layout, layout)


def module_forward_flops(cfg: Mapping, text_len: int, scores: bool = True
                         ) -> dict[str, float]:
    """Forward FLOPs of one sample through each module, and the sizes used (`scores`: count
    the attention q k^T and p v products).

    Keys: vit_blocks, patch_embed, visn_fc (large only), text_encoder, fusion, decoder,
    vocab_head_per_token, itm_head, itc_proj, n_img.
    """
    d, mlp = int(cfg["hidden_size"]), int(cfg["mlp_dim"])
    w, p, r = int(cfg["vision_width"]), int(cfg["patch_size"]), int(cfg["image_size"])
    n_img = (r // p) ** 2 + 1
    vit_block = attention_flops(n_img, n_img, w, scores=scores) + 2 * _mm(n_img, w, 4 * w)
    pattern = fusion_pattern(cfg)
    return {
        "n_img": n_img,
        "vit_blocks": int(cfg["vision_layers"]) * vit_block,
        "patch_embed": _mm(n_img - 1, 3 * p * p, w),
        "visn_fc": _mm(n_img, w, d) if w != d else 0.0,
        "text_encoder": int(cfg["text_layers"]) * bert_layer_flops(text_len, d, mlp,
                                                                   scores=scores),
        "fusion": sum(fusion_layer_flops(k, n_img, text_len, d, mlp, scores) for k in pattern),
        # Decoder on L tokens, cross-attending to [fused image; fused prefix] = N + L states.
        "decoder": int(cfg["decoder_layers"]) * bert_layer_flops(
            text_len, d, mlp, kv_len=n_img + text_len, scores=scores),
        # Transform (D x D) + tied vocabulary projection (D x V), one token.
        "vocab_head_per_token": _mm(1, d, d) + _mm(1, d, int(cfg["vocab_size"])),
        "itm_head": _mm(1, d, 2),
        # vision_proj and text_proj on the [CLS] states (width D after visn_fc).
        "itc_proj": 2 * _mm(1, d, int(cfg["embed_dim"])),
    }


def pretrain_flops_per_sample(model_cfg: Mapping, text_len: int, *, batch: int = 1024,
                              queue_size: int = 0, loss_weights: Mapping | None = None,
                              mlm_tokens: float | None = None, lm_tokens: float | None = None,
                              distill: bool = True, lm_distill: bool = False,
                              remat: bool = False, attention_scores: bool = True
                              ) -> dict[str, float]:
    """Matmul FLOPs of one pretraining sample, forward + backward, by part (module docstring).

    Args:
      model_cfg: the model preset (`configs.common.model_config(variant)` or `config.model`).
      text_len: L, the padded text length (`config.input.max_tokens`).
      batch: the batch one loss call sees (sets the ITC similarity sizes).
      queue_size: ITC feature queue length (`config.task.itc.queue_size`).
      loss_weights: {'itc', 'itm', 'mlm', 'prefix_lm'}; a weight of 0 removes that loss.
      mlm_tokens, lm_tokens: positions per sample the V-way MLM / LM heads run on (the task
        gathers a static number of target positions; `from_config` asks the task). Default:
        every position (L and L - 1).
      distill: momentum distillation on (distill_alpha > 0): MLM runs the momentum model too.
      lm_distill: prefix LM distils from the momentum model too (`task.prefix_lm.distill`).
      remat: add the recomputed forward of the online layer stacks (full remat).
      attention_scores: count q k^T and p v; False gives the weights-only convention
        ("6 x parameters touched per token" for trained passes, 2x for momentum passes).
    Returns:
      {part: FLOPs per sample} with 'total'; parts are vision, text, fusion, decoder, heads,
      itc, and 'remat_recompute' when `remat`.
    """
    w = {k: 1.0 for k in LOSSES} if loss_weights is None else \
        {k: float(loss_weights.get(k, 0.0)) for k in LOSSES}
    on = {k: w[k] > 0 for k in LOSSES}
    f = module_forward_flops(model_cfg, text_len, scores=attention_scores)
    train, frozen = 3.0, 1.0  # forward + backward; forward only
    mlm_m = on["mlm"] and distill  # momentum MLM pass
    lm_m = on["prefix_lm"] and distill and lm_distill  # momentum prefix-LM pass
    momentum = on["itc"] or mlm_m or lm_m
    mlm_tokens = float(text_len if mlm_tokens is None else mlm_tokens)
    lm_tokens = float(text_len - 1 if lm_tokens is None else lm_tokens)
    e = float(model_cfg["embed_dim"])

    vit = f["vit_blocks"] + f["visn_fc"]
    vision = train * vit + 2.0 * f["patch_embed"]  # patch conv: no input gradient
    vision += frozen * (vit + f["patch_embed"]) if momentum else 0.0

    n_text_train = (on["itc"] or on["itm"]) + on["mlm"] + on["prefix_lm"]
    n_text_frozen = on["itc"] + mlm_m + lm_m
    text = (train * n_text_train + frozen * n_text_frozen) * f["text_encoder"]

    n_fuse_train = 3 * on["itm"] + on["mlm"] + on["prefix_lm"]
    n_fuse_frozen = mlm_m + lm_m
    fusion = (train * n_fuse_train + frozen * n_fuse_frozen) * f["fusion"]

    decoder = (train * on["prefix_lm"] + frozen * lm_m) * f["decoder"]

    head = f["vocab_head_per_token"]
    heads = (train * on["mlm"] + frozen * mlm_m) * mlm_tokens * head
    heads += (train * on["prefix_lm"] + frozen * lm_m) * lm_tokens * head
    heads += train * 3 * f["itm_head"] if on["itm"] else 0.0

    itc = 0.0
    if on["itc"] or on["itm"]:
        itc += train * f["itc_proj"]
    if on["itc"]:
        itc += frozen * f["itc_proj"]  # momentum projections
        k = batch + queue_size
        sims = 2 * _mm(1, e, k)  # i2t and t2i rows of one sample
        itc += frozen * sims + 2.0 * sims  # momentum targets; online (forward + input grad)

    out = {"vision": vision, "text": text, "fusion": fusion, "decoder": decoder,
           "heads": heads, "itc": itc}
    if remat:
        out["remat_recompute"] = (vit + n_text_train * f["text_encoder"]
                                  + n_fuse_train * f["fusion"]
                                  + (f["decoder"] if on["prefix_lm"] else 0.0))
    out["total"] = sum(out.values())
    return out


def head_tokens(config, batch: int) -> tuple[float, float]:
    """(MLM, LM) head positions per sample that the pretraining task gathers for `batch`.

    Asks the task itself (its static gather capacities), so the count follows the code; when
    the task cannot be built (e.g. no JAX here) every position is counted.
    """
    length = int(config.input.max_tokens)
    try:
        from mplug_jax import tasks

        task = tasks.build(config)
        return (task.mlm_capacity(batch, length) / batch,
                task.lm_capacity(batch, length) / batch)
    except (ImportError, AttributeError):
        return float(length), float(length - 1)


def from_config(config, remat: bool | None = None, attention_scores: bool = True
                ) -> dict[str, float]:
    """`pretrain_flops_per_sample` for a full run config (`configs/pretrain.py:<variant>`).

    The batch is the one a loss call sees (global batch / accum_steps); `remat` defaults to
    the config's remat policy being anything but 'none'.
    """
    accum = int(config.optim.get("accum_steps", 1))
    batch = int(config.input.batch_size) // max(accum, 1)
    remat = (config.model.remat_policy != "none") if remat is None else remat
    mlm_tokens, lm_tokens = head_tokens(config, batch)
    return pretrain_flops_per_sample(
        config.model, int(config.input.max_tokens), batch=batch,
        queue_size=int(config.task.itc.queue_size), loss_weights=dict(config.task.loss_weights),
        mlm_tokens=mlm_tokens, lm_tokens=lm_tokens,
        distill=float(config.task.itc.distill_alpha) > 0,
        lm_distill=bool(config.task.get("prefix_lm", {}).get("distill", False)),
        remat=remat, attention_scores=attention_scores)


def compiled_tiny(devices: tuple[int, ...] = (1, 2), batch: int = 32) -> list[dict]:
    """XLA's FLOPs per sample of the compiled `tiny` train step on `devices`-device
    data-parallel meshes, beside the hand count. Needs max(devices) XLA host devices (set
    before JAX starts, as `main` does)."""
    import time

    import jax
    import numpy as np

    from configs import pretrain
    from mplug_jax import metrics
    from mplug_jax import sharding as shd
    from mplug_jax import trainer

    rows = []
    for n in devices:
        c = pretrain.get_config("tiny")
        c.input.batch_size = batch
        mesh = shd.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:n])
        s = trainer.setup(c, steps_per_epoch=100, mesh=mesh)
        length, r = c.input.max_tokens, c.model.image_size
        spec = {"image": ((batch, r, r, 3), np.float32), "text_ids": ((batch, length), np.int32),
                "text_mask": ((batch, length), np.int32), "idx": ((batch,), np.int32)}
        t = time.perf_counter()
        step = trainer.compile_step(s, c, {k: jax.ShapeDtypeStruct(*v) for k, v in spec.items()})
        compiled = metrics.compiled_stats(step)["flops"] * n / batch
        hand = from_config(c)["total"]
        rows.append({"devices": n, "batch": batch, "gflop_per_sample_compiled": compiled / 1e9,
                     "gflop_per_sample_hand": hand / 1e9, "hand_over_compiled": hand / compiled,
                     "compile_s": time.perf_counter() - t})
        print(f"tiny, batch {batch}, {n} device(s): compiled {compiled / 1e9:.3f} GFLOP/sample, "
              f"hand {hand / 1e9:.3f} (hand / compiled {hand / compiled:.2f})", flush=True)
    return rows


def fusion_ratios(image_tokens=(197, 257, 577, 1025), text_tokens: int = 30, d: int = 768,
                  mlp: int = 3072) -> dict:
    """Forward matmul-FLOP ratios of the paper's fusion comparisons at base width (6 layers;
    skip-connected = official stride 3), per image-token count."""
    nets = {"S1": "accccc", "S3": "aaacaa", "S6": "aaaaaa", "S1_alg1": "acacac",
            "connected": "mmmmmm", "coattn": "ssssss", "asym": "aaaaaa"}
    pairs = {"S1/S6": ("S1", "S6"), "S1_alg1/S6": ("S1_alg1", "S6"), "S3/S6": ("S3", "S6"),
             "connected/S3": ("connected", "S3"), "coattn/S3": ("coattn", "S3"),
             "asym/S3": ("asym", "S3")}
    out = {}
    for n in image_tokens:
        f = {k: sum(fusion_layer_flops(c, n, text_tokens, d, mlp) for c in p)
             for k, p in nets.items()}
        out[str(n)] = {name: f[a] / f[b] for name, (a, b) in pairs.items()}
    return out


def main(argv=None) -> None:
    """Print the hand count of each variant and the fusion FLOP ratios, and write them to
    benchmarks/results/flops_cpu<N>.json; `--compiled` adds XLA's count of the tiny step
    compiled on 1 and 2 CPU devices."""
    import argparse
    import os
    import sys
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.dirname(here))
    ap = argparse.ArgumentParser(description="hand count of pretraining FLOPs per sample")
    ap.add_argument("--compiled", action="store_true",
                    help="also compile the tiny step on 1 and 2 CPU devices (~1-4 min)")
    ap.add_argument("--out-dir", default=os.path.join(here, "results"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.compiled:
        # Before JAX starts. -O0 LLVM codegen compiles faster; the FLOP count comes from the
        # optimised HLO, which the LLVM level does not change.
        os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                                   "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true "
                                   + os.environ.get("XLA_FLAGS", ""))
    import common
    from configs import pretrain

    out = {"benchmark": "flops", "load_avg_start": common.load_average(), "variants": {}}
    for variant in ("tiny", "base", "large"):
        c = pretrain.get_config(variant)
        parts = from_config(c, remat=False)
        weights_only = from_config(c, remat=False, attention_scores=False)["total"]
        detail = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items() if k != "total")
        print(f"{variant:<6} L={c.input.max_tokens} batch {c.input.batch_size}: "
              f"{parts['total'] / 1e9:.2f} GFLOP/sample ({detail}); without attention "
              f"scores {weights_only / 1e9:.2f}")
        out["variants"][variant] = {
            "text_len": c.input.max_tokens, "batch": c.input.batch_size,
            "gflop_per_sample": {k: v / 1e9 for k, v in parts.items()},
            "gflop_per_sample_weights_only": weights_only / 1e9,
            "gflop_per_sample_with_remat": from_config(c, remat=True)["total"] / 1e9}
    out["fusion_flop_ratios"] = fusion_ratios()
    print("fusion forward FLOP ratios at base width, 30 text tokens, by image tokens:")
    for n, r in out["fusion_flop_ratios"].items():
        print(f"  {n:>5}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    if args.compiled:
        out["compiled_tiny"] = compiled_tiny()
    out["load_avg_end"] = common.load_average()
    out["runtime_s"] = time.perf_counter() - t_start
    path = os.path.join(args.out_dir, f"flops_cpu{os.cpu_count()}.json")
    common.write_json(path, out)
    print(f"wrote {path}")
    print(f"total runtime {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
