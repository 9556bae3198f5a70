"""Image captioning: cross-entropy fine-tuning, SCST, and the official beam-search generation.

Model: the same `MPLUG` module (and param tree) as pretraining, so `init.checkpoint` = a
pretraining workdir (or an official checkpoint) loads every array; the text encoder, fusion and
heads stay in the tree, unused, as in the official caption model.

Cross-entropy (official `MPLUG.forward(train=True)` of `model_caption_mplug.py`,
docs/fixtures.md#forward): decoder states = the image embeddings only (mask all ones); targets =
`[CLS] prompt + caption [SEP]` (see `data.inputs.caption`); loss = mean of the next-token nll over
every valid target position. With a `task.prompt`, its tokens stay in the loss: the official caption
targets mask only padding (label -100 at pad ids, docs/official-formats.md#tokenisation), nothing
else.

Generation (docs/fixtures.md#generation-settings): the official beam search, beam 5, min 8, max 25
tokens, from [CLS] alone on the image embeddings (a training prompt is never fed; the evaluator
strips it from the decoded text when the model reproduces it, as mPLUG-2 does).

Zero-shot (`task.zero_shot_prompt`, e.g. the paper's "a picture of", for captioning straight
from a pretraining workdir): pretraining's prefix LM (`tasks/pretrain.py`, `split_prefix`)
trained the decoder to continue a caption whose beginning went through the text encoder and
fusion, with states [fused image; fused prefix] and the decoder starting at [CLS]. So the
prompt is fed there, exactly where the decoder saw prefixes, not as decoder tokens on bare
image states (a combination pretraining never trained); the search's output is then the
continuation alone, the prompt is by construction not in it.

SCST (`task.scst.enabled`, docs/official-formats.md#scst): `mplug_jax.scst.ScstMixin` (search,
CIDEr-D rewards, loss and the `task.scst` options are described there), on the image embeddings;
the references of a record are those of its image (`image_index`). base / large presets: the
official options; tiny: ours.

Batch (CE): image float32[B, R, R, 3], dec_ids / dec_mask int32[B, L], image_index int32[B],
idx int32[B]; SCST adds scst_ids int32[B, K, T], scst_lengths int32[B, K], scst_advantage /
scst_reward float32[B, K] (T = max_length + 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate, scst
from mplug_jax.data.inputs import caption as caption_input
from mplug_jax.data.ops import tokenizer
from mplug_jax.scoring.caption import decode_text
from mplug_jax.tasks import base


class Task(scst.ScstMixin, base.Task):
    """Caption task (see module docstring).

    Args:
      config: run config (`model`, `task` {prompt, zero_shot_prompt, generation, scst},
        `input`, `init`, `seed`).
      steps_per_epoch: unused by this task.
    """

    name = "caption"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.set_model(config.model)
        t = config.task
        self.prompt = str(t.get("prompt", "") or "")
        self.zero_shot_prompt = str(t.get("zero_shot_prompt", "") or "")
        g = t.generation
        self.beam_size, self.min_length = int(g.beam_size), int(g.min_length)
        self.max_length, self.alpha = int(g.max_length), float(g.alpha)
        if self.beam_size < 1 or not 0 <= self.min_length < self.max_length:
            raise ValueError(f"task.generation needs beam_size >= 1 and 0 <= min_length < "
                             f"max_length, got {self.beam_size} / {self.min_length} / "
                             f"{self.max_length}")
        self.max_tokens = int(config.input.max_tokens)
        self.init_scst(t)
        if self.scst and self.zero_shot_prompt:
            raise ValueError("task.zero_shot_prompt is for evaluating a pretraining "
                             "workdir; SCST trains the fine-tuned (prompt-free) decoder")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, "caption", "set input.dataset='karpathy' with "
                              "input.train_annotations, input.eval_annotations and "
                              "input.coco_root")
        return caption_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        r, length = self.model.image_size, self.max_tokens
        out = {"image": np.zeros((batch_size, r, r, 3), np.float32),
               "dec_ids": np.zeros((batch_size, length), np.int32),
               "dec_mask": np.ones((batch_size, length), np.int32),
               "image_index": np.zeros((batch_size,), np.int32),
               "idx": np.zeros((batch_size,), np.int32)}
        scst_fields = caption_input.scst_placeholders(self.config)
        return {**out, **caption_input.placeholder_zeros(scst_fields, (batch_size,))}

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(2)
        k_params, k_drop = jax.random.split(rng)
        ids, mask = b["dec_ids"], b["dec_mask"]
        return self.model.init({"params": k_params, "dropout": k_drop}, b["image"], ids, mask,
                               ids, mask)["params"]

    def init_from_pretrained(self, state):
        self.require_init("caption config fine-tunes a pretrained mPLUG: set "
                          "--config.init.checkpoint=<pretraining workdir, official .pth (with "
                          "init.config_bert) or `mplug-jax convert` dir>")
        return super().init_from_pretrained(state)

    # ---- model calls ------------------------------------------------------------------------

    def states(self, params, image: jax.Array, rng: jax.Array | None = None):
        """Decoder states of the caption model: (image embeddings float[B, N, D], int32[B, N]
        ones); with `zero_shot_prompt`: ([fused image; fused prompt], its mask)."""
        img = self._apply(params, "encode_image", image, rng=rng)
        if not self.zero_shot_prompt:
            return img, jnp.ones(img.shape[:2], jnp.int32)
        ids, mask = tokenizer.get_tokenizer().encode([self.zero_shot_prompt])
        b = image.shape[0]
        ids = jnp.broadcast_to(jnp.asarray(ids), (b, ids.shape[1]))
        mask = jnp.broadcast_to(jnp.asarray(mask), ids.shape)
        return base.fused_states(self._apply, params, img, ids, mask)

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Cross-entropy (or SCST) loss on one (micro-)batch -> (loss, (metrics, extra))."""
        drop = base.KeyStream(rng)
        states, smask = self.states(params, batch["image"], rng=next(drop))
        if self.scst:
            return self.scst_loss(params, extra, batch, states, smask, next(drop))
        ids, mask = batch["dec_ids"], batch["dec_mask"]
        tok_lp = self._token_logprobs(params, ids, mask, states, smask, next(drop))
        valid = (mask[:, 1:] > 0).astype(jnp.float32)
        n = jnp.maximum(valid.sum(), 1.0)
        loss = -(tok_lp * valid).sum() / n
        metrics = {"loss": loss, "loss_caption": loss, "target_tokens": valid.sum()}
        return loss, (metrics, extra)

    # ---- SCST hooks (`mplug_jax.scst.ScstMixin`) ---------------------------------------------

    def scst_states(self, params, image, rng):
        return self.states(params, image, rng=rng)

    def scst_decoder(self, params, train: bool):
        return (self.train_model if train else self.model), params

    def scst_train_references(self):
        split = caption_input.load_split(self.config.input, "train",
                                         self.config.model.image_size, self.config.seed)
        rows = split.train_records.rows
        return split.references, np.array([r["image_index"] for r in rows], np.int64)

    def decode(self, ids) -> str:
        """Generated ids -> caption text (`scoring.caption.decode_text` with `task.prompt`)."""
        return decode_text(ids, self.prompt)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return {"caption_beam": self.caption_beam, "encode_image": self.encode_image,
                "caption_beam_embeds": self.caption_beam_from_embeds}

    def caption_beam(self, params, image: jax.Array) -> dict:
        """Official caption generation: {'ids' int32[B, max_length + 1] top hypothesis,
        'scores' float32[B]} (beam_size / min_length / max_length / alpha of task.generation)."""
        states, smask = self.states(params, image)
        out = generate.beam_search(self.model, params, states, smask, beam_size=self.beam_size,
                                   min_length=self.min_length, max_length=self.max_length,
                                   alpha=self.alpha)
        return {"ids": out["ids"][:, 0], "scores": out["scores"][:, 0]}

    # ---- generation from image embeddings (zero-shot video captioning) ----------------------

    def encode_image(self, params, image: jax.Array) -> jax.Array:
        """Visual encoder: float32[B, R, R, 3] -> float[B, N, D] image embeddings."""
        return self._apply(params, "encode_image", image)

    def embed_states(self, params, img: jax.Array):
        """`states` from image embeddings float[B, S, D] (S may be T * N concatenated frame
        tokens): (img, ones) or, with `zero_shot_prompt`, ([fused img; fused prompt], mask)."""
        if not self.zero_shot_prompt:
            return img, jnp.ones(img.shape[:2], jnp.int32)
        ids, mask = tokenizer.get_tokenizer().encode([self.zero_shot_prompt])
        ids = jnp.broadcast_to(jnp.asarray(ids), (img.shape[0], ids.shape[1]))
        return base.fused_states(self._apply, params, img, ids,
                                 jnp.broadcast_to(jnp.asarray(mask), ids.shape))

    def caption_beam_from_embeds(self, params, img: jax.Array) -> dict:
        """`caption_beam` from image embeddings float[B, S, D] instead of pixels."""
        states, smask = self.embed_states(params, img)
        out = generate.beam_search(self.model, params, states, smask, beam_size=self.beam_size,
                                   min_length=self.min_length, max_length=self.max_length,
                                   alpha=self.alpha)
        return {"ids": out["ids"][:, 0], "scores": out["scores"][:, 0]}
