"""mPLUG-2 pretraining objectives (paper section 3.2; the release has no pretraining code) on
mixed image + video batches.

Model: `models.mplug2_heads.MPLUG2WithHeads`. Videos go through the dual vision encoder with
the local temporal modules, images through its image path (the spatial blocks only, a 1-frame
clip without the temporal modules); both then through the universal layers
(`visual_embeds`: float[B, N, H], token 0 pooled). Captions through `encode_text`.

Objectives (a weight of 0 in `task.loss_weights` removes one and its compute):
- `itc` (vision-language contrastive, ALBEF): pooled visual / text tokens projected to E,
  videos and images of the step in ONE contrastive batch [Bv + Bi] against [momentum batch;
  queue] with momentum distillation (`tasks.retrieval.contrastive`; alpha ramped over
  `alpha_warmup_epochs`); the momentum copy (`mplug2_retrieval.MOMENTUM_PARAMS`) is updated by
  `begin_step`, the momentum features enqueued. Positives: the diagonal, plus identical
  captions in the batch.
- `itm` (vision-language matching): per modality (videos and images have different token
  counts), the B positives + B hard-negative visuals + B hard-negative captions drawn from the
  ITC similarities (`base.itm_with_hard_negatives`; identical captions are never negatives).
- `mlm` (language loss): BERT masking of 15% of the caption tokens (`losses.mask_tokens`),
  the masked caption through the text encoder and the fusion with the visual tokens, the MLM
  head (tied to the word embeddings) on the fused text; cross-entropy on the masked tokens.
- `lm` (instruction-based language model): the shared decoder generates "[CLS] caption
  [SEP]" from [fused visual; fused instruction], the instruction a task prompt through the
  text encoder and fusion (`task.instructions`: "a video of" for clips, "a picture of" for
  images, as `mplug2.vqa_states` with the prompt as question); mean next-token NLL.
Each objective's loss is the mean of its video and image parts; both parts are logged
(`loss_<obj>_video`, `loss_<obj>_image`). Losses and softmaxes in float32. The temperature is
clamped after every update. Deviations (documented): MLM and LM are not distilled from the
momentum model (ALBEF distils MLM; the paper does not say), and the text-only corpora of the
paper are not used (`mlm` is always vision-conditioned here).

Init: as `mplug2_retrieval` (converted mPLUG-2 / mPLUG-2 workdir, heads random; or
`init.allow_scratch`). Batch: `data.mplug2_pretrain_input.pretrain_train_batches`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import losses
from mplug_jax.mplug2 import pretrain_input as mplug2_pretrain_input
from mplug_jax.data.ops import tokenizer
from mplug_jax.mplug2 import model as mplug2
from mplug_jax.tasks import base, retrieval
from mplug_jax.mplug2.tasks import retrieval as m2ret

LOSSES = ("itc", "itm", "mlm", "lm")
MODALITIES = ("video", "image")


def lm_targets(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """"[CLS] caption" int32[B, L] -> decoder targets "[CLS] caption [SEP]" and their mask
    int32[B, L] ([SEP] after the last token; a full row ends in [SEP] instead of its last
    token)."""
    length = ids.shape[1]
    n = jnp.minimum(jnp.sum(mask > 0, axis=1), length - 1)[:, None]
    pos = jnp.arange(length)[None, :]
    d_ids = jnp.where(pos == n, tokenizer.SEP_ID, jnp.where(pos < n, ids, 0))
    return d_ids.astype(jnp.int32), (pos <= n).astype(jnp.int32)


class Task(m2ret.HeadsTask):
    """mPLUG-2 pretraining (module docstring).

    Args:
      config: full run config (`model`, `task`, `input`, `optim.accum_steps`, `init`).
      steps_per_epoch: train steps per epoch (distillation ramp).
    """

    name = "mplug2.pretrain"
    title = "mPLUG-2 pretraining"
    init_hint = "starts from an mPLUG-2 checkpoint"
    init_text = ("video_text", "video_text")
    queue_ids = False  # positives are identical captions of the batch, the queue has no ids

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        t = config.task
        unknown = set(t.loss_weights) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown task.loss_weights {sorted(unknown)}; valid: {LOSSES}")
        self.weights = {k: float(t.loss_weights.get(k, 0.0)) for k in LOSSES}
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError(f"task.loss_weights must be >= 0 with at least one > 0, got "
                             f"{dict(t.loss_weights)}")
        self.mask_prob = float(t.mlm.mask_prob)
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"task.mlm.mask_prob must be in (0, 1), got {self.mask_prob}")
        missing = [m for m in MODALITIES if not t.instructions.get(m)]
        if missing:
            raise ValueError(f"task.instructions needs a prompt for {missing} (e.g. video='a "
                             "video of', image='a picture of')")
        tok = tokenizer.get_tokenizer()
        # "[CLS] prompt" ids per modality (no padding).
        self.prompts = {m: np.asarray(tok.encode([t.instructions[m]])[0][0], np.int32)
                        for m in MODALITIES}
        accum = max(int(config.optim.get("accum_steps", 1)), 1)
        inp = config.input
        self.sizes = {"video": int(inp.batch_size), "image": int(inp.image_batch_size)}
        for m, size in self.sizes.items():
            key = "batch_size" if m == "video" else "image_batch_size"
            if size % accum or size // accum < 2:
                raise ValueError(f"input.{key}={size} must be a multiple of optim.accum_steps "
                                 f"({accum}) with at least 2 per loss call (hard negatives)")
        self.sizes = {m: s // accum for m, s in self.sizes.items()}
        both = sum(self.sizes.values())
        if self.weights["itc"] and self.queue_size % both:
            raise ValueError(f"task.itc.queue_size={self.queue_size} must be a multiple of the "
                             f"clips + images one loss call sees ({both})")
        self.max_len = int(inp.max_tokens)
        if self.max_len < 3:
            raise ValueError(f"input.max_tokens must be >= 3, got {self.max_len}")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, cls.title, "set input.dataset='json' "
                              "(video-text jsonl) and input.images.dataset to 'json' or 'tfds'")
        return mplug2_pretrain_input.pretrain_train_batches(config, jax.process_index(),
                                                            jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        """Zero mixed batch: `batch_size` clips and as many images (`batch_size` rows each)."""
        t, r, length = self.model.num_frames, self.model.image_size, self.max_len
        out = {"video": np.zeros((batch_size, t, r, r, 3), np.float32),
               "image": np.zeros((batch_size, r, r, 3), np.float32)}
        for m in MODALITIES:
            out[f"{m}_text_ids"] = np.zeros((batch_size, length), np.int32)
            out[f"{m}_text_mask"] = np.ones((batch_size, length), np.int32)
            out[f"{m}_idx"] = np.zeros((batch_size,), np.int32)
        return out

    # ---- state ------------------------------------------------------------------------------

    def init_extra(self, params, rng: jax.Array) -> dict:
        """Momentum copy and ITC queues (when ITC is on)."""
        return super().init_extra(params, rng) if self.weights["itc"] else {}

    # ---- step -------------------------------------------------------------------------------

    def _prompt(self, modality: str, b: int) -> tuple[jax.Array, jax.Array]:
        p = self.prompts[modality]
        ids = jnp.broadcast_to(jnp.asarray(p), (b, len(p)))
        return ids.astype(jnp.int32), jnp.ones_like(ids, jnp.int32)

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Weighted sum of the enabled objectives (module docstring).

        Returns:
          (float32[] loss, (metrics dict of float32[], new extra)).
        """
        w = self.weights
        k_drop, k_neg, k_mask = jax.random.split(rng, 3)
        drop = base.KeyStream(k_drop)
        use_drop = self.model.dropout_rate > 0

        def key():
            return next(drop) if use_drop else None

        temp = losses.clamp_temp(params["temp"], self.itc.temp_min, self.itc.temp_max)
        alpha = self.alpha(step)
        metrics = {"temp": temp, "alpha": alpha}
        new_extra = dict(extra)
        total = jnp.zeros((), jnp.float32)
        data = {}
        for m in MODALITIES:
            vis, ids, mask = batch[m], batch[f"{m}_text_ids"], batch[f"{m}_text_mask"]
            img = self._apply(params, "visual_embeds", vis, rng=key())
            data[m] = dict(vis=vis, ids=ids, mask=mask, img=img)
            if w["itc"] or w["itm"]:
                txt = self._apply(params, "encode_text", ids, mask, rng=key())
                feats = self._apply(params, "itc_project", img[:, 0], txt[:, 0])
                data[m].update(txt=txt, feats=feats)

        if w["itc"] or w["itm"]:
            img_feat = jnp.concatenate([data[m]["feats"][0] for m in MODALITIES])
            txt_feat = jnp.concatenate([data[m]["feats"][1] for m in MODALITIES])
            bv = data["video"]["ids"].shape[0]
            all_ids = [data[m]["ids"] for m in MODALITIES]
            pad = max(x.shape[1] for x in all_ids)
            all_ids = jnp.concatenate([jnp.pad(x, ((0, 0), (0, pad - x.shape[1])))
                                       for x in all_ids])
            same_text = jnp.all(all_ids[:, None, :] == all_ids[None, :, :], -1)
        if w["itc"]:
            params_m = {**params, **extra["params_m"]}
            fm = []
            for m in MODALITIES:
                d = data[m]
                img_m = self._apply(params_m, "visual_embeds", d["vis"])
                txt_m = self._apply(params_m, "encode_text", d["ids"], d["mask"])
                fm.append(self._apply(params_m, "itc_project", img_m[:, 0], txt_m[:, 0]))
            img_feat_m = jnp.concatenate([f[0] for f in fm])
            txt_feat_m = jnp.concatenate([f[1] for f in fm])
            # Identical captions in the batch are positives (queue entries: the diagonal
            # rule only, they carry no ids).
            loss_itc, sims, upd = retrieval.contrastive(extra, img_feat, txt_feat, img_feat_m,
                                                    txt_feat_m, temp, alpha,
                                                    ids=_caption_ids(same_text))
            new_extra.update(upd)
            metrics["loss_itc"] = loss_itc
            total += w["itc"] * loss_itc
        elif w["itm"]:
            sim = img_feat @ txt_feat.T / temp
            sims = {"sim_i2t": sim, "sim_t2i": sim.T}
        if w["itm"]:
            keys = jax.random.split(k_neg, len(MODALITIES))
            parts = []
            for j, (m, lo, hi) in enumerate((("video", 0, bv),
                                             ("image", bv, img_feat.shape[0]))):
                d = data[m]
                loss_m, acc_m = base.itm_with_hard_negatives(
                    self._apply, params, keys[j], d["img"], d["txt"], d["mask"],
                    sims["sim_i2t"][lo:hi, lo:hi], sims["sim_t2i"][lo:hi, lo:hi],
                    same_text[lo:hi, lo:hi], rng=key())
                metrics[f"loss_itm_{m}"], metrics[f"itm_acc_{m}"] = loss_m, acc_m
                parts.append(loss_m)
            metrics["loss_itm"] = sum(parts) / len(parts)
            total += w["itm"] * metrics["loss_itm"]
        if w["mlm"]:
            keys = jax.random.split(k_mask, len(MODALITIES))
            parts = []
            for j, m in enumerate(MODALITIES):
                d = data[m]
                masked, picked = losses.mask_tokens(keys[j], d["ids"], d["mask"],
                                                    self.model.vocab_size, self.mask_prob)
                txt = self._apply(params, "encode_text", masked, d["mask"], rng=key())
                _, fused = self._apply(params, "fuse", d["img"], txt, d["mask"], rng=key())
                logits = self._apply(params, "mlm_logits", fused)
                loss_m, acc_m = losses.mlm_loss(logits, d["ids"], picked)
                metrics[f"loss_mlm_{m}"], metrics[f"mlm_acc_{m}"] = loss_m, acc_m
                parts.append(loss_m)
            metrics["loss_mlm"] = sum(parts) / len(parts)
            total += w["mlm"] * metrics["loss_mlm"]
        if w["lm"]:
            parts = []
            for m in MODALITIES:
                d = data[m]
                b = d["ids"].shape[0]
                p_ids, p_mask = self._prompt(m, b)
                txt = self._apply(params, "encode_text", p_ids, p_mask, rng=key())
                f_img, f_txt = self._apply(params, "fuse", d["img"], txt, p_mask, rng=key())
                states, smask = mplug2.vqa_states(f_img, f_txt, p_mask)
                d_ids, d_mask = lm_targets(d["ids"], d["mask"])
                logits = self._apply(params, "decode", d_ids, d_mask, states, smask, rng=key())
                loss_m, acc_m = losses.mlm_loss(logits[:, :-1], d_ids[:, 1:],
                                                d_mask[:, 1:] > 0)
                metrics[f"loss_lm_{m}"], metrics[f"lm_acc_{m}"] = loss_m, acc_m
                parts.append(loss_m)
            metrics["loss_lm"] = sum(parts) / len(parts)
            total += w["lm"] * metrics["loss_lm"]
        metrics["loss"] = total
        return total, (metrics, new_extra)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        """The retrieval predict fns (`tasks.retrieval.embedding_fns`: zero-shot
        `video_retrieval`) and `lm_generate` (greedy instruction-prompted captions)."""
        return {**super().predict_fns(), "lm_generate": self.lm_generate}

    def lm_generate(self, params, visual: jax.Array, max_len: int = 12) -> jax.Array:
        """Greedy caption of videos float32[B, T, R, R, 3] (prompt `instructions.video`) or
        images float32[B, R, R, 3] (`instructions.image`) -> int32[B, max_len] ([CLS] ...
        [SEP] then [PAD])."""
        from mplug_jax import generate
        m = "video" if visual.ndim == 5 else "image"
        img = self._apply(params, "visual_embeds", visual)
        p_ids, p_mask = self._prompt(m, visual.shape[0])
        txt = self._apply(params, "encode_text", p_ids, p_mask)
        f_img, f_txt = self._apply(params, "fuse", img, txt, p_mask)
        states, smask = mplug2.vqa_states(f_img, f_txt, p_mask)
        return generate.greedy(mplug2.decoder_module(self.model), params["decoder"], states,
                               smask, max_len)


def _caption_ids(same_text: jax.Array) -> jax.Array:
    """int32[B] id per row = the first row with the same caption (so identical captions are
    ITC positives of each other)."""
    return jnp.argmax(same_text, axis=1).astype(jnp.int32)
