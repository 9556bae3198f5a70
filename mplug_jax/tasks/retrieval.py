"""Image-text retrieval fine-tuning (COCO / Flickr30k): ITC with queues and momentum
distillation + ITM with hard negatives, as the official `model_retrieval_mplug.py` forward
(docs/fixtures.md#retrieval-training-forward; `interop.parity_tasks.retrieval_train_forward` is the
checked reference).

Per step: `begin_step` updates the momentum copy of the encoders and ITC projections first
(R9: official order); ITC compares online features with [momentum batch features; queue],
the hard targets uniform over every entry with the same image (`image_index`, in the batch and
in the queue via `idx_queue`: R7), mixed with the momentum softmax by alpha (ramped from 0 over
`alpha_warmup_epochs`); the momentum features and their image ids are then enqueued (R12). ITM
scores the B positives, B (hard negative image, text) and B (image, hard negative text) pairs;
negatives are drawn from the softmax of the in-batch similarities and are never the same image
(nor an identical caption). Losses and softmaxes are float32.

Deviations (documented): the temperature is clamped to [temp_min, temp_max] like ALBEF and our
pretraining (the official retrieval model leaves it unclamped, R10); hard-negative weights get
ALBEF's +1e-4 (official: plain masked softmax, R11), so a batch of one image cannot crash the
sampler; captions are truncated to `input.max_tokens` in training too (static shapes; R5).

The model and parameter tree are pretraining's, so `init.checkpoint` = a pretraining workdir
(or an official / converted checkpoint) loads everything; the decoder and MLM head get no
gradient and are frozen by the configs' `optim.frozen`.

Batch: see `mplug_jax.data.inputs.retrieval`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import losses
from mplug_jax.data.inputs import retrieval as retrieval_input
from mplug_jax.tasks import base

# The official momentum pairs (visual encoder, text encoder, projections, visn_fc / LN); the
# fusion encoder is not among them (R9).
MOMENTUM_PARAMS = ("vision", "visn_fc", "visn_ln", "text", "vision_proj", "text_proj")
EMPTY_ID = -100  # idx_queue value of an entry never written (official initial value)


def embedding_fns(task: base.Task) -> dict:
    """The retrieval predict fns of any task holding an `MPLUG` (`task._apply`):

      image_embed(params, image float[B, R, R, 3]) -> (float32[B, E] unit ITC embedding,
          float[B, N, D] image states)
      text_embed(params, ids int32[B, L], mask int32[B, L]) -> (float32[B, E], float[B, L, D])
      itm_score(params, img_states float[B, N, D], txt_states float[B, L, D],
          txt_mask int32[B, L]) -> float32[B] ITM logit of the "match" class (N may differ
          from the image model's, e.g. concatenated video frames)
    """
    def image_embed(params, image):
        img = task._apply(params, "encode_image", image)
        return task._apply(params, "itc_project", img[:, 0], img[:, 0])[0], img

    def text_embed(params, ids, mask):
        txt = task._apply(params, "encode_text", ids, mask)
        return task._apply(params, "itc_project", txt[:, 0], txt[:, 0])[1], txt

    def itm_score(params, img_states, txt_states, txt_mask):
        _, fused = task._apply(params, "fuse", img_states, txt_states, txt_mask)
        return task._apply(params, "itm_logits", fused[:, 0])[:, 1].astype(jnp.float32)

    return {"image_embed": image_embed, "text_embed": text_embed, "itm_score": itm_score}


class Task(base.Task):
    """Retrieval task (see module docstring).

    Args:
      config: full run config (`model`, `task`, `input`, `optim.accum_steps`, `init`).
      steps_per_epoch: train steps per epoch (distillation ramp).
    """

    name = "retrieval"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        t = config.task
        self.itc = t.itc
        if not 0 < self.itc.temp_min <= self.itc.temp_max:
            raise ValueError(f"task.itc needs 0 < temp_min <= temp_max, got "
                             f"{self.itc.temp_min} / {self.itc.temp_max}")
        if not 0.0 <= float(self.itc.distill_alpha) <= 1.0:
            raise ValueError(f"task.itc.distill_alpha must be in [0, 1], got "
                             f"{self.itc.distill_alpha}")
        self.w_itc = float(t.loss_weights.get("itc", 1.0))
        self.w_itm = float(t.loss_weights.get("itm", 1.0))
        unknown = set(t.loss_weights) - {"itc", "itm"}
        if unknown or self.w_itc < 0 or self.w_itm < 0 or not (self.w_itc or self.w_itm):
            raise ValueError(f"task.loss_weights takes itc / itm >= 0, not both 0; got "
                             f"{dict(t.loss_weights)}")
        accum = int(config.optim.get("accum_steps", 1))
        self.batch_size = int(config.input.batch_size) // max(accum, 1)
        self.queue_size = int(self.itc.queue_size)
        if self.queue_size % self.batch_size:
            raise ValueError(
                f"task.itc.queue_size={self.queue_size} must be a multiple of the batch one "
                f"loss call sees: input.batch_size / optim.accum_steps = {self.batch_size}")
        self.momentum = float(self.itc.momentum)
        self.alpha_warmup_steps = int(round(float(self.itc.alpha_warmup_epochs)
                                            * self.steps_per_epoch))
        self.max_len = int(config.input.max_tokens)

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        if config.get("mode") == "zeroshot":
            raise ValueError("mode=zeroshot evaluates a pretrained model without training: run "
                             "`mplug-jax evaluate --config configs/retrieval.py:VARIANT,"
                             "mode=zeroshot --checkpoint PRETRAIN_WORKDIR`")
        base.refuse_synthetic(config, "retrieval", "set --config.input.dataset=json with "
                              "input.train_annotations, input.eval_annotations and "
                              "input.image_root")
        return retrieval_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        r, length = self.model.image_size, self.max_len
        return {"image": np.zeros((batch_size, r, r, 3), np.float32),
                "text_ids": np.zeros((batch_size, length), np.int32),
                "text_mask": np.ones((batch_size, length), np.int32),
                "image_index": np.arange(batch_size, dtype=np.int32),
                "idx": np.zeros((batch_size,), np.int32)}

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(2)
        k_params, k_drop = jax.random.split(rng)
        ids, mask = b["text_ids"], b["text_mask"]
        return self.model.init({"params": k_params, "dropout": k_drop}, b["image"], ids, mask,
                               ids, mask)["params"]

    def momentum_filter(self):
        return lambda name: name.split("/", 1)[0] in MOMENTUM_PARAMS

    def init_extra(self, params, rng: jax.Array) -> dict:
        """Momentum copy (keeping the boxes of `params`), the ITC queues (random unit vectors,
        as the official `normalize(randn(E, Q))`), their image ids (-100: matches nothing) and
        the write pointer."""
        extra = {"params_m": base.momentum_copy(params, self.momentum_filter())}
        if self.queue_size:
            extra.update(base.feature_queues(rng, self.queue_size, self.model.embed_dim),
                         idx_queue=nn.LogicallyPartitioned(
                             jnp.full((self.queue_size,), EMPTY_ID, jnp.int32), ("queue",)))
        return extra

    def init_from_pretrained(self, state):
        self.require_init(
            "retrieval config fine-tunes a pretrained mPLUG: set "
            "--config.init.checkpoint=PRETRAINING_WORKDIR (or an official / converted "
            "checkpoint)")
        return super().init_from_pretrained(state)

    def alpha(self, step: jax.Array) -> jax.Array:
        """Distillation weight: `distill_alpha` ramped linearly over `alpha_warmup_epochs`."""
        return base.ramp(self.itc.distill_alpha, step, self.alpha_warmup_steps)

    def after_update(self, params):
        """Clamp the temperature into [temp_min, temp_max] (module docstring)."""
        return base.clamp_temperature(params, self.itc)

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """w_itc * ITC + w_itm * ITM on one (micro-)batch (module docstring).

        Returns:
          (float32[] loss, (metrics dict of float32[], new extra)).
        """
        k_drop, k_neg = jax.random.split(rng)
        drop = base.KeyStream(k_drop)
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        idx = batch["image_index"].astype(jnp.int32)
        b = ids.shape[0]
        alpha = self.alpha(step)
        temp = losses.clamp_temp(params["temp"], self.itc.temp_min, self.itc.temp_max)
        params_m = {**params, **extra["params_m"]}

        img = self._apply(params, "encode_image", image, rng=next(drop))
        txt = self._apply(params, "encode_text", ids, mask, rng=next(drop))
        img_feat, txt_feat = self._apply(params, "itc_project", img[:, 0], txt[:, 0])
        img_m = self._apply(params_m, "encode_image", image)
        txt_m = self._apply(params_m, "encode_text", ids, mask)
        img_feat_m, txt_feat_m = self._apply(params_m, "itc_project", img_m[:, 0], txt_m[:, 0])
        empty = jnp.zeros((0, img_feat.shape[-1]), jnp.float32)
        idx_queue = extra.get("idx_queue", jnp.zeros((0,), jnp.int32))
        positives = idx[:, None] == jnp.concatenate([idx, idx_queue])[None, :]
        loss_itc, sims = losses.itc_loss(
            img_feat, txt_feat, img_feat_m, txt_feat_m, extra.get("image_queue", empty),
            extra.get("text_queue", empty), temp, alpha, positives)
        new_extra = dict(extra)
        new_extra.update(base.enqueue_features(extra, img_feat_m, txt_feat_m))
        if self.queue_size:
            new_extra["idx_queue"] = jax.lax.dynamic_update_slice(idx_queue, idx,
                                                                  (extra["queue_ptr"],))

        same = (idx[:, None] == idx[None, :]) | jnp.all(ids[:, None, :] == ids[None, :, :], -1)
        loss_itm, itm_acc = base.itm_with_hard_negatives(
            self._apply, params, k_neg, img, txt, mask, sims["sim_i2t"], sims["sim_t2i"], same,
            rng=next(drop))
        total = self.w_itc * loss_itc + self.w_itm * loss_itm
        metrics = {"loss": total, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": itm_acc,
                   "temp": temp, "alpha": alpha,
                   # share of in-batch negatives that are in fact the same image
                   "same_image_pairs": (jnp.sum(idx[:, None] == idx[None, :]) - b)
                   .astype(jnp.float32) / max(b * (b - 1), 1)}
        return total, (metrics, new_extra)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return embedding_fns(self)
