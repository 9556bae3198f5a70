"""NLVR2 fine-tuning: is the sentence true of the (left, right) image pair? (paper 5.2.2)

Model: `models.nlvr2.NLVR2Model` (both images through the visual encoder in one call, a
two-branch fusion, an MLP on the fused text [CLS]; its docstring gives every design choice).
Loss: mean cross-entropy of the 2-way logits over the batch, float32; train accuracy logged.

Initialisation (`init.checkpoint`: a pretraining workdir of ours, a converted or an official
checkpoint): the encoders and the fusion load by name; each co-attention layer's pretrained
`cross_attn` is copied into the second branch `cross_attn_1` as well
(`twin_cross_attention`); the decoder and the pretraining heads (ITC projections, ITM, MLM,
temperature) are not part of this model and are not loaded; `cls_head` starts random.
Random initialisation of the whole model is refused unless `init.allow_scratch`.

Batch: see `mplug_jax.data.inputs.nlvr2`. Predict fn `classify(params, batch)` -> float32[B, 2]
logits (class 1 = "True"), for the shared `classify` evaluator.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.data.inputs import nlvr2 as nlvr2_input
from mplug_jax.models.nlvr2 import NLVR2Model
from mplug_jax.tasks import base

# Pretrained parameters this model does not have.
NOT_LOADED = r"^(decoder|vision_proj|text_proj|itm_head|mlm_transform|mlm_ln|mlm_bias|temp)(/|$)"
_CROSS = re.compile(r"^(fusion/layer_\d+/text/)cross_attn/")


def twin_cross_attention(flat: dict) -> dict:
    """Flat pretrained params with each fusion co-attention layer's `cross_attn` also copied to
    the second branch `cross_attn_1`, unless the source already has that branch (a fine-tuned
    NLVR2 checkpoint keeps its own)."""
    out = dict(flat)
    for k, v in flat.items():
        twin = _CROSS.sub(r"\1cross_attn_1/", k)
        if twin != k and twin not in flat:
            out[twin] = np.array(v, copy=True)
    return out


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of -log softmax(logits)[label]: float[B, C], int[B] -> float32[]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), 1))


class Task(base.Task):
    """NLVR2 task (see module docstring).

    Args:
      config: full run config (`model`, `input`, `init`).
      steps_per_epoch: train steps per epoch (unused: no ramped weights).
    """

    name = "nlvr2"
    model_cls = NLVR2Model

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        self.max_tokens = int(config.input.max_tokens)
        if self.max_tokens < 2:
            raise ValueError(f"input.max_tokens must be >= 2 ([CLS] + a word), got "
                             f"{self.max_tokens}")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, "NLVR2", "set --config.input.dataset=json with "
                              "input.train_files, input.val_files and input.image_root")
        return nlvr2_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        r = self.model.image_size
        return {"images": np.zeros((batch_size, 2, r, r, 3), np.float32),
                "text_ids": np.zeros((batch_size, self.max_tokens), np.int32),
                "text_mask": np.ones((batch_size, self.max_tokens), np.int32),
                "label": np.zeros((batch_size,), np.int32),
                "idx": np.zeros((batch_size,), np.int32)}

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(2)
        k_params, k_drop = jax.random.split(rng)
        return self.model.init({"params": k_params, "dropout": k_drop}, b["images"],
                               b["text_ids"], b["text_mask"])["params"]

    def pretrained_skip(self) -> tuple[str, ...]:
        return (NOT_LOADED,)

    def adapt_pretrained(self, flat: dict) -> dict:
        return twin_cross_attention(flat)

    def init_from_pretrained(self, state):
        """Params from `config.init` with the cross-attention copied into both branches
        (`adapt_pretrained`); refuses random weights unless `init.allow_scratch`."""
        self.require_init("NLVR2 config fine-tunes a pretrained mPLUG: set "
                          "--config.init.checkpoint=PRETRAINING_WORKDIR (or an official / "
                          "converted checkpoint)")
        return super().init_from_pretrained(state)

    # ---- step -------------------------------------------------------------------------------

    def logits(self, params, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        """float32[B, 2] logits of a batch (images, text_ids, text_mask); dropout keyed by
        `rng` (None = eval)."""
        return self._apply(params, "__call__", batch["images"], batch["text_ids"],
                           batch["text_mask"], rng=rng)

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Mean 2-way cross-entropy -> (loss, ({loss, acc}, extra))."""
        logits = self.logits(params, batch, rng)
        label = batch["label"].astype(jnp.int32)
        loss = cross_entropy(logits, label)
        acc = jnp.mean((jnp.argmax(logits, -1) == label).astype(jnp.float32))
        return loss, ({"loss": loss, "acc": acc}, extra)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return {"classify": self.classify}

    def classify(self, params, batch: dict) -> jax.Array:
        """Eval logits float32[B, 2] (index = `nlvr2_input.LABELS`: 0 False, 1 True)."""
        return self.logits(params, batch)
