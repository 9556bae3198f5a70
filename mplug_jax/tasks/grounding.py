"""Visual grounding (RefCOCO / RefCOCO+ / RefCOCOg): a box predicted as 4 coordinate tokens.

As the official `grounding_mplug.py` / `model_grounding_mplug.py`
(docs/fixtures.md#grounding-fixtures, docs/official-formats.md#refcoco-grounding): image ->
`encode_image`, referring expression -> `encode_text` ("[CLS] phrase [SEP]" padded to
max_query_len), `fuse`; the decoder reads [fused image; fused text] (mask [ones; text mask]) and,
from the prefix `[unused339]`, emits the box (cx, cy, w, h) normalised to the padded square as 4
tokens of a 337-bin coordinate vocabulary (`scoring.grounding`: bin = floor(clamp(c, 0, 1) * 336),
always 336, quirk G1).

Training (docs/fixtures.md#grounding-training-loss): teacher-forced decoder on [prefix, t0..t3]
(causal mask only), the logits outside the coordinate ids masked (here: only the 337 coordinate
columns are kept, which is the same cross-entropy), per-token NLL weighted by clamp(|pred - gt|, 0,
5) and 1 - GIoU(pred, gt), where pred is the teacher-forced argmax box (no gradient through the
weights). `task.loss_weighting='official'` reproduces the official broadcasting (G7: every
token weighted by the batch-mean weight of its coordinate); 'per_sample' is the intended
per-sample weighting; 'none' is the plain token cross-entropy (an ablation). `coordinate_loss` is the one implementation (the parity check of
`parity.grounding` calls it too).

Inference: `generate.coordinate_greedy` (4 greedy steps over the coordinate ids, KV cache).

Batch: see `mplug_jax.data.inputs.grounding`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate
from mplug_jax.data.inputs import grounding as grounding_input
from mplug_jax.scoring import grounding as G
from mplug_jax.tasks import base

WEIGHTINGS = ("official", "per_sample", "none")
GIOU_EPS = G.GIOU_EPS


def _xyxy(b: jax.Array) -> jax.Array:
    cx, cy, w, h = jnp.moveaxis(b, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def paired_giou(a_xyxy: jax.Array, b_xyxy: jax.Array) -> jax.Array:
    """GIoU of row i of `a` with row i of `b` (the diagonal of the official
    `generalized_box_iou`, eps 1e-5): float32[N, 4] x 2 -> float32[N]."""
    area_a = (a_xyxy[:, 2] - a_xyxy[:, 0]) * (a_xyxy[:, 3] - a_xyxy[:, 1])
    area_b = (b_xyxy[:, 2] - b_xyxy[:, 0]) * (b_xyxy[:, 3] - b_xyxy[:, 1])
    wh = jnp.clip(jnp.minimum(a_xyxy[:, 2:], b_xyxy[:, 2:])
                  - jnp.maximum(a_xyxy[:, :2], b_xyxy[:, :2]), 0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / (union + GIOU_EPS)
    wh = jnp.clip(jnp.maximum(a_xyxy[:, 2:], b_xyxy[:, 2:])
                  - jnp.minimum(a_xyxy[:, :2], b_xyxy[:, :2]), 0)
    c = wh[:, 0] * wh[:, 1]
    return iou - (c - union) / (c + GIOU_EPS)


def coordinate_loss(coord_logits: jax.Array, gt_box: jax.Array, *,
                    weighting: str = "official") -> tuple[jax.Array, dict]:
    """The official grounding loss from the teacher-forced coordinate logits.

    Args:
      coord_logits: float[B, 4, NB] logits of the NB = 337 coordinate ids at the 4 positions
        that predict t0..t3 (decoder input [prefix, t0, t1, t2]).
      gt_box: float32[B, 4] ground truth (cx, cy, w, h) in [0, 1], unquantised.
      weighting: 'official' (G7 broadcasting) or 'per_sample'.
    Returns:
      (float32[] loss, aux) with aux float32 unless noted: 'target' int32[B, 4] bins,
      'nll' [B, 4], 'argmax' int32[B, 4] bins, 'pred' [B, 4], 'l1' [B, 4], 'weight_bbox'
      [B, 4], 'weight_giou' [B].
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    lg = coord_logits.astype(jnp.float32)
    res = lg.shape[-1] - 1
    gt = gt_box.astype(jnp.float32)
    target = jnp.floor(jnp.clip(gt, 0, 1) * jnp.float32(res)).astype(jnp.int32)
    nll = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, target[..., None], -1)[..., 0]
    a = jnp.argmax(jax.lax.stop_gradient(lg), -1).astype(jnp.int32)
    pred = a.astype(jnp.float32) / jnp.float32(res)
    l1 = jnp.abs(pred - gt)
    wb = jnp.clip(l1, 0, 5)
    wg = 1.0 - paired_giou(_xyxy(pred), _xyxy(gt))
    wb, wg = jax.lax.stop_gradient(wb), jax.lax.stop_gradient(wg)
    if weighting == "official":
        # mean over (i, j, k) of nll[i, k] * wb[j, k] * wg[j], factorised.
        loss = jnp.mean(jnp.mean(nll, 0) * jnp.mean(wb * wg[:, None], 0))
    elif weighting == "per_sample":
        loss = jnp.mean(nll * wb * wg[:, None])
    else:  # plain token cross-entropy
        loss = jnp.mean(nll)
    return loss, dict(target=target, nll=nll, argmax=a, pred=pred, l1=l1, weight_bbox=wb,
                      weight_giou=wg)


class Task(base.Task):
    """Grounding task (see module docstring).

    Args:
      config: full run config (`model`, `task`, `input`, `init`).
      steps_per_epoch: unused (no ramps).
    """

    name = "grounding"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        t = config.task
        self.weighting = str(t.get("loss_weighting", "official"))
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"task.loss_weighting must be one of {WEIGHTINGS}, got "
                             f"{self.weighting!r}")
        self.lq = int(config.input.max_query_len)
        if self.lq < 3:
            raise ValueError(f"input.max_query_len must be >= 3 ([CLS] word [SEP]), got "
                             f"{self.lq}")
        if self.model.vocab_size <= G.LAST_COORD_ID:
            raise ValueError(f"model.vocab_size {self.model.vocab_size} has no coordinate "
                             f"tokens (ids {G.PREFIX_ID}..{G.LAST_COORD_ID}: the "
                             "bert-base-uncased [unused339..676])")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, "grounding", "set --config.input.dataset to unc / unc+ / "
                              "gref_umd / ... with input.data_root and input.split_root")
        return grounding_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        r = self.model.image_size
        ids = np.zeros((batch_size, self.lq), np.int32)
        ids[:, :2] = (101, 102)
        return {"image": np.zeros((batch_size, r, r, 3), np.float32),
                "text_ids": ids, "text_mask": (ids > 0).astype(np.int32),
                "gt_box": np.full((batch_size, 4), 0.5, np.float32),
                "idx": np.zeros((batch_size,), np.int32)}

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(2)
        k_params, k_drop = jax.random.split(rng)
        dec = np.full((2, 5), G.PREFIX_ID, np.int32)
        return self.model.init({"params": k_params, "dropout": k_drop}, b["image"],
                               b["text_ids"], b["text_mask"], dec, np.ones_like(dec))["params"]

    def init_from_pretrained(self, state):
        """The base initialisation from `config.init`; refuses random weights unless
        `init.allow_scratch`."""
        self.require_init("grounding config fine-tunes a pretrained mPLUG: set "
                          "--config.init.checkpoint=PRETRAINING_WORKDIR (or an official / "
                          "converted checkpoint)")
        return super().init_from_pretrained(state)

    # ---- model calls ------------------------------------------------------------------------

    def states(self, params, image, ids, mask, drop: base.KeyStream | None = None):
        """Decoder memory [fused image; fused text]: (float[B, N + L, D], int32[B, N + L])."""
        def key():
            return next(drop) if drop is not None else None

        img = self._apply(params, "encode_image", image, rng=key())
        return base.fused_states(self._apply, params, img, ids, mask, key)

    def coord_logits(self, params, states, smask, gt_box, rng=None) -> jax.Array:
        """Teacher-forced coordinate logits float32[B, 4, 337] for boxes float32[B, 4]."""
        t = jnp.floor(jnp.clip(gt_box.astype(jnp.float32), 0, 1) * G.COORD_RES)
        dec = jnp.concatenate([jnp.full((gt_box.shape[0], 1), G.PREFIX_ID, jnp.int32),
                               t[:, :3].astype(jnp.int32) + G.FIRST_COORD_ID], 1)
        h = self._apply(params, base.decoder_hidden, dec, jnp.ones_like(dec), states, smask,
                        rng=rng)
        logits = self._apply(params, base.decoder_head, h)
        return logits[..., G.FIRST_COORD_ID:G.LAST_COORD_ID + 1].astype(jnp.float32)

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Weighted coordinate-token NLL (module docstring) -> (loss, (metrics, extra))."""
        drop = base.KeyStream(rng)
        st, sm = self.states(params, batch["image"], batch["text_ids"], batch["text_mask"],
                             drop)
        lg = self.coord_logits(params, st, sm, batch["gt_box"], rng=next(drop))
        loss, aux = coordinate_loss(lg, batch["gt_box"], weighting=self.weighting)
        iou = _iou_rows(aux["pred"], batch["gt_box"].astype(jnp.float32))
        metrics = {"loss": loss, "token_nll": jnp.mean(aux["nll"]),
                   "teacher_forced_acc50": jnp.mean((iou >= 0.5).astype(jnp.float32))}
        return loss, (metrics, extra)

    # ---- predict fns ------------------------------------------------------------------------

    def predict_fns(self) -> dict:
        return {"grounding_boxes": self.boxes}

    def boxes(self, params, image, ids, mask) -> jax.Array:
        """Greedy coordinate tokens int32[B, 4] (ids 345..681) of images float32[B, R, R, 3]
        and expressions int32[B, L]; `scoring.grounding.tokens_to_coords` makes them boxes."""
        states, smask = self.states(params, image, ids, mask)
        return generate.coordinate_greedy(self.model, params, states, smask,
                                          first_id=G.FIRST_COORD_ID, num_bins=G.NUM_BINS,
                                          prefix_id=G.PREFIX_ID)


def _iou_rows(pred: jax.Array, gt: jax.Array) -> jax.Array:
    """The metric IoU (prediction clamped to [0, 1]) of cxcywh rows float32[B, 4] -> [B]."""
    p, g = jnp.clip(_xyxy(pred), 0, 1), _xyxy(gt)
    wh = jnp.clip(jnp.minimum(p[:, 2:], g[:, 2:]) - jnp.maximum(p[:, :2], g[:, :2]), 0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return inter / (area(p) + area(g) - inter + 1e-16)
