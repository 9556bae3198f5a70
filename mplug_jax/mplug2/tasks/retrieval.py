"""mPLUG-2 text-to-video retrieval fine-tuning (MSRVTT format; the release has none).

Model: `models.mplug2_heads.MPLUG2WithHeads` = the release's mPLUG-2 + ITC projections, ITM
head (and MLM head / temperature, shared with `mplug2_pretrain`). Per clip:
video float32[B, T, R, R, 3] -> dual vision encoder (local temporal modules) -> universal
layers -> `image_embeds` float[B, N, H] (`visual_embeds`); token 0, the frame-averaged class
token after the universal layers, is the pooled video token. Caption -> `encode_text` (every
text layer, universal ones included); its [CLS] is the pooled text token.

Loss, as the image `retrieval` task (ALBEF / mPLUG v1 recipe), on those universal-layer
outputs:
- ITC: `vision_proj` / `text_proj` of the pooled tokens against [momentum batch; queue]
  (`losses.itc_loss`), positives = every entry with the same video (`video_index`, in the
  batch and in the queue via `idx_queue`), momentum distillation weight `distill_alpha`
  ramped over `alpha_warmup_epochs`; momentum features and their video ids then enqueued
  (`base.enqueue_features`). The momentum copy (`MOMENTUM_PARAMS`: vision encoder, visn_fc /
  LN, visn_emb_norm, text encoder with the universal layers and latents, projections) is
  updated by `begin_step` before the loss.
- ITM: B positives, B (hard negative video, caption) and B (video, hard negative caption)
  pairs through the fusion (`base.itm_with_hard_negatives`), negatives drawn from the
  in-batch similarities and never the same video or an identical caption.
The temperature is clamped to [temp_min, temp_max] after every update
(`base.clamp_temperature`).

Evaluation: the `video_retrieval` evaluator with this task's `video_embed` predict fn
(pooled unit feature + universal-layer tokens of the whole clip), ITM re-ranking of the
top-k_test and the official video score = ITM logit + similarity.

Init (`config.init.checkpoint`): a `mplug-jax convert` mPLUG-2 directory or official file
(with init.config_bert / init.config_yaml) -> every network weight, the heads (projections,
ITM, MLM, temperature) stay random (the release has none); a workdir of `mplug2_video_qa`,
`mplug2_retrieval` or `mplug2_pretrain` -> every array it has. The momentum copy starts equal
to the loaded weights. Random weights only with `init.allow_scratch`.

Batch: `data.mplug2_pretrain_input` (video, text_ids, text_mask, video_index, idx).
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import losses
from mplug_jax.mplug2 import heads as mplug2_heads
from mplug_jax.mplug2 import pretrain_input as mplug2_pretrain_input
from mplug_jax.mplug2.tasks import base as m2base
from mplug_jax.tasks import base

MOMENTUM_PARAMS = ("vision", "visn_fc", "visn_ln", "visn_emb_norm", "text", "vision_proj",
                   "text_proj")
EMPTY_ID = -100  # idx_queue value of an entry never written (matches nothing)


def check_itc_config(itc) -> None:
    """ValueError for a bad `task.itc` block."""
    if not 0 < float(itc.temp_min) <= float(itc.temp_max):
        raise ValueError(f"task.itc needs 0 < temp_min <= temp_max, got {itc.temp_min} / "
                         f"{itc.temp_max}")
    if not 0.0 <= float(itc.distill_alpha) <= 1.0:
        raise ValueError(f"task.itc.distill_alpha must be in [0, 1], got {itc.distill_alpha}")
    if not 0.0 <= float(itc.momentum) < 1.0:
        raise ValueError(f"task.itc.momentum must be in [0, 1), got {itc.momentum}")
    if int(itc.queue_size) < 0:
        raise ValueError(f"task.itc.queue_size must be >= 0, got {itc.queue_size}")


def contrastive(extra: dict, img_feat, txt_feat, img_feat_m, txt_feat_m, temp, alpha,
                ids: jax.Array | None = None) -> tuple[jax.Array, dict, dict]:
    """ITC against [momentum batch; queue] and the queue update.

    Args:
      extra: task state with (optionally) 'image_queue' / 'text_queue' float32[Q, E],
        'queue_ptr' int32[] and 'idx_queue' int32[Q].
      img_feat, txt_feat, img_feat_m, txt_feat_m: unit float32[B, E] (online / momentum).
      temp: float32[] clamped temperature; alpha: distillation weight.
      ids: int32[B] item ids >= 0 (same id = positives, also against 'idx_queue'); None =
        the diagonal only.
    Returns:
      (float32[] loss, {'sim_i2t', 'sim_t2i': float32[B, B]}, updated extra entries).
    """
    empty = jnp.zeros((0, img_feat.shape[-1]), jnp.float32)
    positives = None
    if ids is not None:
        # A queue without ids ('idx_queue'): its entries match nothing (ids are >= 0).
        q = extra["image_queue"].shape[0] if "image_queue" in extra else 0
        idx_queue = extra.get("idx_queue", jnp.full((q,), EMPTY_ID, jnp.int32))
        positives = ids[:, None] == jnp.concatenate([ids, idx_queue])[None, :]
    loss, sims = losses.itc_loss(img_feat, txt_feat, img_feat_m, txt_feat_m,
                                 extra.get("image_queue", empty), extra.get("text_queue", empty),
                                 temp, alpha, positives)
    upd = base.enqueue_features(extra, img_feat_m, txt_feat_m)
    if "idx_queue" in extra:
        write = ids if ids is not None else jnp.full(img_feat.shape[:1], EMPTY_ID, jnp.int32)
        upd["idx_queue"] = jax.lax.dynamic_update_slice(extra["idx_queue"], write,
                                                        (extra["queue_ptr"],))
    return loss, sims, upd


def queue_state(rng: jax.Array, size: int, dim: int, with_ids: bool) -> dict:
    """`base.feature_queues` (+ 'idx_queue' of EMPTY_ID when `with_ids`); {} when size 0."""
    if not size:
        return {}
    out = base.feature_queues(rng, size, dim)
    if with_ids:
        out["idx_queue"] = nn.LogicallyPartitioned(jnp.full((size,), EMPTY_ID, jnp.int32),
                                                   ("queue",))
    return out


def embedding_fns(task) -> dict:
    """Retrieval predict fns of a task holding an `MPLUG2WithHeads` (`task._apply`):

      video_embed(params, video float32[B, T, R, R, 3]) -> (unit float32[B, E], universal-
          layer tokens float[B, N, H])
      image_embed(params, image float32[B, R, R, 3]) -> same for images (image path)
      text_embed(params, ids int32[B, L], mask int32[B, L]) -> (unit float32[B, E],
          float[B, L, H])
      itm_score(params, vis float[B, N, H], txt float[B, L, H], mask int32[B, L]) ->
          float32[B] ITM "match" logit
    """
    def visual(params, x):
        img = task._apply(params, "visual_embeds", x)
        return task._apply(params, "itc_project", img[:, 0], img[:, 0])[0], img

    def text_embed(params, ids, mask):
        txt = task._apply(params, "encode_text", ids, mask)
        return task._apply(params, "itc_project", txt[:, 0], txt[:, 0])[1], txt

    def itm_score(params, vis, txt, mask):
        _, fused = task._apply(params, "fuse", vis, txt, mask)
        return task._apply(params, "itm_logits", fused[:, 0])[:, 1].astype(jnp.float32)

    return {"video_embed": visual, "image_embed": visual, "text_embed": text_embed,
            "itm_score": itm_score}


class HeadsTask(m2base.Task):
    """What the mPLUG-2 tasks on `MPLUG2WithHeads` (this one, `mplug2_pretrain`) share: the
    model, the `task.itc` settings, momentum / ITC queue init, the distillation ramp, the
    temperature clamp and the retrieval predict fns.

    Subclasses set `init_text` (the dummy-batch key prefixes of the text `init_params` feeds)
    and `queue_ids` (whether the ITC queue keeps item ids, 'idx_queue')."""

    model_cls = mplug2_heads.MPLUG2WithHeads
    queue_ids = True

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.itc = config.task.itc
        check_itc_config(self.itc)
        self.queue_size = int(self.itc.queue_size)
        self.momentum = float(self.itc.momentum)
        self.alpha_warmup_steps = int(round(float(self.itc.alpha_warmup_epochs)
                                            * self.steps_per_epoch))

    def momentum_filter(self):
        return lambda name: name.split("/", 1)[0] in MOMENTUM_PARAMS

    def init_extra(self, params, rng: jax.Array) -> dict:
        """Momentum copy, ITC queues (random unit rows), their ids (`queue_ids`) and the
        pointer."""
        extra = {"params_m": base.momentum_copy(params, self.momentum_filter())}
        extra.update(queue_state(rng, self.queue_size, self.model.embed_dim, self.queue_ids))
        return extra

    def alpha(self, step: jax.Array) -> jax.Array:
        return base.ramp(self.itc.distill_alpha, step, self.alpha_warmup_steps)

    def after_update(self, params):
        return base.clamp_temperature(params, self.itc)

    def predict_fns(self) -> dict:
        """`embedding_fns`: the `video_retrieval` evaluator's predict fns."""
        return embedding_fns(self)


class Task(HeadsTask):
    """mPLUG-2 text-video retrieval (module docstring).

    Args:
      config: full run config (`model` = MPLUG2WithHeads fields, `task`, `input`, `init`).
      steps_per_epoch: train steps per epoch (distillation ramp).
    """

    name = "mplug2.retrieval"
    title = "mPLUG-2 retrieval"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        lw = dict(config.task.loss_weights)
        unknown = set(lw) - {"itc", "itm"}
        self.w_itc, self.w_itm = float(lw.get("itc", 1.0)), float(lw.get("itm", 1.0))
        if unknown or self.w_itc < 0 or self.w_itm < 0 or not (self.w_itc or self.w_itm):
            raise ValueError(f"task.loss_weights takes itc / itm >= 0, not both 0; got {lw}")
        accum = max(int(config.optim.get("accum_steps", 1)), 1)
        self.batch_size = int(config.input.batch_size) // accum
        if self.batch_size < 2:
            raise ValueError(f"{self.name} needs at least 2 clips per loss call (hard "
                             f"negatives), got input.batch_size / optim.accum_steps = "
                             f"{self.batch_size}")
        if self.queue_size % self.batch_size:
            raise ValueError(
                f"task.itc.queue_size={self.queue_size} must be a multiple of the batch one "
                f"loss call sees: input.batch_size / optim.accum_steps = {self.batch_size}")
        self.max_len = int(config.input.max_tokens)
        if self.max_len < 2:
            raise ValueError(f"input.max_tokens must be >= 2, got {self.max_len}")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, cls.title, "set --config.input.dataset=json "
                              "with input.annotations (MSRVTT retrieval train jsonl) and "
                              "input.video_root")
        return mplug2_pretrain_input.retrieval_train_batches(config, jax.process_index(),
                                                             jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        t, r, length = self.model.num_frames, self.model.image_size, self.max_len
        return {"video": np.zeros((batch_size, t, r, r, 3), np.float32),
                "text_ids": np.zeros((batch_size, length), np.int32),
                "text_mask": np.ones((batch_size, length), np.int32),
                "video_index": np.arange(batch_size, dtype=np.int32),
                "idx": np.zeros((batch_size,), np.int32)}

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """w_itc * ITC + w_itm * ITM on one (micro-)batch (module docstring).

        Returns:
          (float32[] loss, (metrics dict of float32[], new extra)).
        """
        k_drop, k_neg = jax.random.split(rng)
        drop = base.KeyStream(k_drop)
        use_drop = self.model.dropout_rate > 0

        def key():
            return next(drop) if use_drop else None

        vid, ids, mask = batch["video"], batch["text_ids"], batch["text_mask"]
        vidx = batch["video_index"].astype(jnp.int32)
        b = ids.shape[0]
        alpha = self.alpha(step)
        temp = losses.clamp_temp(params["temp"], self.itc.temp_min, self.itc.temp_max)
        params_m = {**params, **extra["params_m"]}

        img = self._apply(params, "visual_embeds", vid, rng=key())
        txt = self._apply(params, "encode_text", ids, mask, rng=key())
        img_feat, txt_feat = self._apply(params, "itc_project", img[:, 0], txt[:, 0])
        img_m = self._apply(params_m, "visual_embeds", vid)
        txt_m = self._apply(params_m, "encode_text", ids, mask)
        img_feat_m, txt_feat_m = self._apply(params_m, "itc_project", img_m[:, 0], txt_m[:, 0])
        loss_itc, sims, upd = contrastive(extra, img_feat, txt_feat, img_feat_m, txt_feat_m,
                                          temp, alpha, vidx)
        new_extra = {**extra, **upd}
        same = (vidx[:, None] == vidx[None, :]) | jnp.all(ids[:, None, :] == ids[None, :, :], -1)
        loss_itm, itm_acc = base.itm_with_hard_negatives(
            self._apply, params, k_neg, img, txt, mask, sims["sim_i2t"], sims["sim_t2i"], same,
            rng=key())
        total = self.w_itc * loss_itc + self.w_itm * loss_itm
        # In-batch t2v accuracy of the online similarities (a cheap training signal).
        sim = txt_feat @ img_feat.T
        hit = vidx[jnp.argmax(sim, -1)] == vidx
        metrics = {"loss": total, "loss_itc": loss_itc, "loss_itm": loss_itm,
                   "itm_acc": itm_acc, "t2v_batch_acc": jnp.mean(hit.astype(jnp.float32)),
                   "temp": temp, "alpha": alpha,
                   "same_video_pairs": (jnp.sum(vidx[:, None] == vidx[None, :]) - b)
                   .astype(jnp.float32) / max(b * (b - 1), 1)}
        return total, (metrics, new_extra)
