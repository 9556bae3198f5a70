"""mPLUG pretraining task: ITC + ITM + MLM + prefix LM with momentum distillation and queues.

The official release has no pretraining code (docs/official-formats.md#release-contents); this
follows the paper (section 3.3) and the ALBEF forward it builds on: a momentum copy of the parts the
momentum forwards use (visual and text encoders, fusion, ITC projections, MLM head; the decoder
too when `task.prefix_lm.distill`), image/text feature queues, hard negatives for ITM drawn from
the ITC similarities, momentum distillation for ITC and MLM (and optionally prefix LM), and
prefix LM through the decoder attending to [fused image; fused prefix]. A loss weight of 0 in
`config.task.loss_weights` removes that loss and its compute. Losses, softmaxes and queues are
float32. The temperature is clamped to [temp_min, temp_max] after every update (ALBEF clamps
it in place), so it never sits outside the range with a zero gradient.

Batch: {'image': float32[B, R, R, 3] (uint8 by `input.image_dtype`), 'text_ids': int32[B, L],
'text_mask': int32[B, L]}.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate, losses
from mplug_jax.data import pipeline
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.models import layers
from mplug_jax.tasks import base

LOSSES = ("itc", "itm", "mlm", "prefix_lm")
# Top-level params the momentum forwards read (`encode_image`, `encode_text`, `itc_project`,
# `fuse`, `mlm_logits`); `decoder` joins them when prefix-LM distillation is on.
MOMENTUM_PARAMS = ("vision", "visn_fc", "visn_ln", "text", "fusion", "vision_proj", "text_proj",
                   "mlm_transform", "mlm_ln", "mlm_bias")


def _gather(states: jax.Array, pos: jax.Array) -> jax.Array:
    """float[B, L, D] states at flat positions int32[K] -> float[1, K, D].

    The K rows are split over the batch axes: left to itself XLA replicates the gathered rows,
    and with them the V-way head, on every data-parallel device."""
    rows = states.reshape(-1, states.shape[-1])[pos]
    return layers.constrain(rows, ("batch", "act_embed"))[None]


GATHER_MULTIPLE = 64  # gathered rows split evenly over up to 64 batch shards


def gather_capacity(n: int, mean: float, var: float, sigmas: float) -> int:
    """Static number of gathered targets: mean + `sigmas` standard deviations, rounded up to a
    multiple of `GATHER_MULTIPLE` (the rows are split over the batch shards), at most n (the
    B x L positions, themselves divisible by the batch shards).

    With `sigmas` = 6 a batch overflows with probability below 1e-9 under the normal
    approximation; `sigmas` <= 0 gathers all n positions (no drops possible)."""
    if sigmas <= 0:
        return n
    k = math.ceil(mean + sigmas * math.sqrt(max(var, 0.0)))
    return int(min(n, -(-k // GATHER_MULTIPLE) * GATHER_MULTIPLE))


class Task(base.Task):
    """Pretraining task (see module docstring).

    Args:
      config: full run config (`model`, `task`, `input`, `optim.accum_steps`, `init`).
      steps_per_epoch: train steps per epoch, for the linear ramp of the distillation weight.
    """

    name = "pretrain"
    capacity_hint = "raise task.gather_sigmas or shorten input.max_tokens"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        t = config.task
        unknown = set(t.loss_weights) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; valid: {LOSSES}")
        self.weights = {k: float(t.loss_weights.get(k, 0.0)) for k in LOSSES}
        if not any(self.weights.values()):
            raise ValueError("task.loss_weights: at least one loss weight must be > 0")
        self.itc = t.itc
        if not 0 < self.itc.temp_min <= self.itc.temp_max:
            raise ValueError(f"task.itc needs 0 < temp_min <= temp_max, got "
                             f"{self.itc.temp_min} / {self.itc.temp_max}")
        self.mask_prob = float(t.mlm.mask_prob)
        self.gather_sigmas = float(t.gather_sigmas)
        # Texts the capacities are sized for: input.max_tokens unless the data is known to be
        # shorter (task.gather_length; the built-in shapes captions have at most 15 tokens).
        self.gather_length = int(t.get("gather_length", 0) or config.input.max_tokens)
        self.lm_distill = bool(t.prefix_lm.get("distill", False))
        # One loss call sees a micro-batch: the global batch / optim.accum_steps.
        accum = int(config.optim.get("accum_steps", 1))
        self.batch_size = int(config.input.batch_size) // max(accum, 1)
        if self.weights["itc"] and self.itc.queue_size % self.batch_size:
            raise ValueError(
                f"task.itc.queue_size={self.itc.queue_size} must be a multiple of the batch one "
                f"loss call sees: input.batch_size / optim.accum_steps = {self.batch_size}")
        self.alpha_warmup_steps = int(round(self.itc.alpha_warmup_epochs * self.steps_per_epoch))
        self.momentum = float(self.itc.momentum)
        self.max_len = int(config.input.max_tokens)
        self.image_dtype = pipeline.check_image_dtype(config.input.get("image_dtype", "float32"))

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, "pretraining",
                              "set input.dataset to 'json' or 'tfds' with your data")
        return pretrain_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        r, length = self.model.image_size, self.max_len
        return {"image": np.zeros((batch_size, r, r, 3), self.image_dtype),
                "text_ids": np.zeros((batch_size, length), np.int32),
                "text_mask": np.ones((batch_size, length), np.int32)}

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(2)
        k_params, k_drop = jax.random.split(rng)
        ids, mask = b["text_ids"], b["text_mask"]
        return self.model.init({"params": k_params, "dropout": k_drop}, b["image"], ids, mask,
                               ids, mask)["params"]

    def momentum_filter(self):
        keep = MOMENTUM_PARAMS + (("decoder",) if self.lm_distill else ())
        return lambda name: name.split("/", 1)[0] in keep

    def init_extra(self, params, rng: jax.Array) -> dict:
        """Momentum params (a copy of what the momentum forwards read, keeping the boxes of
        `params`), the ITC queues, and the running count of dropped MLM/LM targets.

        Queues start as random unit vectors, like ALBEF's `normalize(randn(E, Q))`; they carry
        the logical axes ('queue', None), so the `fsdp` presets shard them like parameters.
        """
        extra = {"dropped_targets": jnp.zeros((), jnp.int32)}
        if self._needs_momentum:
            extra["params_m"] = base.momentum_copy(params, self.momentum_filter())
        if self.weights["itc"] and self.itc.queue_size:
            extra.update(base.feature_queues(rng, int(self.itc.queue_size),
                                             self.model.embed_dim))
        return extra

    def init_from_pretrained(self, state):
        self.require_init(
            "pretraining config starts from pretrained encoders (paper section 5.1): set "
            "--config.init.clip=CLIP_CHECKPOINT --config.init.bert=BERT_CHECKPOINT (or "
            "--config.init.checkpoint=...)")
        return super().init_from_pretrained(state)

    @property
    def _distill(self) -> bool:
        return float(self.itc.distill_alpha) > 0

    @property
    def _needs_momentum(self) -> bool:
        return bool(self.weights["itc"] or (self.weights["mlm"] and self._distill)
                    or (self.weights["prefix_lm"] and self._distill and self.lm_distill))

    # ---- model calls ------------------------------------------------------------------------

    @staticmethod
    def _momentum_tree(params_m, params):
        """The momentum subset completed with online leaves the module's `setup` declares but
        the momentum forwards never read (decoder, ITM head, temperature)."""
        return {**params, **params_m}

    def alpha(self, step: jax.Array) -> jax.Array:
        """Distillation weight: `distill_alpha`, ramped linearly over the first epoch(s)."""
        return base.ramp(self.itc.distill_alpha, step, self.alpha_warmup_steps)

    # ---- step -------------------------------------------------------------------------------

    def after_update(self, params):
        """Clamp the temperature into [temp_min, temp_max] (ALBEF clamps it in place)."""
        return base.clamp_temperature(params, self.itc)

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Weighted sum of the enabled losses on one (micro-)batch.

        Args:
          params: online params.
          extra: {'params_m', 'image_queue', 'text_queue', 'queue_ptr', 'dropped_targets'}
            (as enabled), after `begin_step` (momentum params already updated for this step).
          batch: see module docstring.
          rng: step key; dropout, negatives, masking and prefix splits are folded from it.
          step: int32[] train step (distillation ramp).
        Returns:
          (float32[] loss, (metrics dict of float32[], new extra)).
        """
        w = self.weights
        k_drop, k_neg, k_mask, k_prefix = jax.random.split(rng, 4)
        drop = base.KeyStream(k_drop)
        image, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
        b, length = ids.shape
        alpha = self.alpha(step)
        temp = losses.clamp_temp(params["temp"], self.itc.temp_min, self.itc.temp_max)
        metrics = {"temp": temp, "alpha": alpha}
        new_extra = dict(extra)
        dropped = jnp.zeros((), jnp.int32)
        total = jnp.zeros((), jnp.float32)
        if self._needs_momentum:
            params_m = self._momentum_tree(extra["params_m"], params)
            img_m = self._apply(params_m, "encode_image", image)

        img = self._apply(params, "encode_image", image, rng=next(drop))
        if w["itc"] or w["itm"]:
            txt = self._apply(params, "encode_text", ids, mask, rng=next(drop))
            img_feat, txt_feat = self._apply(params, "itc_project", img[:, 0], txt[:, 0])
        if w["itc"]:
            txt_m = self._apply(params_m, "encode_text", ids, mask)
            img_feat_m, txt_feat_m = self._apply(params_m, "itc_project", img_m[:, 0],
                                                 txt_m[:, 0])
            # queue_size 0: in-batch negatives only (no queue state).
            empty = jnp.zeros((0, img_feat.shape[-1]), jnp.float32)
            loss_itc, sims = losses.itc_loss(
                img_feat, txt_feat, img_feat_m, txt_feat_m, extra.get("image_queue", empty),
                extra.get("text_queue", empty), temp, alpha if self._distill else 0.0)
            metrics["loss_itc"] = loss_itc
            total += w["itc"] * loss_itc
            new_extra.update(base.enqueue_features(extra, img_feat_m, txt_feat_m))
        if w["itm"]:
            if w["itc"]:
                sim_i2t, sim_t2i = sims["sim_i2t"], sims["sim_t2i"]
            else:  # no momentum model: sample from online similarities
                sim_i2t = img_feat @ txt_feat.T / temp
                sim_t2i = sim_i2t.T
            # Identical captions (frequent in small-vocabulary data) are matches, not negatives.
            same_text = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
            loss_itm, metrics["itm_acc"] = base.itm_with_hard_negatives(
                self._apply, params, k_neg, img, txt, mask, sim_i2t, sim_t2i, same_text,
                rng=next(drop))
            metrics["loss_itm"] = loss_itm
            total += w["itm"] * loss_itm
        if w["mlm"]:
            masked, picked = losses.mask_tokens(k_mask, ids, mask, self.model.vocab_size,
                                                self.mask_prob)
            txt_mlm = self._apply(params, "encode_text", masked, mask, rng=next(drop))
            _, fused = self._apply(params, "fuse", img, txt_mlm, mask, rng=next(drop))
            # Only picked tokens need the V-way head: gather them (static capacity).
            pos, valid, lost = losses.picked_positions(picked, self.mlm_capacity(b, length))
            dropped += lost

            def head(p, states):
                return self._apply(p, "mlm_logits", _gather(states, pos))

            logits = head(params, fused)
            logits_m = None
            if self._distill:
                txt_mlm_m = self._apply(params_m, "encode_text", masked, mask)
                _, fused_m = self._apply(params_m, "fuse", img_m, txt_mlm_m, mask)
                logits_m = head(params_m, fused_m)
            loss_mlm, metrics["mlm_acc"] = losses.mlm_loss(
                logits, ids.reshape(-1)[pos][None], valid[None], logits_m, alpha)
            metrics["loss_mlm"] = loss_mlm
            total += w["mlm"] * loss_mlm
        if w["prefix_lm"]:
            p_ids, p_mask, d_ids, d_mask = losses.split_prefix(k_prefix, ids, mask)
            # The V-way LM head only where a real next token is predicted (static capacity).
            pos, valid, lost = losses.picked_positions(d_mask[:, 1:] > 0,
                                                       self.lm_capacity(b, length))
            dropped += lost

            def lm_logits(p, img_states, rng_stream):
                def key():  # dropout only on the online path
                    return next(rng_stream) if rng_stream else None

                txt_p = self._apply(p, "encode_text", p_ids, p_mask, rng=key())
                f_img, f_txt = self._apply(p, "fuse", img_states, txt_p, p_mask, rng=key())
                states = jnp.concatenate([f_img, f_txt], 1)
                smask = jnp.concatenate([jnp.ones(f_img.shape[:2], p_mask.dtype), p_mask], 1)
                h = self._apply(p, base.decoder_hidden, d_ids, d_mask, states, smask, rng=key())
                return self._apply(p, base.decoder_head, _gather(h[:, :-1], pos))

            logits = lm_logits(params, img, drop)
            logits_m = None
            if self.lm_distill and self._distill:
                logits_m = lm_logits(params_m, img_m, None)
            loss_lm, metrics["lm_acc"] = losses.mlm_loss(
                logits, d_ids[:, 1:].reshape(-1)[pos][None], valid[None], logits_m, alpha)
            metrics["loss_prefix_lm"] = loss_lm
            total += w["prefix_lm"] * loss_lm
        new_extra["dropped_targets"] = extra["dropped_targets"] + dropped
        metrics["dropped_targets_total"] = new_extra["dropped_targets"].astype(jnp.float32)
        metrics["loss"] = total
        return total, (metrics, new_extra)

    def mlm_capacity(self, b: int, length: int) -> int:
        """Gathered MLM positions for a [b, length] batch of texts of `gather_length` tokens:
        at most gather_length - 2 eligible tokens a row ([CLS] and [SEP] never picked), each
        picked with probability `mask_prob` (binomial)."""
        n, p = b * max(min(length, self.gather_length) - 2, 1), self.mask_prob
        return gather_capacity(b * length, n * p, n * p * (1 - p), self.gather_sigmas)

    def lm_capacity(self, b: int, length: int) -> int:
        """Gathered decoder targets for a [b, length] batch of captions of `gather_length`
        tokens: a row with n tokens is split uniformly, leaving u targets, u uniform on [2, n]
        (the continuation and [SEP])."""
        n = min(length, self.gather_length)
        mean, var = (n + 2) / 2, ((n - 1) ** 2 - 1) / 12
        return gather_capacity(b * (length - 1), b * mean, b * var, self.gather_sigmas)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        from mplug_jax.tasks import retrieval  # image_embed / text_embed / itm_score (zero-shot)
        return {"embed": self.embed, "itm_logits": self.itm_logits,
                "mlm_logits": self.mlm_logits, "greedy_decode": self.greedy_decode,
                **retrieval.embedding_fns(self)}

    def embed(self, params, image: jax.Array, ids: jax.Array, mask: jax.Array):
        """-> (float32[B, E] image features, float32[B, E] text features), unit norm."""
        img = self._apply(params, "encode_image", image)
        txt = self._apply(params, "encode_text", ids, mask)
        return self._apply(params, "itc_project", img[:, 0], txt[:, 0])

    def itm_logits(self, params, image: jax.Array, ids: jax.Array, mask: jax.Array):
        """-> float32[B, 2] matching logits of (image i, text i)."""
        img = self._apply(params, "encode_image", image)
        txt = self._apply(params, "encode_text", ids, mask)
        _, fused = self._apply(params, "fuse", img, txt, mask)
        return self._apply(params, "itm_logits", fused[:, 0])

    def mlm_logits(self, params, image: jax.Array, ids: jax.Array, mask: jax.Array):
        """-> float32[B, L, V] masked-LM logits of (possibly corrupted) `ids` given `image`."""
        img = self._apply(params, "encode_image", image)
        txt = self._apply(params, "encode_text", ids, mask)
        _, fused = self._apply(params, "fuse", img, txt, mask)
        return self._apply(params, "mlm_logits", fused)

    def greedy_decode(self, params, image: jax.Array, max_len: int) -> jax.Array:
        """Caption by greedy decoding from [CLS] until [SEP] (empty text prefix).

        Args:
          image: float32[B, R, R, 3].
          max_len: T, length of the output buffer ([CLS] included).
        Returns:
          int32[B, T]: [CLS] w1 .. [SEP] then [PAD].
        """
        b = image.shape[0]
        img = self._apply(params, "encode_image", image)
        prefix = jnp.full((b, 1), losses.CLS_ID, jnp.int32)
        pmask = jnp.ones((b, 1), jnp.int32)
        txt = self._apply(params, "encode_text", prefix, pmask)
        f_img, f_txt = self._apply(params, "fuse", img, txt, pmask)
        states = jnp.concatenate([f_img, f_txt], 1)
        smask = jnp.ones(states.shape[:2], jnp.int32)
        # Key/value-cached: each token passes the decoder once (generate.greedy).
        return generate.greedy(self.model, params, states, smask, max_len)
