"""mPLUG-2 video QA fine-tuning (official `video_qa_mplug2.py` / `model_videoqa_mplug.py`).

Forward as the release (docs/fixtures.md#mplug-2-forward and #mplug-2-losses): video ->
`encode_video` (dual vision encoder with the local temporal modules) -> `image_embeds`
(vision_embeds + universal layers), question -> `encode_text`, `fuse`; decoder states =
`mplug2.vqa_states` (cat([fusion image, fusion question]), mask cat([ones, question mask])). Loss
(docs/fixtures.md#mplug-2-losses, quirk 7): per question the summed next-token NLL of "[CLS] answer
[SEP]" (padding excluded), weighted, summed, divided by the clips B of the (micro-)batch:
`vqa.answer_nll` / `vqa.vqa_loss`, the math `interop.parity_mplug2` checks against the official
loss. Generation: the official beam search (`generate.beam_search`, beam 5 / min 1 / max 10,
docs/fixtures.md#mplug-2-generation) over those states.

`model.temporal=False` builds the same network without the local temporal modules: each frame
is encoded alone and frames only meet by the class-token average and in the universal /
fusion layers (an ablation; checkpoint `lmhra` weights are then not loaded).

Init (`config.init`): `checkpoint` = a `mplug-jax convert` mPLUG-2 directory
(`mplug2_convert.load_converted`), an official mPLUG-2 file with `config_bert` and
`config_yaml` (`mplug2_convert.load_official`), or a workdir of this task; the visual
positional embedding is resized bilinearly when the frame grid differs (official fine-tuning
does the same). Random weights only with `init.allow_scratch`.

Batch: see `mplug_jax.mplug2.input`.
"""
from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mplug_jax import generate
from mplug_jax import params as P
from mplug_jax.mplug2 import input as mplug2_input
from mplug_jax.losses import CLS_ID, PAD_ID, SEP_ID
from mplug_jax.mplug2 import model as mplug2
from mplug_jax.mplug2.heads import HEAD_PARAMS
from mplug_jax.models.vit import resample_posemb
from mplug_jax import tasks
from mplug_jax.tasks import base
from mplug_jax.tasks.vqa import answer_nll, vqa_loss

POSEMB = "vision/pos_embed"
TEMPORAL_PARAMS = r"^vision/blocks_\d+/lmhra[12]/"
# Workdirs whose params any mPLUG-2 task loads (same backbone names; see `load_checkpoint`).
WORKDIR_TASKS = ("mplug2.video_qa", "mplug2.video_caption", "mplug2.retrieval",
                 "mplug2.pretrain")


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


class Task(base.Task):
    """mPLUG-2 video QA (see module docstring).

    Args:
      config: full run config (`model` = MPLUG2 fields, `task`, `input`, `init`).
      steps_per_epoch: train steps per epoch (unused: no ramps).
    """

    name = "mplug2.video_qa"
    capacity_hint = "nothing is dropped by this task"

    def __init__(self, config, steps_per_epoch: int = 1):
        super().__init__(config, steps_per_epoch)
        self.model = mplug2.MPLUG2.from_config(config.model)
        self.train_model = self.model.clone(deterministic=self.model.dropout_rate == 0)
        self.decoder = mplug2.decoder_module(self.model)
        inp = config.input
        self.lq, self.la = int(inp.max_question_tokens), int(inp.max_answer_tokens)
        if self.la < 2:
            raise ValueError(f"input.max_answer_tokens must be >= 2 ([CLS] + [SEP]), got "
                             f"{self.la}")
        if self.lq < 1:
            raise ValueError(f"input.max_question_tokens must be >= 1, got {self.lq}")
        if self.model.num_frames < 1:
            raise ValueError(f"model.num_frames must be >= 1, got {self.model.num_frames}")

    def _apply(self, params, method, *args, rng: jax.Array | None = None):
        if rng is None:
            return self.model.apply({"params": params}, *args, method=method)
        return self.train_model.apply({"params": params}, *args, method=method,
                                      rngs={"dropout": rng})

    # ---- input ------------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config):
        base.refuse_synthetic(config, "mPLUG-2 video QA", "set --config.input.dataset=json "
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

    # ---- state ------------------------------------------------------------------------------

    def init_params(self, rng: jax.Array):
        b = self.dummy_batch(1)
        k_params, k_drop = jax.random.split(rng)
        return self.model.init({"params": k_params, "dropout": k_drop}, b["video"],
                               b["question_ids"], b["question_mask"], b["answer_ids"],
                               b["answer_mask"])["params"]

    def init_from_pretrained(self, state):
        """Params from `config.init.checkpoint` (module docstring); refuses random weights
        unless `init.allow_scratch`."""
        self.require_init("mPLUG-2 video QA config fine-tunes a released mPLUG-2: set "
                          "--config.init.checkpoint=CONVERTED_DIR (`mplug-jax convert`) or a "
                          "workdir of this task")
        init = self.config.get("init")
        if not init or not init.get("checkpoint"):
            if init and (init.get("clip") or init.get("bert")):
                raise ValueError("the mPLUG-2 video QA task loads whole mPLUG-2 checkpoints "
                                 "only (init.checkpoint); init.clip / init.bert are for mPLUG")
            return state
        flat, what = self.load_checkpoint(init)
        params = put_flat(state.params, flat)
        if jax.process_index() == 0:
            print(f"initialised {len(flat)} arrays from {what}", flush=True)
        return state.replace(params=params)

    def load_checkpoint(self, init) -> tuple[dict[str, np.ndarray], str]:
        """(flat params fitted to this model, description) of `init.checkpoint`
        (`load_checkpoint`)."""
        return load_checkpoint(self.model, init, self.name)

    def pretrained_params(self, params):
        """`params` with `config.init.checkpoint` put in (what `mplug-jax evaluate` scores)."""
        return put_flat(params, self.load_checkpoint(self.config.init)[0])

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Weighted summed answer NLL / clips (module docstring) -> (loss, (metrics, extra))."""
        drop = base.KeyStream(rng)
        use_rng = self.model.dropout_rate > 0
        states, smask = self._apply(params, video_states, batch["video"],
                                    batch["question_ids"], batch["question_mask"],
                                    rng=next(drop) if use_rng else None)
        a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
        logits = self._apply(params, "decode", a_ids, a_mask, states, smask,
                             rng=next(drop) if use_rng else None)
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


def load_checkpoint(model: mplug2.MPLUG2, init, task_name: str
                    ) -> tuple[dict[str, np.ndarray], str]:
    """(flat params fitted to `model`, description) of `init.checkpoint`: a `mplug-jax convert`
    mPLUG-2 directory, an official file (with `init.config_bert` / `init.config_yaml`) or a
    workdir of any task in `WORKDIR_TASKS` (the heads of retrieval / pretraining are dropped
    for a model without them). Temporal params are dropped for `model.temporal=False`; the
    visual positional embedding is resampled to the model's frame grid."""
    from mplug_jax import selection
    from mplug_jax import workdir as workdir_lib
    from mplug_jax.mplug2 import convert as mplug2_convert
    path = epath.Path(init.checkpoint)
    if mplug2_convert.is_converted_dir(str(path)):
        tree, what = mplug2_convert.load_converted(str(path)).params, f"converted {path}"
    elif (path / "config.json").exists():
        cfg = workdir_lib.read_config(path)
        if tasks.canonical(cfg.task.name) not in WORKDIR_TASKS:
            raise ValueError(f"init.checkpoint={path} is a {cfg.task.name!r} workdir; "
                             f"{task_name!r} loads workdirs of {WORKDIR_TASKS} or mPLUG-2 "
                             "checkpoints")
        tree = workdir_lib.restore_params(*selection.init_source(init))[1]
        what = f"{cfg.task.name} workdir {path}"
    elif path.is_file():
        if not init.get("config_bert") or not init.get("config_yaml"):
            raise ValueError(f"init.checkpoint={path} is an official file: also set "
                             "init.config_bert and init.config_yaml (the release's "
                             "config_bert_large_text.json and VideoQA yaml)")
        tree = mplug2_convert.load_official(str(path), init.config_bert,
                                            init.config_yaml).params
        what = f"official mPLUG-2 checkpoint {path}"
    else:
        raise FileNotFoundError(f"init.checkpoint={path}: neither a `mplug-jax convert` "
                                "mPLUG-2 directory, a workdir of an mPLUG-2 task nor a file")
    flat = {k: np.asarray(jax.device_get(v))
            for k, v in P.flatten(nn.meta.unbox(tree)).items()}
    if not hasattr(model, "itc_project"):  # not `mplug2_heads.MPLUG2WithHeads`
        flat = {k: v for k, v in flat.items() if k.split("/", 1)[0] not in HEAD_PARAMS}
    if not model.temporal:
        flat = {k: v for k, v in flat.items() if not _is_temporal(k)}
    grid = model.image_size // model.patch_size
    if POSEMB in flat and flat[POSEMB].shape[0] != grid * grid + 1:
        flat[POSEMB] = resample_posemb(flat[POSEMB], grid)
    return flat, what


def _is_temporal(name: str) -> bool:
    return re.search(TEMPORAL_PARAMS, name) is not None


def put_flat(tree, flat: dict[str, np.ndarray]):
    """Replace leaves of a (sharded) param tree by `flat` {'a/b/c': array}, keeping each leaf's
    dtype and sharding; raises naming every array without a parameter or of the wrong shape."""
    leaves = flax.traverse_util.flatten_dict(tree, sep="/")
    bad = [f"{k} {tuple(v.shape)} -> " + (f"{tuple(leaves[k].shape)}" if k in leaves
                                          else "no such parameter")
           for k, v in flat.items() if k not in leaves or leaves[k].shape != v.shape]
    if bad:
        raise ValueError(f"init: {len(bad)} arrays do not fit the mPLUG-2 model: "
                         + "; ".join(bad[:10]))
    for k, v in flat.items():
        leaves[k] = jax.device_put(jnp.asarray(v, leaves[k].dtype), leaves[k].sharding)
    return flax.traverse_util.unflatten_dict(leaves, sep="/")
