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

SCST (`task.scst.enabled`, docs/official-formats.md#scst): `prepare_batch` runs, outside the jitted
step and without gradients, a search on the current params: 'beam' (official) keeps the K
n-best hypotheses of the official beam search; reward = CIDEr-D of each vs the image's
references (`scoring.caption.CiderD`; tokenizer and document frequencies: options below),
baseline = mean reward of the image's K; 'sample': K sequences from `generate.sample`,
baseline = the reward of the greedy caption. The step recomputes with gradients, by teacher
forcing, score = summed log-prob of the generated tokens ([SEP] included), divided by the
length penalty ((5 + n) / 6) ** alpha in 'beam' mode (the beam score), and minimises the mean
over images and sequences of -(score / m) * (reward - baseline), n = generated tokens.

SCST options (`task.scst`; base / large presets: the official value, tiny: ours; a field left
out means ours; a bad value is a one-line ValueError at construction):
  length_norm      'generated' (ours): m = n; 'official': m = n + 1 (the official counts the
                   [CLS] start token). The beam score's length penalty keeps n in both.
  search_dropout   False (ours): the search is deterministic (eval model); True (official,
                   which searches in train mode): `train_model` with dropout keyed by
                   fold_in(key, 1), key = the batch's deterministic search key (so SCST stays
                   a function of params and batch, and resume stays bit-identical). Search
                   outputs keep their shapes. Differences left: the cached search keeps each
                   position's keys / values from the step that wrote them (the official
                   recomputes the prefix, with fresh masks, at every step), and the step
                   recomputes the log-probs with its own dropout masks (the official
                   back-propagates through the search itself). No-op at dropout_rate 0.
  reward_tokenize  'simple' (ours): `scoring.simple_tokenize`; 'ptb' (official): the PTB
                   tokenizer (`scoring.ptb_tokenize`, Java; one call per batch and one for the
                   training references).
  cider_df         'train' (ours): CIDEr-D document frequencies (and log #documents) from the
                   whole training set's references; 'batch' (official as far as public code
                   shows): from the B rows' references of the batch (one document per row;
                   the K hypotheses of a row share it), so a reward depends on the batch.

Batch (CE): image float32[B, R, R, 3], dec_ids / dec_mask int32[B, L], image_index int32[B],
idx int32[B]; SCST adds scst_ids int32[B, K, T], scst_lengths int32[B, K], scst_advantage /
scst_reward float32[B, K] (T = max_length + 1).
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate
from mplug_jax.data.inputs import caption as caption_input
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.scoring import caption as scoring
from mplug_jax.scoring.caption import decode_text
from mplug_jax.sharding import replicated
from mplug_jax.tasks import base

SCST_MODES = ("beam", "sample")
# task.scst options: (field, valid values, default when the field is absent = ours).
SCST_OPTIONS = (("length_norm", ("generated", "official"), "generated"),
                ("search_dropout", (False, True), False),
                ("reward_tokenize", ("simple", "ptb"), "simple"),
                ("cider_df", ("train", "batch"), "train"))


def scst_options(scst) -> dict:
    """The validated `SCST_OPTIONS` of the mapping `scst` (config `task.scst`); a bad value
    raises a one-line ValueError naming the field and the valid values."""
    out = {}
    for name, valid, default in SCST_OPTIONS:
        value = scst.get(name, default)
        # bool options take bools only (1 == True would slip through `in`).
        if isinstance(default, bool) != isinstance(value, bool) or value not in valid:
            raise ValueError(f"task.scst.{name}={value!r}; valid: "
                             f"{', '.join(repr(v) for v in valid)}")
        out[name] = value
    return out


class Task(base.Task):
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
        scst = t.get("scst") or {}
        self.scst = bool(scst.get("enabled", False))
        if self.scst:
            self.scst_mode = str(scst.get("mode", "beam"))
            if self.scst_mode not in SCST_MODES:
                raise ValueError(f"task.scst.mode={self.scst_mode!r}; valid: {SCST_MODES}")
            self.scst_k = int(scst.get("num_samples", 0) or self.beam_size)
            self.sample_kw = dict(temperature=float(scst.get("temperature", 1.0)),
                                  top_k=int(scst.get("top_k", 0)),
                                  top_p=float(scst.get("top_p", 1.0)))
            if self.scst_mode == "beam" and self.scst_k != self.beam_size:
                raise ValueError(f"task.scst.num_samples={self.scst_k} must equal "
                                 f"task.generation.beam_size={self.beam_size} in 'beam' mode "
                                 "(the official keeps the beam's K hypotheses), or be 0")
            if self.zero_shot_prompt:
                raise ValueError("task.zero_shot_prompt is for evaluating a pretraining "
                                 "workdir; SCST trains the fine-tuned (prompt-free) decoder")
            self.scst_opts = scst_options(scst)
            self._cider = self._refs = None  # built on first use (the training references)
            self._search_fns: dict = {}

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
        for name, (shape, dtype) in caption_input.scst_placeholders(self.config).items():
            out[name] = np.zeros((batch_size,) + shape, dtype)
        return out

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

    def _token_logprobs(self, params, ids, mask, states, smask, rng):
        """log p(ids[:, t+1] | ids[:, :t+1], states) float32[R, L-1] (teacher forcing)."""
        h = self._apply(params, base.decoder_hidden, ids, mask, states, smask,
                        rng=rng)
        logits = self._apply(params, base.decoder_head, h[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]

    # ---- step -------------------------------------------------------------------------------

    def loss(self, params, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """Cross-entropy (or SCST) loss on one (micro-)batch -> (loss, (metrics, extra))."""
        drop = base.KeyStream(rng)
        states, smask = self.states(params, batch["image"], rng=next(drop))
        if self.scst:
            return self._scst_loss(params, extra, batch, states, smask, next(drop))
        ids, mask = batch["dec_ids"], batch["dec_mask"]
        tok_lp = self._token_logprobs(params, ids, mask, states, smask, next(drop))
        valid = (mask[:, 1:] > 0).astype(jnp.float32)
        n = jnp.maximum(valid.sum(), 1.0)
        loss = -(tok_lp * valid).sum() / n
        metrics = {"loss": loss, "loss_caption": loss, "target_tokens": valid.sum()}
        return loss, (metrics, extra)

    def _scst_loss(self, params, extra, batch, states, smask, rng):
        ids, lengths = batch["scst_ids"], batch["scst_lengths"]
        b, k, t = ids.shape
        flat = ids.reshape(b * k, t)
        mask = (jnp.arange(t)[None] < lengths.reshape(-1, 1)).astype(jnp.int32)
        rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731 (row b*k+j = image b)
        tok_lp = self._token_logprobs(params, flat, mask, rep(states), rep(smask), rng)
        n = jnp.maximum(lengths.reshape(-1) - 1, 1).astype(jnp.float32)  # generated tokens
        score = (tok_lp * mask[:, 1:]).sum(-1)
        if self.scst_mode == "beam":
            score = score / ((5.0 + n) / 6.0) ** self.alpha
        adv = batch["scst_advantage"].reshape(-1)
        norm = n + 1.0 if self.scst_opts["length_norm"] == "official" else n
        loss = jnp.mean(-(score / norm) * adv)
        metrics = {"loss": loss, "loss_scst": loss,
                   "scst_reward": jnp.mean(batch["scst_reward"]),
                   "scst_logprob_per_token": jnp.mean(score / n)}
        return loss, (metrics, extra)

    # ---- SCST rewards (host side, outside the jitted step) ----------------------------------

    def tokenize(self, texts) -> list[str]:
        """Captions -> space-separated reward tokens (`task.scst.reward_tokenize`)."""
        if self.scst_opts["reward_tokenize"] == "ptb":
            return scoring.ptb_tokenize(list(texts))
        return [scoring.simple_tokenize(t) for t in texts]

    def references(self) -> list[list[str]]:
        """The tokenised training references, one list per image (read on first use)."""
        if self._refs is None:
            split = caption_input.load_split(self.config.input, "train",
                                             self.config.model.image_size, self.config.seed)
            counts = [len(r) for r in split.references]
            flat = self.tokenize([r.lower() for refs in split.references for r in refs])
            ends = np.cumsum(counts)
            self._refs = [flat[e - c:e] for c, e in zip(counts, ends)]
        return self._refs

    def cider(self) -> scoring.CiderD:
        """The reward scorer with document frequencies from the training references."""
        if self._cider is None:
            self._cider = scoring.CiderD(self.references())
        return self._cider

    def _search(self, params, image, key):
        # search_dropout: train-mode search (the official), dropout keyed off `key`; the
        # sampling key itself stays `key`, so 'sample' draws the same tokens as before.
        drop = jax.random.fold_in(key, 1) if self.scst_opts["search_dropout"] else None
        model = self.model if drop is None else self.train_model
        k_img, k_dec, k_greedy = ((None,) * 3 if drop is None else
                                  (jax.random.fold_in(drop, i) for i in range(3)))
        states, smask = self.states(params, image, rng=k_img)
        t = self.max_length + 1
        if self.scst_mode == "beam":
            out = generate.beam_search(model, params, states, smask,
                                       beam_size=self.beam_size, min_length=self.min_length,
                                       max_length=self.max_length, alpha=self.alpha,
                                       rng=k_dec)
            return {"ids": out["ids"], "lengths": out["lengths"]}
        out = generate.sample(model, params, states, smask, key, max_len=t,
                              num_samples=self.scst_k, min_length=self.min_length,
                              rng=k_dec, **self.sample_kw)
        greedy = generate.greedy(model, params, states, smask, t,
                                 min_length=self.min_length, rng=k_greedy)
        return {"ids": out["ids"], "lengths": out["lengths"], "greedy": greedy}

    def rewards(self, ids: np.ndarray, image_index: np.ndarray,
                greedy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(reward, advantage) float32[B, K] of generated ids int32[B, K, T] for the images
        `image_index` int[B]; baseline = mean of the K rewards, or the reward of `greedy`
        int32[B, T] when given. Captions tokenised by `tokenize`; CIDEr-D document
        frequencies from the training references (cider_df 'train') or from the B rows'
        references (cider_df 'batch': one document per row)."""
        b, k, _ = ids.shape
        all_refs = self.references()
        refs = [all_refs[int(i)] for i in image_index]
        cider = self.cider() if self.scst_opts["cider_df"] == "train" else scoring.CiderD(refs)
        texts = [decode_text(ids[i, j], self.prompt) for i in range(b) for j in range(k)]
        if greedy is not None:
            texts += [decode_text(x, self.prompt) for x in greedy]
        texts = self.tokenize(texts)  # one call: PTB starts one Java process per call
        reward = cider.scores(texts[:b * k], [r for r in refs for _ in range(k)]).reshape(b, k)
        if greedy is None:
            base_line = reward.mean(1, keepdims=True)
        else:
            base_line = cider.scores(texts[b * k:], refs)[:, None]
        return reward.astype(np.float32), (reward - base_line).astype(np.float32)

    def prepare_batch(self, params, batch: dict) -> dict:
        """SCST: search on the current params, rewards on the host, fields added to the batch
        (sharded like it); the batch unchanged otherwise. Deterministic given params and batch
        (the sampling key is derived from the batch's record indices)."""
        if not self.scst:
            return batch
        mesh = batch["image"].sharding.mesh
        if mesh not in self._search_fns:  # outputs replicated: every process gets all rows
            self._search_fns[mesh] = (
                jax.jit(self._search, out_shardings=replicated(mesh)),
                jax.jit(lambda *x: x, out_shardings=replicated(mesh)))
        search, gather = self._search_fns[mesh]
        idx, image_index = (np.asarray(x) for x in jax.device_get(
            gather(batch["idx"], batch["image_index"])))
        key = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)),
                                 zlib.crc32(idx.astype(np.int32).tobytes()) & 0x7FFFFFFF)
        out = jax.device_get(search(params, batch["image"], key))
        reward, adv = self.rewards(np.asarray(out["ids"]), image_index, out.get("greedy"))
        full = {"scst_ids": np.asarray(out["ids"], np.int32),
                "scst_lengths": np.asarray(out["lengths"], np.int32),
                "scst_advantage": adv, "scst_reward": reward}
        n, pid = jax.process_count(), jax.process_index()
        rows = len(reward)
        local = {k: v[pid * rows // n:(pid + 1) * rows // n] for k, v in full.items()}
        return {**batch, **make_global_batch(local, mesh)}

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
