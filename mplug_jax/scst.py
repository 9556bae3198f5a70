"""Self-critical sequence training (SCST, CIDEr-D reward; docs/official-formats.md#scst), shared
by the caption tasks: mPLUG image captioning (`tasks/caption.py`) and mPLUG-2 video captioning
(`mplug2/tasks/video_caption.py`).

`prepare_batch` runs, outside the jitted step and without gradients, a search on the current
params: 'beam' (official) keeps the K n-best hypotheses of the official beam search; reward =
CIDEr-D of each vs the references of the row's image / video (`scoring.caption.CiderD`;
tokenizer and document frequencies: options below), baseline = mean reward of the row's K;
'sample': K sequences from `generate.sample`, baseline = the reward of the greedy caption. The
step recomputes with gradients, by teacher forcing, score = summed log-prob of the generated
tokens ([SEP] included), divided by the length penalty ((5 + n) / 6) ** alpha in 'beam' mode
(the beam score), and minimises the mean over rows and sequences of
-(score / m) * (reward - baseline), n = generated tokens.

Options (`task.scst`): `enabled`, `mode` ('beam' | 'sample'), `num_samples` (K; 0 = the beam
size), `temperature` / `top_k` / `top_p` ('sample'), and the official SCST's details
(`OPTIONS`; a field left out means ours; a bad value is a one-line ValueError):
  length_norm      'generated' (ours): m = n; 'official': m = n + 1 (the official counts the
                   [CLS] start token). The beam score's length penalty keeps n in both.
  search_dropout   False (ours): the search is deterministic (eval model); True (official,
                   which searches in train mode): the train-mode model with dropout keyed by
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

Batch fields (`data.inputs.caption.scst_placeholders`, zeros in every train batch, filled by
`prepare_batch`): scst_ids int32[B, K, T], scst_lengths int32[B, K], scst_advantage /
scst_reward float32[B, K] (T = max_length + 1).
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import generate
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.scoring import caption as scoring
from mplug_jax.sharding import replicated
from mplug_jax.tasks import base

MODES = ("beam", "sample")
# task.scst options: (field, valid values, default when the field is absent = ours).
OPTIONS = (("length_norm", ("generated", "official"), "generated"),
           ("search_dropout", (False, True), False),
           ("reward_tokenize", ("simple", "ptb"), "simple"),
           ("cider_df", ("train", "batch"), "train"))


def options(scst) -> dict:
    """The validated `OPTIONS` of the mapping `scst` (config `task.scst`); a bad value raises
    a one-line ValueError naming the field and the valid values."""
    out = {}
    for name, valid, default in OPTIONS:
        value = scst.get(name, default)
        # bool options take bools only (1 == True would slip through `in`).
        if isinstance(default, bool) != isinstance(value, bool) or value not in valid:
            raise ValueError(f"task.scst.{name}={value!r}; valid: "
                             f"{', '.join(repr(v) for v in valid)}")
        out[name] = value
    return out


class ScstMixin:
    """SCST for a caption task (module docstring), mixed in before its `base.Task`.

    The task sets `beam_size`, `min_length`, `max_length`, `alpha` (its `task.generation`),
    calls `init_scst(config.task)` in `__init__`, returns `scst_loss(...)` from `loss` when
    `self.scst`, and provides:
      scst_input: the batch key the search reads ('image', 'video').
      scst_states(params, x, rng): decoder states (float[B, S, D], int32[B, S] mask) of the
        batch input x; rng: dropout key or None (eval).
      scst_decoder(params, train): (module, its params) that `mplug_jax.generate` searches;
        train: the dropout model.
      scst_train_references(): (references: list[list[str]] per group (image / video), raw;
        int[N] the group of each train record, indexed by the batch's `idx`).
      decode(ids): the caption text of generated ids ([CLS] first), as evaluation writes it.
    """

    scst = False
    scst_input = "image"

    def init_scst(self, task_cfg) -> None:
        """`self.scst` and the SCST settings of `task_cfg.scst` (one-line ValueErrors)."""
        scst = task_cfg.get("scst") or {}
        self.scst = bool(scst.get("enabled", False))
        if not self.scst:
            return
        self.scst_mode = str(scst.get("mode", "beam"))
        if self.scst_mode not in MODES:
            raise ValueError(f"task.scst.mode={self.scst_mode!r}; valid: {MODES}")
        self.scst_k = int(scst.get("num_samples", 0) or self.beam_size)
        self.sample_kw = dict(temperature=float(scst.get("temperature", 1.0)),
                              top_k=int(scst.get("top_k", 0)), top_p=float(scst.get("top_p", 1.0)))
        if self.scst_mode == "beam" and self.scst_k != self.beam_size:
            raise ValueError(f"task.scst.num_samples={self.scst_k} must equal "
                             f"task.generation.beam_size={self.beam_size} in 'beam' mode "
                             "(the official keeps the beam's K hypotheses), or be 0")
        self.scst_opts = options(scst)
        self._cider = self._refs = self._groups = None  # built on first use
        self._search_fns: dict = {}

    # ---- step (jitted) ----------------------------------------------------------------------

    def _token_logprobs(self, params, ids, mask, states, smask, rng):
        """log p(ids[:, t+1] | ids[:, :t+1], states) float32[R, L-1] (teacher forcing)."""
        h = self._apply(params, base.decoder_hidden, ids, mask, states, smask, rng=rng)
        logits = self._apply(params, base.decoder_head, h[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]

    def scst_loss(self, params, extra, batch, states, smask, rng):
        """SCST loss of the batch's scst_* fields on decoder states float[B, S, D] / int32[B, S]
        (rng: the decoder's dropout key or None) -> (loss, (metrics, extra))."""
        ids, lengths = batch["scst_ids"], batch["scst_lengths"]
        b, k, t = ids.shape
        flat = ids.reshape(b * k, t)
        mask = (jnp.arange(t)[None] < lengths.reshape(-1, 1)).astype(jnp.int32)
        rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731 (row b*k+j = input b)
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

    # ---- search and rewards (host side, outside the jitted step) ----------------------------

    def scst_search(self, params, x, key):
        """The search on batch input x: {'ids' int32[B, K, T], 'lengths' int32[B, K]} and, in
        'sample' mode, 'greedy' int32[B, T]. key: the sampling key; with search_dropout the
        dropout keys derive from fold_in(key, 1), so 'sample' draws the same tokens either way."""
        drop = jax.random.fold_in(key, 1) if self.scst_opts["search_dropout"] else None
        k_in, k_dec, k_greedy = ((None,) * 3 if drop is None else
                                 (jax.random.fold_in(drop, i) for i in range(3)))
        states, smask = self.scst_states(params, x, k_in)
        model, p = self.scst_decoder(params, drop is not None)
        t = self.max_length + 1
        if self.scst_mode == "beam":
            out = generate.beam_search(model, p, states, smask, beam_size=self.beam_size,
                                       min_length=self.min_length, max_length=self.max_length,
                                       alpha=self.alpha, rng=k_dec)
            return {"ids": out["ids"], "lengths": out["lengths"]}
        out = generate.sample(model, p, states, smask, key, max_len=t, num_samples=self.scst_k,
                              min_length=self.min_length, rng=k_dec, **self.sample_kw)
        greedy = generate.greedy(model, p, states, smask, t, min_length=self.min_length,
                                 rng=k_greedy)
        return {"ids": out["ids"], "lengths": out["lengths"], "greedy": greedy}

    def tokenize(self, texts) -> list[str]:
        """Captions -> space-separated reward tokens (`task.scst.reward_tokenize`)."""
        if self.scst_opts["reward_tokenize"] == "ptb":
            return scoring.ptb_tokenize(list(texts))
        return [scoring.simple_tokenize(t) for t in texts]

    def references(self) -> list[list[str]]:
        """The tokenised (lowercased) training references, one list per group (read on first
        use, with each train record's group)."""
        if self._refs is None:
            refs, groups = self.scst_train_references()
            counts = [len(r) for r in refs]
            flat = self.tokenize([r.lower() for rr in refs for r in rr])
            ends = np.cumsum(counts)
            self._refs = [flat[e - c:e] for c, e in zip(counts, ends)]
            self._groups = np.asarray(groups, np.int64)
        return self._refs

    def groups(self, idx: np.ndarray) -> np.ndarray:
        """The reference group (image / video) of train records idx int[B]."""
        self.references()
        return self._groups[np.asarray(idx, np.int64)]

    def cider(self) -> scoring.CiderD:
        """The reward scorer with document frequencies from the training references."""
        if self._cider is None:
            self._cider = scoring.CiderD(self.references())
        return self._cider

    def rewards(self, ids: np.ndarray, groups: np.ndarray,
                greedy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(reward, advantage) float32[B, K] of generated ids int32[B, K, T] for the reference
        groups int[B]; baseline = mean of the K rewards, or the reward of `greedy` int32[B, T]
        when given. Captions (`decode`) tokenised by `tokenize`; CIDEr-D document frequencies
        from the training references (cider_df 'train') or from the B rows' references
        (cider_df 'batch': one document per row)."""
        b, k, _ = ids.shape
        all_refs = self.references()
        refs = [all_refs[int(i)] for i in groups]
        cider = self.cider() if self.scst_opts["cider_df"] == "train" else scoring.CiderD(refs)
        texts = [self.decode(ids[i, j]) for i in range(b) for j in range(k)]
        if greedy is not None:
            texts += [self.decode(x) for x in greedy]
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
        x = batch[self.scst_input]
        mesh = x.sharding.mesh
        if mesh not in self._search_fns:  # outputs replicated: every process gets all rows
            self._search_fns[mesh] = (jax.jit(self.scst_search, out_shardings=replicated(mesh)),
                                      jax.jit(lambda v: v, out_shardings=replicated(mesh)))
        search, gather = self._search_fns[mesh]
        idx = np.asarray(jax.device_get(gather(batch["idx"])))
        key = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)),
                                 zlib.crc32(idx.astype(np.int32).tobytes()) & 0x7FFFFFFF)
        out = jax.device_get(search(params, x, key))
        reward, adv = self.rewards(np.asarray(out["ids"]), self.groups(idx), out.get("greedy"))
        full = {"scst_ids": np.asarray(out["ids"], np.int32),
                "scst_lengths": np.asarray(out["lengths"], np.int32),
                "scst_advantage": adv, "scst_reward": reward}
        n, pid = jax.process_count(), jax.process_index()
        rows = len(reward)
        local = {k: v[pid * rows // n:(pid + 1) * rows // n] for k, v in full.items()}
        return {**batch, **make_global_batch(local, mesh)}
