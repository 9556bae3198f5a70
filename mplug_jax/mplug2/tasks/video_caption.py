"""mPLUG-2 video captioning fine-tuning (official `video_caption_mplug2.py` /
`model_video_caption_mplug.py`, docs/fixtures.md#mplug-2-losses, #mplug-2-text and
#mplug-2-generation).

Forward as the release: video -> `encode_video` (dual vision encoder with the local temporal
modules) -> `image_embeds` (vision_embeds + universal layers) = the decoder states, mask all
ones; the caption model never runs its text encoder or fusion (they stay in the param tree,
unused, as in the release, whose caption checkpoint has the video QA key set).

Targets (`data.mplug2_input.caption_text`): `pre_caption(caption, 80)` joined to
`task.prompt` ("a video of") and "[SEP]", `[CLS] ...` truncated to `input.max_caption_tokens`
(official 20). `task.prompt_join`:
- 'release' (default): glued without a space, the release's quirk: "a video of" + "an
  astronaut" -> "a video ofan astronaut" -> `[CLS] a video of ##an astronaut`; the first
  caption word becomes a `##` continuation piece (`##a`, `##an`, ...).
- 'space': the corrected form, `[CLS] a video of an astronaut`.
The paper's MSRVTT / MSVD caption numbers and the released caption checkpoint come from the
release's training script, i.e. 'release'. The join only changes training targets: generation
and post-processing are the same in both modes.
Loss (quirk 6): labels = ids with padding and the first `prompt_length` positions dropped,
prompt_length = len(tokenizer(prompt)) - 1 = 3 ([CLS], 'a', 'video'; the prompt's last word
'of' stays a target); loss = MEAN next-token NLL over the remaining targets (`caption_loss`).
`task.prompt_loss`: 'release' (default, as above) | 'all' (every prompt token is a target,
as mPLUG v1's caption loss). With 'release' the decoder is never taught to start with
"a video", yet the search starts at [CLS] alone: measured on the tiny model, it then begins
with other words ("on of ofa blue circle moves up") and the release's split no longer removes
the prompt; 'all' teaches it to emit the prompt, which the split removes.

Generation (docs/fixtures.md#mplug-2-generation): the official beam search (beam 5, min 4, max 20,
alpha 0.6; `task.generation`) from [CLS] alone over image_embeds (no prompt is fed), decoded with
the official post-processing and `.split(prompt)[-1].strip()` (`decode_caption`), which removes the
prompt from glued outputs too ("a video ofa red circle" -> "a red circle").

SCST (`task.scst.enabled`, the paper's CIDEr optimisation after the cross-entropy stage, appendix
B.2.3; the release has none): `mplug_jax.scst.ScstMixin`, the image caption task's SCST (search,
CIDEr-D rewards, loss and the `task.scst` options are described there), on the video's
image_embeds; the search is `task.generation`'s beam search from [CLS] alone, its captions
decoded as evaluation decodes them (`decode_caption`, the prompt split off), and the references
of a training record are every caption of its video (records grouped by `video_id`). It starts
from the cross-entropy stage: `init.checkpoint` must be set (or `init.allow_scratch`).

Init (`config.init.checkpoint`, as the video QA task: `mplug_jax.mplug2.checkpoint`): a
`mplug-jax convert` mPLUG-2 directory, an official mPLUG-2 file with `config_bert` /
`config_yaml`, or a workdir of an mPLUG-2 task; random weights only with
`init.allow_scratch`. The whole mPLUG-2 tree is initialised (text encoder and fusion
included: the release's caption model has the video QA key set, so either checkpoint loads).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate, scst
from mplug_jax.data.inputs import caption as caption_input
from mplug_jax.data.ops import tokenizer
from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
from mplug_jax.mplug2 import input as mplug2_input
from mplug_jax.mplug2 import model as mplug2
from mplug_jax.mplug2.tasks import base as m2base
from mplug_jax.mplug2.tasks import video_qa as qa
from mplug_jax.tasks import base

PROMPT = "a video of"  # official config `prompt`
PROMPT_JOINS = mplug2_input.PROMPT_JOINS
PROMPT_LOSSES = ("release", "all")


def caption_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array, prompt_len: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Release caption loss: mean next-token NLL of ids int32[B, L] under logits
    float[B, L, V] (position t predicts t+1) over the targets whose position t+1 is a token
    (mask 1) and >= prompt_len. Returns (float32[] loss, bool[B, L-1] target positions)."""
    pos = jnp.arange(1, ids.shape[1])[None]
    valid = (mask[:, 1:] > 0) & (pos >= prompt_len)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    return jnp.where(valid, nll, 0.0).sum() / n, valid


def decode_caption(ids, prompt: str = PROMPT) -> str:
    """Generated ids ([CLS] first) -> caption, as the release writes it: official text
    post-processing, then `.split(prompt)[-1].strip()` when the prompt is not empty."""
    text = tokenizer.get_tokenizer().decode_official([int(i) for i in ids])
    return text.split(prompt)[-1].strip() if prompt else text


def caption_logits(m: mplug2.MPLUG2, video, ids, mask):
    """Teacher-forced caption logits float[B, L, V]: decoder on ids / mask int32[B, L] over
    image_embeds of video float32[B, T, R, R, 3] (mask all ones); apply with method=."""
    img = m.image_embeds(m.encode_video(video))
    return m.decode(ids, mask, img, jnp.ones(img.shape[:2], jnp.int32))


class Task(scst.ScstMixin, qa.Task):
    """mPLUG-2 video captioning (see module docstring); shares the video QA task's model,
    `encode_video` and checkpoint loading, and the image caption task's SCST.

    Args:
      config: full run config (`model` = MPLUG2 fields, `task` {prompt, prompt_join,
        prompt_loss, generation, scst}, `input`, `init`, `seed`).
      steps_per_epoch: unused.
    """

    name = "mplug2.video_caption"
    title = "mPLUG-2 video caption"
    init_text = ("caption", "caption")
    scst_input = "video"

    def __init__(self, config, steps_per_epoch: int = 1):
        m2base.Task.__init__(self, config, steps_per_epoch)
        self.decoder = mplug2.decoder_module(self.model)
        t = config.task
        self.prompt = str(t.get("prompt", PROMPT) or "")
        self.join = str(t.get("prompt_join", "release"))
        if self.join not in PROMPT_JOINS:
            raise ValueError(f"task.prompt_join={self.join!r}; valid: {PROMPT_JOINS} "
                             "('release' = glued as the release and the paper's numbers, "
                             "'space' = corrected)")
        self.prompt_loss = str(t.get("prompt_loss", "release"))
        if self.prompt_loss not in PROMPT_LOSSES:
            raise ValueError(f"task.prompt_loss={self.prompt_loss!r}; valid: {PROMPT_LOSSES} "
                             "('release' = the release's 3 masked positions, 'all' = every "
                             "prompt token a target)")
        g = t.get("generation") or {}
        self.beam_size, self.min_length = int(g.get("beam_size", 5)), int(g.get("min_length", 4))
        self.max_length, self.alpha = int(g.get("max_length", 20)), float(g.get("alpha", 0.6))
        if self.beam_size < 1 or not 0 <= self.min_length < self.max_length:
            raise ValueError(f"task.generation needs beam_size >= 1 and 0 <= min_length < "
                             f"max_length, got {self.beam_size} / {self.min_length} / "
                             f"{self.max_length}")
        self.lc = int(config.input.max_caption_tokens)
        release_len = mplug2_input.prompt_length(self.prompt)
        if self.lc <= release_len + 1:
            raise ValueError(f"input.max_caption_tokens={self.lc} leaves no caption token "
                             f"after the prompt {self.prompt!r} ({release_len + 1} ids)")
        # first target position: 'release' 3 for "a video of"; 'all' 1 (only [CLS] is no target)
        self.prompt_len = release_len if self.prompt_loss == "release" else 1
        self.init_scst(t)
        self.train_decoder = mplug2.decoder_module(self.train_model)

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, cls.title, "set --config.input.dataset=json with "
                              "input.annotations and input.video_root")
        return mplug2_input.caption_train_batches(config, jax.process_index(),
                                                  jax.process_count())

    def dummy_batch(self, batch_size: int) -> dict:
        t, r = self.model.num_frames, self.model.image_size
        ids = np.zeros((batch_size, self.lc), np.int32)
        ids[:, 0] = CLS_ID
        scst_fields = caption_input.scst_placeholders(self.config)
        return {"video": np.zeros((batch_size, t, r, r, 3), np.float32),
                "caption_ids": ids, "caption_mask": np.ones_like(ids),
                "idx": np.zeros((batch_size,), np.int32),
                **caption_input.placeholder_zeros(scst_fields, (batch_size,))}

    def init_from_pretrained(self, state):
        """The video QA task's initialisation; SCST refuses to start without `init.checkpoint`
        (the cross-entropy stage) unless `init.allow_scratch`."""
        if self.scst:
            self.require_init("mPLUG-2 video caption SCST stage starts from the cross-entropy "
                              "stage: set --config.init.checkpoint=<its workdir> (init.select "
                              "picks its checkpoint)")
        return super().init_from_pretrained(state)

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Release caption loss (`caption_loss`), or the SCST loss -> (loss, (metrics, extra))."""
        if self.scst:
            key = self.dropout_keys(rng)
            states, smask = self.scst_states(params, batch["video"], key())
            return self.scst_loss(params, extra, batch, states, smask, key())
        use_rng = self.model.dropout_rate > 0
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        logits = self._apply(params, caption_logits, batch["video"], ids, mask,
                             rng=rng if use_rng else None)
        loss, valid = caption_loss(logits, ids, mask, self.prompt_len)
        hit = (jnp.argmax(logits[:, :-1], -1) == ids[:, 1:]) & valid
        n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
        return loss, ({"loss": loss, "loss_caption": loss,
                       "target_tokens": valid.sum().astype(jnp.float32),
                       "tf_token_acc": hit.sum() / n}, extra)

    # ---- SCST hooks (`mplug_jax.scst.ScstMixin`) ---------------------------------------------

    def scst_states(self, params, video, rng):
        img = self._apply(params, qa.video_embeds, video, rng=rng)
        return img, jnp.ones(img.shape[:2], jnp.int32)

    def scst_decoder(self, params, train: bool):
        return (self.train_decoder if train else self.decoder), params["decoder"]

    def scst_train_references(self):
        """Every training caption of each video (records grouped by video_id, in order of
        first appearance) and the group of each training record."""
        src = mplug2_input.caption_source(self.config.input, "train", self.config.seed)
        refs: list[list[str]] = []
        video_of: dict[str, int] = {}
        groups = np.empty(len(src), np.int64)
        for i in range(len(src)):
            rec = src[i]
            g = groups[i] = video_of.setdefault(rec["video_id"], len(video_of))
            if g == len(refs):
                refs.append([])
            refs[g].append(rec["caption"])
        return refs, groups

    # ---- predict fns (used by evaluators) ---------------------------------------------------

    def predict_fns(self) -> dict:
        return {"encode_video": self.encode_video,
                "caption_beam_embeds": self.caption_beam_from_embeds,
                "caption_beam": self.caption_beam}

    def caption_beam_from_embeds(self, params, img: jax.Array) -> dict:
        """Official caption search from image_embeds float[B, N, H] (`encode_video`):
        {'ids' int32[B, max_length + 1] top hypothesis ([CLS] first, right-padded),
        'scores' float32[B]} with `task.generation`'s settings."""
        out = generate.beam_search(self.decoder, params["decoder"], img,
                                   jnp.ones(img.shape[:2], jnp.int32),
                                   beam_size=self.beam_size, min_length=self.min_length,
                                   max_length=self.max_length, alpha=self.alpha,
                                   bos_id=CLS_ID, eos_id=SEP_ID, pad_id=PAD_ID)
        return {"ids": out["ids"][:, 0], "scores": out["scores"][:, 0]}

    def caption_beam(self, params, video: jax.Array) -> dict:
        """`caption_beam_from_embeds(encode_video(video))` for video float32[B, T, R, R, 3]."""
        return self.caption_beam_from_embeds(params, self.encode_video(params, video))

    def decode(self, ids) -> str:
        """Generated ids -> caption text (`decode_caption` with this task's prompt)."""
        return decode_caption(ids, self.prompt)
