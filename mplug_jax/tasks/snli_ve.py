"""SNLI-VE fine-tuning: three-way visual entailment (contradiction 0 / neutral 1 / entailment 2)
with the encoders only (paper 5.2.5: "we remove the decoder, and only use the encoder modules
for three-way classification").

Forward: image -> `encode_image`, text -> `encode_text`, `fuse`; an ALBEF-style MLP head
(Linear(D, D) - ReLU - Linear(D, 3), ALBEF's `cls_head` of its VE model) on the fused text
[CLS]; loss = mean cross-entropy over the batch (float32). No decoder compute. The text is
`[CLS] premise [SEP] hypothesis` with `task.premise` (default; paper 5.2.5: "the image premise,
text premise and text hypothesis are fed to the encoder"), else `[CLS] hypothesis`
(`mplug_jax.data.inputs.snli_ve`).

Parameter tree: the encoder part of `MPLUG`'s tree (vision [+ visn_fc/visn_ln], text, fusion,
and the two parameters MPLUG's setup always creates, `mlm_bias` and `temp`, which the configs
freeze) plus a top-level `cls_head`. It is initialised by running only MPLUG's encoder stages,
so the decoder and the ITC/ITM/MLM dense heads are absent (no memory, no optimizer state);
`init.checkpoint` = a pretraining workdir (or an official / converted checkpoint) loads the
encoders and fusion (the absent parts are skipped by name); `cls_head` starts from
N(0, init_std) weights (ALBEF: torch's default Linear init). A fine-tuned SNLI-VE workdir loads
everything, `cls_head` included (`mplug-jax evaluate`).

Batch: see `mplug_jax.data.inputs.snli_ve`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.data.inputs import snli_ve as snli_ve_input
from mplug_jax.models import layers
from mplug_jax.models.mplug import MPLUG
from mplug_jax.tasks import base

HEAD = "cls_head"
# Pretrained names the encoder-only tree has no parameter for.
ABSENT = (r"^decoder/", r"^(vision_proj|text_proj|itm_head|mlm_transform|mlm_ln)/")


class ClassifierHead(nn.Module):
    """Linear(hidden) - ReLU - Linear(num_classes): float[B, D] -> float32[B, C]."""
    hidden: int
    num_classes: int
    opts: layers.ModuleOptions

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(self.hidden, ("embed", "mlp"), opts=self.opts, name="dense")(x)
        h = nn.relu(h)
        return layers.dense(self.num_classes, ("mlp", None), opts=self.opts,
                            name="out")(h).astype(jnp.float32)


def encoder_stages(model: MPLUG, image, ids, mask) -> jax.Array:
    """`encode_image`, `encode_text`, `fuse` -> the fused text [CLS] float[B, D]
    (`model.init/apply(..., method=encoder_stages)`)."""
    img = model.encode_image(image)
    txt = model.encode_text(ids, mask)
    return model.fuse(img, txt, mask)[1][:, 0]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy, float32[], of logits float[B, C] and int labels [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), -1))


class Task(base.Task):
    """SNLI-VE task (see module docstring).

    Args:
      config: full run config (`model`, `input.max_text_tokens`, `init`).
      steps_per_epoch: unused (no schedule of its own).
    """

    name = "snli_ve"
    labels = snli_ve_input.LABELS

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        self.head = ClassifierHead(hidden=self.model.hidden_size, num_classes=len(self.labels),
                                   opts=self.model.opts)
        self.lt = int(config.input.max_text_tokens)
        self.premise = snli_ve_input.premise_on(config)
        least = 4 if self.premise else 2  # [CLS] p [SEP] h | [CLS] h
        if self.lt < least:
            raise ValueError(f"input.max_text_tokens must be >= {least} ([CLS] "
                             f"{'premise [SEP] hypothesis' if self.premise else 'hypothesis'}), "
                             f"got {self.lt}")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, "SNLI-VE", "set --config.input.dataset=json with "
                              "input.train_file, input.val_file and input.image_root")
        return snli_ve_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        r = self.model.image_size
        return {"image": np.zeros((batch_size, r, r, 3), np.float32),
                "text_ids": np.zeros((batch_size, self.lt), np.int32),
                "text_mask": np.ones((batch_size, self.lt), np.int32),
                "label": np.zeros((batch_size,), np.int32),
                "idx": np.zeros((batch_size,), np.int32)}

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(2)
        k_params, k_drop, k_head = jax.random.split(rng, 3)
        params = self.model.init({"params": k_params, "dropout": k_drop}, b["image"],
                                 b["text_ids"], b["text_mask"], method=encoder_stages)["params"]
        cls = jnp.zeros((2, self.model.hidden_size), jnp.float32)
        return {**params, HEAD: self.head.init(k_head, cls)["params"]}

    def init_from_pretrained(self, state):
        """The base initialisation from `config.init` (encoders + fusion; `cls_head` too when
        the source is an SNLI-VE workdir); refuses random weights unless
        `init.allow_scratch`."""
        self.require_init("SNLI-VE config fine-tunes a pretrained mPLUG: set "
                          "--config.init.checkpoint=PRETRAINING_WORKDIR (or an official / "
                          "converted checkpoint)")
        return super().init_from_pretrained(state)

    def pretrained_skip(self) -> tuple[str, ...]:
        return ABSENT

    # ---- model calls ------------------------------------------------------------------------

    def logits(self, params, image, ids, mask, rng: jax.Array | None = None) -> jax.Array:
        """Class logits float32[B, 3] of images float32[B, R, R, 3] and texts int32[B, L]
        (premise and hypothesis, or hypothesis; mask int32[B, L]); dropout keyed by `rng`
        (None = eval)."""
        enc = {k: v for k, v in params.items() if k != HEAD}
        cls = self._apply(enc, encoder_stages, image, ids, mask, rng=rng)
        return self.head.apply({"params": params[HEAD]}, cls)

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Mean cross-entropy -> (loss, ({loss, acc}, extra))."""
        logits = self.logits(params, batch["image"], batch["text_ids"], batch["text_mask"],
                             rng=rng)
        loss = cross_entropy(logits, batch["label"])
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return loss, ({"loss": loss, "acc": acc}, extra)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return {"classify": self.classify}

    def classify(self, params, batch: dict) -> jax.Array:
        """The `classify` evaluator's predict fn: batch {'image', 'text_ids', 'text_mask', ...}
        -> logits float32[B, 3] (class ids as `snli_ve_input.LABELS`)."""
        return self.logits(params, batch["image"], batch["text_ids"], batch["text_mask"])
