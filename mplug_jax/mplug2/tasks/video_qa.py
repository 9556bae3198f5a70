"""mPLUG-2 video QA fine-tuning (official `video_qa_mplug2.py` / `model_videoqa_mplug.py`).

Forward as the release (docs/fixtures.md#mplug-2-forward and #mplug-2-losses): video ->
`encode_video` (dual vision encoder with the local temporal modules) -> `image_embeds`
(vision_embeds + universal layers), question -> `encode_text`, `fuse`; decoder states =
`mplug2.vqa_states` (cat([fusion image, fusion question]), mask cat([ones, question mask])). Loss
(docs/fixtures.md#mplug-2-losses, quirk 7): per question the summed next-token NLL of "[CLS] answer
[SEP]" (padding excluded), weighted, summed, divided by the clips B of the (micro-)batch:
`vqa.answer_nll` / `vqa.vqa_loss`, the math `mplug2.parity` checks against the official
loss. Generation: the official beam search (`generate.beam_search`, beam 5 / min 1 / max 10,
docs/fixtures.md#mplug-2-generation) over those states.

`model.temporal=False` builds the same network without the local temporal modules: each frame
is encoded alone and frames only meet by the class-token average and in the universal /
fusion layers (an ablation; checkpoint `lmhra` weights are then not loaded).

Init (`config.init.checkpoint`, read by `mplug_jax.mplug2.checkpoint`): a `mplug-jax convert`
mPLUG-2 directory, an official mPLUG-2 file with `config_bert` and `config_yaml`, or a workdir
of an mPLUG-2 task; the visual positional embedding is resized bilinearly when the frame grid
differs (official fine-tuning does the same). Random weights only with `init.allow_scratch`.

Batch: see `mplug_jax.mplug2.input`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate
from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
from mplug_jax.mplug2 import input as mplug2_input
from mplug_jax.mplug2 import model as mplug2
from mplug_jax.mplug2.tasks import base as m2base
from mplug_jax.tasks import base
from mplug_jax.tasks.vqa import answer_nll, vqa_loss


def video_states(m: mplug2.MPLUG2, video, q_ids, q_mask):
    """Decoder states of each question: (float[B, N + Lq, H], int32[B, N + Lq]); apply with
    `method=video_states`."""
    img = m.image_embeds(m.encode_video(video))
    return fused(m, img, q_ids, q_mask)


def fused(m: mplug2.MPLUG2, img, q_ids, q_mask):
    """`vqa_states` of image_embeds float[B, N, H] and a question int32[B, Lq]."""
    f_img, f_txt = m.fuse(img, m.encode_text(q_ids, q_mask), q_mask)
    return mplug2.vqa_states(f_img, f_txt, q_mask)


def video_embeds(m: mplug2.MPLUG2, video):
    """float32[B, T, R, R, 3] -> image_embeds float[B, 1 + T*L, H]."""
    return m.image_embeds(m.encode_video(video))


class Task(m2base.Task):
    """mPLUG-2 video QA (see module docstring).

    Args:
      config: full run config (`model` = MPLUG2 fields, `task`, `input`, `init`).
      steps_per_epoch: train steps per epoch (unused: no ramps).
    """

    name = "mplug2.video_qa"
    title = "mPLUG-2 video QA"
    init_text = ("question", "answer")

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.decoder = mplug2.decoder_module(self.model)
        inp = config.input
        self.lq, self.la = int(inp.max_question_tokens), int(inp.max_answer_tokens)
        if self.la < 2:
            raise ValueError(f"input.max_answer_tokens must be >= 2 ([CLS] + [SEP]), got "
                             f"{self.la}")
        if self.lq < 1:
            raise ValueError(f"input.max_question_tokens must be >= 1, got {self.lq}")

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, cls.title, "set --config.input.dataset=json "
                              "with input.annotations and input.video_root")
        return mplug2_input.train_batches(config, jax.process_index(), jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        t, r = self.model.num_frames, self.model.image_size
        ans = np.zeros((batch_size, self.la), np.int32)
        ans[:, 0] = CLS_ID
        return {"video": np.zeros((batch_size, t, r, r, 3), np.float32),
                "question_ids": np.zeros((batch_size, self.lq), np.int32),
                "question_mask": np.ones((batch_size, self.lq), np.int32),
                "answer_ids": ans, "answer_mask": np.ones_like(ans),
                "answer_weights": np.ones((batch_size,), np.float32),
                "idx": np.zeros((batch_size,), np.int32)}

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Weighted summed answer NLL / clips (module docstring) -> (loss, (metrics, extra))."""
        key = self.dropout_keys(rng)
        states, smask = self._apply(params, video_states, batch["video"],
                                    batch["question_ids"], batch["question_mask"], rng=key())
        a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
        logits = self._apply(params, "decode", a_ids, a_mask, states, smask, rng=key())
        nll = answer_nll(logits, a_ids, a_mask)
        loss = vqa_loss(nll[:, None], batch["answer_weights"][:, None])
        # Exact match of the teacher-forced argmax answer: a cheap training-accuracy signal.
        pred = jnp.argmax(logits[:, :-1], -1)
        ok = jnp.all((pred == a_ids[:, 1:]) | (a_mask[:, 1:] == 0), axis=-1)
        return loss, ({"loss": loss, "answer_nll": jnp.mean(nll),
                       "tf_exact": jnp.mean(ok.astype(jnp.float32))}, extra)

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return {"encode_video": self.encode_video, "vqa_generate_embeds": self.generate_from_embeds,
                "vqa_generate": self.generate}

    def encode_video(self, params, frames: jax.Array) -> jax.Array:
        """Video frames float32[B, T, R, R, 3] (CLIP-normalised) -> image_embeds
        float[B, 1 + T * L, H], what `generate_from_embeds` takes."""
        return self._apply(params, video_embeds, frames)

    def generate_from_embeds(self, params, img: jax.Array, q_ids, q_mask, *,
                             beam_size: int = 5, min_length: int = 1,
                             max_length: int = 10) -> dict:
        """Official beam search from image_embeds float[B, N, H] (`encode_video`) and
        questions int32[B, Lq]: `generate.beam_search`'s dict ('ids' int32[B, K,
        max_length + 1] best first, 'scores', ...)."""
        states, smask = self._apply(params, fused, img, q_ids, q_mask)
        return self._search(params, states, smask, beam_size, min_length, max_length)

    def generate(self, params, video, q_ids, q_mask, *, beam_size: int = 5,
                 min_length: int = 1, max_length: int = 10) -> dict:
        """`generate_from_embeds(encode_video(video), ...)` for video float32[B, T, R, R, 3]."""
        states, smask = self._apply(params, video_states, video, q_ids, q_mask)
        return self._search(params, states, smask, beam_size, min_length, max_length)

    def _search(self, params, states, smask, beam_size, min_length, max_length) -> dict:
        return generate.beam_search(self.decoder, params["decoder"], states, smask,
                                    beam_size=beam_size, min_length=min_length,
                                    max_length=max_length, bos_id=CLS_ID, eos_id=SEP_ID,
                                    pad_id=PAD_ID)
