"""Grounding evaluation as the official `grounding_mplug.py evaluate()`, batched.

Per expression: the fused states of (image, expression), the greedy 4-token decode over the
coordinate ids (`tasks.grounding.Task.boxes`), the box (token - 345) / 336 as (cx, cy, w, h)
in the padded frame. Metrics (`scoring.grounding`, official): 'accu' (Acc@0.5), 'accu_num',
'miou' in the padded frame (prediction clamped to [0, 1]); and, on the boxes mapped back to
the original image and clipped to it (what the result file holds and `score_file` scores),
'pixel_accu', 'pixel_miou' and 'num_clipped' (predictions that reached outside the image).
Result file `grounding_result.json`: [{"id" (position in the split file), "phrase",
"pred_box", "gt_box"}], boxes [x1, y1, x2, y2] in original-image pixels.

The split comes from the block: `split` (and `dataset`, default input.dataset) under
input.split_root; the synthetic data: its 'heldout' split of `num_examples` records.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from mplug_jax.data import eval_loader
from mplug_jax.data.inputs import grounding as grounding_input
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import grounding as G
from mplug_jax.sharding import make_mesh, replicated

PREDICT_FNS = ("grounding_boxes",)
RESULT_FILE = "grounding_result.json"


def to_pixels(boxes_cxcywh: np.ndarray, image_size: int, ratio, left, top, width, height
              ) -> tuple[np.ndarray, np.ndarray]:
    """Padded-frame normalised (cx, cy, w, h) float[N, 4] -> original-image pixel xyxy
    float64[N, 4] clipped to the image, and bool[N]: whether clipping changed the box."""
    xyxy = G.cxcywh_to_xyxy(np.asarray(boxes_cxcywh, np.float64)) * image_size
    off = np.stack([left, top, left, top], -1).astype(np.float64)
    px = (xyxy - off) / np.asarray(ratio, np.float64)[:, None]
    lim = np.stack([width, height, width, height], -1).astype(np.float64)
    clipped = np.clip(px, 0, lim)
    return clipped, np.any(np.abs(clipped - px) > 1e-6, -1)


class Evaluator:
    """Evaluator `grounding`.

    Args:
      predict_fns: {'grounding_boxes'} of the grounding task.
      ecfg: eval block (split, dataset, num_examples, batch_size, num_examples_shown).
      config: run config (input, model.image_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg, self.config = ecfg, config
        inp = config.input
        self.input_cfg = inp
        self.image_size = int(config.model.image_size)
        n = int(ecfg.get("num_examples", 0) or 0)
        split = ecfg.get("split") or ""
        if not split:
            raise ValueError("evals.<grounding>.split is required (e.g. testA, testB, test, val)")
        self.name = split
        if inp.dataset == "synthetic":
            if n <= 0:
                raise ValueError("evals.<grounding>.num_examples must be > 0 for the synthetic "
                                 "data")
            src = grounding_input.source(inp, split, size=n,
                                         image_size=int(inp.get("synthetic_image_size", 64)),
                                         seed=config.seed)
        else:
            src = grounding_input.source(inp, split, dataset=ecfg.get("dataset") or None)
        self.source = eval_loader.Head(src, n) if n > 0 else src
        if len(self.source) == 0:
            raise ValueError(f"the grounding eval split {split!r} is empty")
        if mesh is None:
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
        self.mesh = mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = int(ecfg.batch_size)
        if self.batch_size % shards:
            raise ValueError(f"eval batch_size {self.batch_size} must be a multiple of the "
                             f"{shards} batch shards of mesh {dict(mesh.shape)}")
        self._predict = jax.jit(functools.partial(predict_fns["grounding_boxes"]),
                                out_shardings=replicated(mesh))

    def _put(self, *arrays: np.ndarray):
        n, pid = jax.process_count(), jax.process_index()
        local = [np.asarray(a)[pid * len(a) // n:(pid + 1) * len(a) // n] for a in arrays]
        return make_global_batch(local, self.mesh)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        short = self.batch_size - len(x)
        return x if short == 0 else np.concatenate([x, np.repeat(x[-1:], short, 0)])

    def predict(self, params) -> dict[str, np.ndarray]:
        """Arrays over the usable records, in order: 'idx', 'tokens' int[N, 4], 'pred' / 'gt'
        float32[N, 4] padded-frame cxcywh, 'pred_px' / 'gt_px' [N, 4] pixel xyxy, 'clipped'."""
        cols: dict[str, list] = {k: [] for k in ("idx", "tokens", "gt", "ratio", "left", "top",
                                                 "width", "height")}
        for b in grounding_input.eval_batches(self.config, self.source, self.batch_size):
            rows = len(b["idx"])
            arrays = [self._pad(b[k]) for k in ("image", "text_ids", "text_mask")]
            cols["tokens"].append(np.asarray(self._predict(params, *self._put(*arrays)))[:rows])
            cols["gt"].append(b["gt_box"])
            for k in ("idx", "ratio", "left", "top", "width", "height"):
                cols[k].append(b[k])
        if not cols["idx"]:
            raise ValueError(f"no usable record in grounding split {self.name!r}")
        out = {k: np.concatenate(v) for k, v in cols.items()}
        out["pred"] = G.tokens_to_coords(out["tokens"])
        out["pred_px"], out["clipped"] = to_pixels(out["pred"], self.image_size, out["ratio"],
                                                   out["left"], out["top"], out["width"],
                                                   out["height"])
        return out

    def run(self, params) -> dict:
        """Metrics (official and pixel-frame), a few examples and the result file."""
        p = self.predict(params)
        iou = G.bbox_iou(p["pred"], p["gt"])
        n, acc = G.accuracy_at(iou)
        records = [self.source[int(i)] for i in p["idx"]]
        gt_px = np.array([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                           r["bbox"][1] + r["bbox"][3]] for r in records], np.float64)
        # The result file's 2-decimal boxes, so that score_file re-scores exactly these.
        gt_px, pred_px = np.round(gt_px, 2), np.round(p["pred_px"], 2)
        piou = G.pixel_iou(pred_px, gt_px)
        out: dict = {"num": len(iou), "accu": acc, "accu_num": n, "miou": float(np.mean(iou)),
                     "pixel_accu": float(np.mean(piou >= 0.5)),
                     "pixel_miou": float(np.mean(piou)),
                     "num_clipped": int(np.sum(p["clipped"])),
                     "num_skipped": len(self.source) - len(iou)}
        shown = int(self.cfg.get("num_examples_shown", 0) or 0)
        out["examples"] = [(r["phrase"], [round(float(v), 1) for v in pred_px[i]],
                            [round(float(v), 1) for v in gt_px[i]], round(float(iou[i]), 3))
                           for i, r in enumerate(records[:shown])]
        out[FILES] = {RESULT_FILE: [
            {"id": r.get("id", int(j)), "phrase": r["phrase"],
             "pred_box": [float(v) for v in pred_px[i]], "gt_box": [float(v) for v in gt_px[i]]}
            for i, (j, r) in enumerate(zip(p["idx"], records))]}
        return out

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        lines = [f"{res['num']} expressions: Acc@0.5 {100 * res['accu']:.2f}% "
                 f"({res['accu_num']}), mIoU {100 * res['miou']:.2f}%; original pixels: "
                 f"Acc@0.5 {100 * res['pixel_accu']:.2f}%, {res['num_clipped']} boxes clipped"
                 + (f", {res['num_skipped']} records skipped" if res.get("num_skipped") else "")]
        for phrase, pred, gt, iou in res.get("examples", []):
            lines.append(f"  {phrase!r:40} -> {pred} gt {gt} IoU {iou}")
        return "\n".join(lines)
