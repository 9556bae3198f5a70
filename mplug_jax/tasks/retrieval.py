"""Image-text retrieval fine-tuning (COCO / Flickr30k): ITC with queues and momentum
distillation + ITM with hard negatives, as the official `model_retrieval_mplug.py` forward
(docs/fixtures.md#retrieval-training-forward; `parity.retrieval.retrieval_train_forward` is the
checked reference).

Per step: `begin_step` updates the momentum copy of the encoders and ITC projections first
(R9: official order); ITC compares online features with [momentum batch features; queue],
the hard targets uniform over every entry with the same image (`image_index`, in the batch and
in the queue via `idx_queue`: R7), mixed with the momentum softmax by alpha (ramped from 0 over
`alpha_warmup_epochs`); the momentum features and their image ids are then enqueued (R12). ITM
scores the B positives, B (hard negative image, text) and B (image, hard negative text) pairs;
negatives are drawn from the softmax of the in-batch similarities and are never the same image
(nor an identical caption). Losses and softmaxes are float32. `task.negatives`: the in-batch
ITC columns and the hard negatives come from the whole batch ('global') or from each batch
shard's own rows ('per_device', the official per-GPU pools under DDP; `mplug_jax.negatives`).

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

from mplug_jax import losses, negatives
from mplug_jax.data.inputs import retrieval as retrieval_input
from mplug_jax.tasks import base

# The official momentum pairs (visual encoder, text encoder, projections, visn_fc / LN); the
# fusion encoder is not among them (R9).
MOMENTUM_PARAMS = ("vision", "visn_fc", "visn_ln", "text", "vision_proj", "text_proj")
EMPTY_ID = -100  # idx_queue value of an entry never written (official initial value)


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


def itc_itm_weights(loss_weights) -> tuple[float, float]:
    """(w_itc, w_itm) of `task.loss_weights` (each default 1); ValueError for another key, a
    negative weight or both 0."""
    lw = dict(loss_weights)
    w_itc, w_itm = float(lw.get("itc", 1.0)), float(lw.get("itm", 1.0))
    if set(lw) - {"itc", "itm"} or w_itc < 0 or w_itm < 0 or not (w_itc or w_itm):
        raise ValueError(f"task.loss_weights takes itc / itm >= 0, not both 0; got {lw}")
    return w_itc, w_itm


def loss_batch_size(config, queue_size: int, min_rows: int = 1, rows: str = "rows") -> int:
    """Rows one loss call sees (input.batch_size / optim.accum_steps); ValueError when fewer
    than `min_rows` or when the ITC queue does not hold a whole number of them."""
    batch = int(config.input.batch_size) // max(int(config.optim.get("accum_steps", 1)), 1)
    if batch < min_rows:
        raise ValueError(f"{config.task.name} needs at least {min_rows} {rows} per loss call "
                         f"(hard negatives), got input.batch_size / optim.accum_steps = "
                         f"{batch}")
    if queue_size % batch:
        raise ValueError(
            f"task.itc.queue_size={queue_size} must be a multiple of the batch one "
            f"loss call sees: input.batch_size / optim.accum_steps = {batch}")
    return batch


def contrastive_loss(queues: dict, img_feat, txt_feat, img_feat_m, txt_feat_m, temp, alpha,
                     ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """ITC against [momentum batch; queue].

    Args:
      queues: (optionally) 'image_queue' / 'text_queue' float32[Q, E] and 'idx_queue'
        int32[Q] (other entries are ignored).
      img_feat, txt_feat, img_feat_m, txt_feat_m: unit float32[B, E] (online / momentum).
      temp: float32[] clamped temperature; alpha: distillation weight.
      ids: int32[B] item ids >= 0 (same id = positives, also against 'idx_queue'); None =
        the diagonal only.
    Returns:
      (float32[] loss, {'sim_i2t', 'sim_t2i': float32[B, B]}).
    """
    empty = jnp.zeros((0, img_feat.shape[-1]), jnp.float32)
    positives = None
    if ids is not None:
        # A queue without ids ('idx_queue'): its entries match nothing (ids are >= 0).
        q = queues["image_queue"].shape[0] if "image_queue" in queues else 0
        idx_queue = queues.get("idx_queue", jnp.full((q,), EMPTY_ID, jnp.int32))
        positives = ids[:, None] == jnp.concatenate([ids, idx_queue])[None, :]
    return losses.itc_loss(img_feat, txt_feat, img_feat_m, txt_feat_m,
                           queues.get("image_queue", empty), queues.get("text_queue", empty),
                           temp, alpha, positives)


def enqueue(extra: dict, img_feat_m, txt_feat_m, ids: jax.Array | None = None) -> dict:
    """The queue entries of `extra` after writing the momentum features float32[B, E] (and
    the int32[B] item ids, EMPTY_ID when None) at 'queue_ptr'; {} without a queue."""
    upd = base.enqueue_features(extra, img_feat_m, txt_feat_m)
    if "idx_queue" in extra:
        write = ids if ids is not None else jnp.full(img_feat_m.shape[:1], EMPTY_ID, jnp.int32)
        upd["idx_queue"] = jax.lax.dynamic_update_slice(extra["idx_queue"], write,
                                                        (extra["queue_ptr"],))
    return upd


def contrastive(extra: dict, img_feat, txt_feat, img_feat_m, txt_feat_m, temp, alpha,
                ids: jax.Array | None = None) -> tuple[jax.Array, dict, dict]:
    """`contrastive_loss` on the queues of task state `extra`, then `enqueue`: (float32[]
    loss, {'sim_i2t', 'sim_t2i': float32[B, B]}, updated extra entries)."""
    loss, sims = contrastive_loss(extra, img_feat, txt_feat, img_feat_m, txt_feat_m, temp,
                                  alpha, ids)
    return loss, sims, enqueue(extra, img_feat_m, txt_feat_m, ids)


def queue_state(rng: jax.Array, size: int, dim: int, with_ids: bool) -> dict:
    """`base.feature_queues` (+ 'idx_queue' of EMPTY_ID, matching nothing, when `with_ids`);
    {} when size 0."""
    if not size:
        return {}
    out = base.feature_queues(rng, size, dim)
    if with_ids:
        out["idx_queue"] = nn.LogicallyPartitioned(jnp.full((size,), EMPTY_ID, jnp.int32),
                                                   ("queue",))
    return out


def same_item_share(idx: jax.Array, pools: int = 1) -> jax.Array:
    """float32[] share of the in-batch negative pairs of int32[B] item ids that are in fact
    the same item (pairs within each of `pools` equal blocks of rows, averaged over them)."""
    def share(i):
        b = i.shape[0]
        return (jnp.sum(i[:, None] == i[None, :]) - b).astype(jnp.float32) / max(b * (b - 1), 1)

    return jnp.mean(jax.vmap(share)(idx.reshape(pools, -1)))


def embedding_fns(task: base.Task, visual: str = "encode_image",
                  visual_names: tuple[str, ...] = ("image_embed",)) -> dict:
    """The retrieval predict fns of any task holding an `MPLUG` or `MPLUG2WithHeads`
    (`task._apply`), the visual side through the model method `visual`:

      <each of visual_names>(params, image float[B, R, R, 3] (or video float[B, T, R, R, 3]
          for `visual_embeds`)) -> (float32[B, E] unit ITC embedding of token 0,
          float[B, N, D] visual states)
      text_embed(params, ids int32[B, L], mask int32[B, L]) -> (float32[B, E], float[B, L, D])
      itm_score(params, img_states float[B, N, D], txt_states float[B, L, D],
          txt_mask int32[B, L]) -> float32[B] ITM logit of the "match" class (N may differ
          from the image model's, e.g. concatenated video frames)
    """
    def visual_embed(params, x):
        img = task._apply(params, visual, x)
        return task._apply(params, "itc_project", img[:, 0], img[:, 0])[0], img

    def text_embed(params, ids, mask):
        txt = task._apply(params, "encode_text", ids, mask)
        return task._apply(params, "itc_project", txt[:, 0], txt[:, 0])[1], txt

    def itm_score(params, img_states, txt_states, txt_mask):
        _, fused = task._apply(params, "fuse", img_states, txt_states, txt_mask)
        return task._apply(params, "itm_logits", fused[:, 0])[:, 1].astype(jnp.float32)

    return {**{name: visual_embed for name in visual_names}, "text_embed": text_embed,
            "itm_score": itm_score}


class ITCMixin:
    """The ITC / ITM machinery the retrieval tasks share (this module's `Task`,
    `mplug2.tasks.retrieval`): `task.itc` settings, the momentum copy of `momentum_params`,
    ITC queues (with item ids when `queue_ids`), the distillation ramp, the temperature clamp
    and the ITC + ITM loss over a visual model method. Mixed into a `base.Task`."""

    momentum_params: tuple[str, ...] = MOMENTUM_PARAMS
    queue_ids = True
    negatives = "global"  # the retrieval tasks set `task.negatives`

    def setup_itc(self, itc) -> None:
        """Read and check `task.itc` (after `base.Task.__init__`: the ramp needs
        `steps_per_epoch`)."""
        check_itc_config(itc)
        self.itc = itc
        self.queue_size = int(itc.queue_size)
        self.momentum = float(itc.momentum)
        self.alpha_warmup_steps = int(round(float(itc.alpha_warmup_epochs)
                                            * self.steps_per_epoch))

    def momentum_filter(self):
        return lambda name: name.split("/", 1)[0] in self.momentum_params

    def init_extra(self, params, rng: jax.Array) -> dict:
        """Momentum copy (keeping the boxes of `params`), the ITC queues (random unit vectors,
        as the official `normalize(randn(E, Q))`), their item ids (`queue_ids`; -100:
        matches nothing) and the write pointer."""
        extra = {"params_m": base.momentum_copy(params, self.momentum_filter())}
        extra.update(queue_state(rng, self.queue_size, self.model.embed_dim, self.queue_ids))
        return extra

    def alpha(self, step: jax.Array) -> jax.Array:
        """Distillation weight: `distill_alpha` ramped linearly over `alpha_warmup_epochs`."""
        return base.ramp(self.itc.distill_alpha, step, self.alpha_warmup_steps)

    def after_update(self, params):
        """Clamp the temperature into [temp_min, temp_max]."""
        return base.clamp_temperature(params, self.itc)

    def negative_pools(self) -> int:
        """Pools the (micro-)batch traced now draws its negatives from (`negatives.pools`)."""
        return negatives.pools(self.negatives)

    def itc_itm_loss(self, params, extra: dict, rng: jax.Array, step: jax.Array,
                     visual_method: str, visual: jax.Array, ids: jax.Array, mask: jax.Array,
                     idx: jax.Array, pool_index: int | None = None):
        """w_itc * ITC + w_itm * ITM of one (micro-)batch (module docstring), the in-batch
        negatives drawn per `negatives` pool (`mplug_jax.negatives`); the queue is read whole
        by every pool and then gets the whole batch's momentum features in row order (the
        official concat_all_gather).

        Args:
          visual_method: the model method encoding `visual` (its token 0 is pooled).
          visual: the batch's images / videos; ids / mask: int32[B, L] captions;
          idx: int32[B] item ids (same id = positives, never hard negatives of each other).
          pool_index: draw the hard negatives as pool `pool_index` of a per_device split
            does (`negatives.pool_key` with n > 1; tests compare against this); None: as the
            pools `negatives` gives.
        Returns:
          (float32[] loss, metrics {name: float32[]}, new extra, (img_feat, txt_feat) unit
          float32[B, E] online features).
        """
        k_drop, k_neg = jax.random.split(rng)
        if pool_index is not None:  # the key of shard `pool_index` of n > 1
            k_neg = jax.random.fold_in(k_neg, pool_index)
        key = self.dropout_keys(k_drop)
        alpha = self.alpha(step)
        temp = losses.clamp_temp(params["temp"], self.itc.temp_min, self.itc.temp_max)
        params_m = {**params, **extra["params_m"]}

        img = self._apply(params, visual_method, visual, rng=key())
        txt = self._apply(params, "encode_text", ids, mask, rng=key())
        img_feat, txt_feat = self._apply(params, "itc_project", img[:, 0], txt[:, 0])
        img_m = self._apply(params_m, visual_method, visual)
        txt_m = self._apply(params_m, "encode_text", ids, mask)
        img_feat_m, txt_feat_m = self._apply(params_m, "itc_project", img_m[:, 0], txt_m[:, 0])

        def pool(k, shared, rows):  # ITC and the ITM pairs of one pool's rows
            queues, temp, alpha = shared
            img, txt, mask, ids, idx, *feats = rows
            loss_itc, sims = contrastive_loss(queues, *feats, temp, alpha, idx)
            same = (idx[:, None] == idx[None, :]) | jnp.all(ids[:, None] == ids[None], -1)
            return loss_itc, base.hard_negative_pairs(k, img, txt, mask, sims["sim_i2t"],
                                                      sims["sim_t2i"], same)

        queues = {k: extra[k] for k in ("image_queue", "text_queue", "idx_queue") if k in extra}
        loss_itc, pairs = negatives.per_pool(
            pool, self.negatives, k_neg, (queues, temp, alpha),
            (img, txt, mask, ids, idx, img_feat, txt_feat, img_feat_m, txt_feat_m))
        upd = enqueue(extra, img_feat_m, txt_feat_m, idx)
        loss_itm, itm_acc = base.itm_pairs_loss(self._apply, params, *pairs,
                                                self.negative_pools(), rng=key())
        total = self.w_itc * loss_itc + self.w_itm * loss_itm
        metrics = {"loss": total, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": itm_acc,
                   "temp": temp, "alpha": alpha}
        return total, metrics, {**extra, **upd}, (img_feat, txt_feat)


class Task(ITCMixin, base.Task):
    """Retrieval task (see module docstring).

    Args:
      config: full run config (`model`, `task`, `input`, `optim.accum_steps`, `init`).
      steps_per_epoch: train steps per epoch (distillation ramp).
    """

    name = "retrieval"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        self.setup_itc(config.task.itc)
        self.negatives = negatives.check(config.task.get("negatives", "global"))
        self.w_itc, self.w_itm = itc_itm_weights(config.task.loss_weights)
        self.batch_size = loss_batch_size(config, self.queue_size)
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

    def init_from_pretrained(self, state):
        self.require_init(
            "retrieval config fine-tunes a pretrained mPLUG: set "
            "--config.init.checkpoint=PRETRAINING_WORKDIR (or an official / converted "
            "checkpoint)")
        return super().init_from_pretrained(state)

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """w_itc * ITC + w_itm * ITM on one (micro-)batch (module docstring).

        Returns:
          (float32[] loss, (metrics dict of float32[], new extra)).
        """
        idx = batch["image_index"].astype(jnp.int32)
        total, metrics, new_extra, _ = self.itc_itm_loss(
            params, extra, rng, step, "encode_image", batch["image"], batch["text_ids"],
            batch["text_mask"], idx)
        share = same_item_share(idx, self.negative_pools())
        return total, ({**metrics, "same_image_pairs": share}, new_extra)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return embedding_fns(self)
