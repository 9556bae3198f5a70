"""mPLUG-2 text-to-video retrieval fine-tuning (MSRVTT format; the release has none).

Model: `mplug_jax.mplug2.heads.MPLUG2WithHeads` = the release's mPLUG-2 + ITC projections, ITM
head (and MLM head / temperature, shared with `mplug2.pretrain`). Per clip:
video float32[B, T, R, R, 3] -> dual vision encoder (local temporal modules) -> universal
layers -> `image_embeds` float[B, N, H] (`visual_embeds`); token 0, the frame-averaged class
token after the universal layers, is the pooled video token. Caption -> `encode_text` (every
text layer, universal ones included); its [CLS] is the pooled text token.

Loss, as the image `retrieval` task (ALBEF / mPLUG v1 recipe; the same code,
`tasks.retrieval.ITCMixin.itc_itm_loss`), on those universal-layer outputs:
- ITC: `vision_proj` / `text_proj` of the pooled tokens against [momentum batch; queue]
  (`losses.itc_loss`), positives = every entry with the same video (`video_index`, in the
  batch and in the queue via `idx_queue`), momentum distillation weight `distill_alpha`
  ramped over `alpha_warmup_epochs`; momentum features and their video ids then enqueued
  (`base.enqueue_features`). The momentum copy (`MOMENTUM_PARAMS`: vision encoder, visn_fc /
  LN, visn_emb_norm, text encoder with the universal layers and latents, projections) is
  updated by `begin_step` before the loss.
- ITM: B positives, B (hard negative video, caption) and B (video, hard negative caption)
  pairs through the fusion (`base.hard_negative_pairs`), negatives drawn from the
  in-batch similarities and never the same video or an identical caption.
- `task.negatives`: in-batch ITC columns and hard negatives from the whole batch ('global')
  or from each batch shard's rows ('per_device', DDP's per-GPU pools; `mplug_jax.negatives`).
The temperature is clamped to [temp_min, temp_max] after every update
(`base.clamp_temperature`).

Evaluation: the `video_retrieval` evaluator with this task's `video_embed` predict fn
(pooled unit feature + universal-layer tokens of the whole clip), ITM re-ranking of the
top-k_test and the official video score = ITM logit + similarity.

Init (`config.init.checkpoint`): a `mplug-jax convert` mPLUG-2 directory or official file
(with init.config_bert / init.config_yaml) -> every network weight, the heads (projections,
ITM, MLM, temperature) stay random (the release has none); a workdir of any mPLUG-2
task -> every array it has (`mplug_jax.mplug2.checkpoint`). The momentum copy starts equal
to the loaded weights. Random weights only with `init.allow_scratch`.

Batch: `mplug_jax.mplug2.pretrain_input` (video, text_ids, text_mask, video_index, idx).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import negatives
from mplug_jax.mplug2 import heads as mplug2_heads
from mplug_jax.mplug2 import pretrain_input as mplug2_pretrain_input
from mplug_jax.mplug2.tasks import base as m2base
from mplug_jax.tasks import base, retrieval

# The momentum copy: mPLUG's (`tasks.retrieval.MOMENTUM_PARAMS`) + the universal layers'
# visn_emb_norm (the text encoder holds the universal layers and latents).
MOMENTUM_PARAMS = retrieval.MOMENTUM_PARAMS + ("visn_emb_norm",)


class HeadsTask(retrieval.ITCMixin, m2base.Task):
    """What the mPLUG-2 tasks on `MPLUG2WithHeads` (this one, `mplug2.pretrain`) share: the
    model, the `task.itc` settings, momentum / ITC queue init, the distillation ramp, the
    temperature clamp (`tasks.retrieval.ITCMixin`) and the retrieval predict fns.

    Subclasses set `init_text` (the dummy-batch key prefixes of the text `init_params` feeds)
    and `queue_ids` (whether the ITC queue keeps item ids, 'idx_queue')."""

    model_cls = mplug2_heads.MPLUG2WithHeads
    momentum_params = MOMENTUM_PARAMS

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.setup_itc(config.task.itc)

    def predict_fns(self) -> dict:
        """The `video_retrieval` evaluator's predict fns (`tasks.retrieval.embedding_fns`
        over `visual_embeds`): video_embed / image_embed, text_embed, itm_score."""
        return retrieval.embedding_fns(self, "visual_embeds", ("video_embed", "image_embed"))


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
        self.negatives = negatives.check(config.task.get("negatives", "global"))
        self.w_itc, self.w_itm = retrieval.itc_itm_weights(config.task.loss_weights)
        self.batch_size = retrieval.loss_batch_size(config, self.queue_size, 2, "clips")
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
        vidx = batch["video_index"].astype(jnp.int32)
        total, metrics, new_extra, (img_feat, txt_feat) = self.itc_itm_loss(
            params, extra, rng, step, "visual_embeds", batch["video"], batch["text_ids"],
            batch["text_mask"], vidx)
        # In-batch t2v accuracy of the online similarities (a cheap training signal).
        hit = vidx[jnp.argmax(txt_feat @ img_feat.T, -1)] == vidx
        return total, ({**metrics, "t2v_batch_acc": jnp.mean(hit.astype(jnp.float32)),
                        "same_video_pairs": retrieval.same_item_share(
                            vidx, self.negative_pools())}, new_extra)
