"""mPLUG pretraining objectives as pure functions: ITC, ITM, MLM and prefix LM.

Mirrors the ALBEF-style losses that mPLUG inherits (`ALBEF.forward`, `BertForMaskedLM`,
`BertLMHeadModel` in the official code): contrastive loss against a feature queue with
momentum distillation, hard-negative sampling for image-text matching, BERT token masking and
next-token losses. Every reduction, softmax and log-softmax runs in float32 whatever the
input dtype. Functions take global-batch arrays: under `jax.jit` with sharded inputs the plain
`jnp` ops over the batch axis are global (GSPMD inserts the collectives).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103


def _soft_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy with soft targets over the last axis: float32[...]."""
    return -jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32), -1) * targets, -1)


def _hard_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy with integer labels over the last axis: float32[...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), -1)[..., 0]


def _weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
    w = w.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def clamp_temp(temp: jax.Array, temp_min: float = 0.001, temp_max: float = 0.5) -> jax.Array:
    """The learnable ITC temperature clamped like ALBEF's in-place `temp.clamp_(0.001, 0.5)`."""
    return jnp.clip(temp.astype(jnp.float32), temp_min, temp_max)


def itc_loss(img_feat: jax.Array, txt_feat: jax.Array, img_feat_m: jax.Array,
             txt_feat_m: jax.Array, image_queue: jax.Array, text_queue: jax.Array,
             temp: jax.Array, alpha: jax.Array | float,
             positives: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Image-text contrastive loss with a queue and momentum distillation (ALBEF eq. 1-3).

    Online features are compared with [momentum features of the whole batch; queue]; the
    targets mix the one-hot positives with the momentum model's own softmax (weight `alpha`).

    Args:
      img_feat: float32[B, E] L2-normalised image [CLS] projections (online model).
      txt_feat: float32[B, E] L2-normalised text [CLS] projections (online model).
      img_feat_m: float32[B, E] same from the momentum model (no gradient flows through).
      txt_feat_m: float32[B, E] same from the momentum model.
      image_queue: float32[Q, E] earlier momentum image features.
      text_queue: float32[Q, E] earlier momentum text features.
      temp: float32[] temperature, already clamped.
      alpha: float32[] distillation weight in [0, 1].
      positives: optional bool[B, B + Q]: which of [batch; queue] entries are positives of
        each row (e.g. the same image id, official retrieval); the hard targets are then
        uniform over a row's positives. Default: the diagonal only (one-hot).
    Returns:
      (float32[] loss = (i2t + t2i) / 2, dict with `sim_i2t`, `sim_t2i`: float32[B, B] online
      similarities against the batch's momentum features, used for hard negatives).
    """
    f32 = jnp.float32
    img_feat, txt_feat = img_feat.astype(f32), txt_feat.astype(f32)
    img_m = jax.lax.stop_gradient(img_feat_m.astype(f32))
    txt_m = jax.lax.stop_gradient(txt_feat_m.astype(f32))
    img_all_KE = jnp.concatenate([img_m, jax.lax.stop_gradient(image_queue.astype(f32))], 0)
    txt_all_KE = jnp.concatenate([txt_m, jax.lax.stop_gradient(text_queue.astype(f32))], 0)
    b = img_feat.shape[0]
    if positives is None:
        onehot_BK = jax.nn.one_hot(jnp.arange(b), txt_all_KE.shape[0], dtype=f32)
    else:  # every row holds its own diagonal entry, so the sum is >= 1 when ids are sane
        pos = positives.astype(f32)
        onehot_BK = pos / jnp.maximum(pos.sum(-1, keepdims=True), 1.0)
    sim_i2t_m = img_m @ txt_all_KE.T / temp
    sim_t2i_m = txt_m @ img_all_KE.T / temp
    tgt_i2t = jax.lax.stop_gradient(alpha * jax.nn.softmax(sim_i2t_m, -1) + (1 - alpha) * onehot_BK)
    tgt_t2i = jax.lax.stop_gradient(alpha * jax.nn.softmax(sim_t2i_m, -1) + (1 - alpha) * onehot_BK)
    sim_i2t_BK = img_feat @ txt_all_KE.T / temp
    sim_t2i_BK = txt_feat @ img_all_KE.T / temp
    loss_i2t = jnp.mean(_soft_ce(sim_i2t_BK, tgt_i2t))
    loss_t2i = jnp.mean(_soft_ce(sim_t2i_BK, tgt_t2i))
    return (loss_i2t + loss_t2i) / 2, {"sim_i2t": sim_i2t_BK[:, :b], "sim_t2i": sim_t2i_BK[:, :b]}


def sample_hard_negatives(rng: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array,
                          matches: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Draw one hard negative text per image and one hard negative image per text.

    As ALBEF: weights are softmax(similarity) + 1e-4 with the positive (diagonal) set to zero;
    one index is drawn per row from those weights over the whole batch.

    Args:
      rng: PRNG key.
      sim_i2t: float32[B, B] image-to-text similarities (row i: image i vs texts).
      sim_t2i: float32[B, B] text-to-image similarities (row j: text j vs images).
      matches: optional bool[B, B], symmetric: pairs known to match besides the diagonal (e.g.
        identical captions). They are never drawn as negatives: a "negative" that is a true
        match is label noise, and hard-negative mining draws exactly those most often.
    Returns:
      (int32[B] index of the negative text for each image,
       int32[B] index of the negative image for each text).
    """
    b = sim_i2t.shape[0]
    eye = jnp.eye(b, dtype=bool)
    if matches is not None:  # a row whose every text matches falls back to the diagonal only
        excluded = eye | matches
        eye = jnp.where(excluded.all(-1, keepdims=True), eye, excluded)

    def draw(key, sim):
        w = jax.nn.softmax(jax.lax.stop_gradient(sim).astype(jnp.float32), -1) + 1e-4
        logits = jnp.where(eye, -jnp.inf, jnp.log(w))
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    k_txt, k_img = jax.random.split(rng)
    return draw(k_txt, sim_i2t), draw(k_img, sim_t2i)


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image-text matching cross-entropy.

    Args:
      logits: float32[M, 2] `itm_head` outputs (class 1 = matched).
      labels: int32[M] 1 for positive pairs, 0 for negatives.
    Returns:
      (float32[] mean loss, float32[] accuracy).
    """
    loss = jnp.mean(_hard_ce(logits, labels))
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, acc


def mask_tokens(rng: jax.Array, ids: jax.Array, mask: jax.Array, vocab_size: int,
                mask_prob: float = 0.15) -> tuple[jax.Array, jax.Array]:
    """BERT masking: pick `mask_prob` of the tokens; 80% -> [MASK], 10% random, 10% unchanged.

    [CLS], [SEP] and [PAD] (and padding positions) are never picked. Random replacements are
    drawn uniformly over the vocabulary, as in the official `mask()`.

    Args:
      rng: PRNG key.
      ids: int32[B, L] token ids.
      mask: int32[B, L] attention mask (1 = token).
      vocab_size: V, range of random replacement ids.
      mask_prob: probability that an eligible token is picked.
    Returns:
      (int32[B, L] corrupted ids, bool[B, L] picked positions, whose targets are `ids`).
    """
    k_pick, k_mask, k_rand, k_ids = jax.random.split(rng, 4)
    eligible = (mask > 0) & (ids != PAD_ID) & (ids != CLS_ID) & (ids != SEP_ID)
    picked = jax.random.bernoulli(k_pick, mask_prob, ids.shape) & eligible
    to_mask = jax.random.bernoulli(k_mask, 0.8, ids.shape) & picked
    # Half of the remaining 20% -> random word, the other half unchanged.
    to_rand = jax.random.bernoulli(k_rand, 0.5, ids.shape) & picked & ~to_mask
    rand_ids = jax.random.randint(k_ids, ids.shape, 0, vocab_size, dtype=ids.dtype)
    out = jnp.where(to_mask, jnp.asarray(MASK_ID, ids.dtype), ids)
    out = jnp.where(to_rand, rand_ids, out)
    return out, picked


def picked_positions(picked: jax.Array, capacity: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flat indices of the picked tokens, padded to a static `capacity` K.

    The MLM / LM head (a V-way projection) then runs on K gathered states instead of all
    B * L. Picks beyond K are dropped and counted: callers size K so that this practically
    never happens, and report the count.

    Args:
      picked: bool[B, L].
      capacity: K.
    Returns:
      (int32[K] indices into the flattened [B * L] positions, bool[K] valid entries,
       int32[] number of picks dropped).
    """
    flat = picked.reshape(-1)
    count = jnp.sum(flat, dtype=jnp.int32)
    idx = jnp.nonzero(flat, size=capacity, fill_value=0)[0].astype(jnp.int32)
    valid = jnp.arange(capacity) < count
    return idx, valid, jnp.maximum(count - capacity, 0)


def mlm_loss(logits: jax.Array, targets: jax.Array, picked: jax.Array,
             logits_m: jax.Array | None = None, alpha: jax.Array | float = 0.0
             ) -> tuple[jax.Array, jax.Array]:
    """Masked-LM loss on the picked tokens, optionally distilled from momentum logits.

    loss = (1 - alpha) * CE(logits, targets) + alpha * CE(logits, softmax(logits_m)), both
    averaged over picked tokens (official `BertForMaskedLM` with `soft_labels`).

    Args:
      logits: float32[B, L, V] predictions on the corrupted text.
      targets: int32[B, L] original ids.
      picked: bool[B, L] positions that count.
      logits_m: optional float32[B, L, V] momentum-model logits (no gradient).
      alpha: distillation weight.
    Returns:
      (float32[] loss, float32[] accuracy over picked tokens).
    """
    loss = _weighted_mean(_hard_ce(logits, targets), picked)
    if logits_m is not None:
        soft = jax.nn.softmax(jax.lax.stop_gradient(logits_m).astype(jnp.float32), -1)
        loss = (1 - alpha) * loss + alpha * _weighted_mean(_soft_ce(logits, soft), picked)
    acc = _weighted_mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32), picked)
    return loss, acc


def split_prefix(rng: jax.Array, ids: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Split each caption at a random point into an encoder prefix and a decoder target.

    With n valid tokens ([CLS] w1 .. w_{n-1}, an optional trailing [SEP] included), the split
    point s is uniform in [1, n - 1] (1 when n <= 2): the prefix is ids[:s] (always starting
    with [CLS]); the decoder sequence is [CLS] ids[s:n] [SEP] (no second [SEP] if the caption
    already ends with one), right-padded and truncated to L. s = 1 is plain captioning.

    Args:
      rng: PRNG key.
      ids: int32[B, L] caption ids starting with [CLS], right-padded with 0.
      mask: int32[B, L] attention mask.
    Returns:
      (int32[B, L] prefix ids, int32[B, L] prefix mask, int32[B, L] decoder ids,
       int32[B, L] decoder mask).
    """
    b, length = ids.shape
    n = jnp.sum(mask > 0, -1).astype(jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(n - 1, 0)[:, None], 1)[:, 0]
    n_words = jnp.where((last == SEP_ID) & (n > 1), n - 1, n)  # tokens before any [SEP]
    hi = jnp.maximum(n_words - 1, 1)  # inclusive upper bound of s
    s = 1 + jnp.floor(jax.random.uniform(rng, (b,)) * hi).astype(jnp.int32)
    s = jnp.minimum(s, hi)
    pos = jnp.arange(length)[None]
    prefix_mask = (pos < s[:, None]) & (mask > 0)
    prefix_ids = jnp.where(prefix_mask, ids, PAD_ID)
    # Decoder position j >= 1 holds ids[s + j - 1] for j <= n_words - s, then [SEP].
    n_tgt = jnp.maximum(n_words - s, 0)[:, None]
    src = jnp.clip(s[:, None] + pos - 1, 0, length - 1)
    gathered = jnp.take_along_axis(ids, src, 1)
    dec_ids = jnp.where(pos == 0, CLS_ID,
                        jnp.where(pos <= n_tgt, gathered,
                                  jnp.where(pos == n_tgt + 1, SEP_ID, PAD_ID)))
    dec_mask = pos <= n_tgt + 1
    return (prefix_ids.astype(ids.dtype), prefix_mask.astype(mask.dtype),
            dec_ids.astype(ids.dtype), dec_mask.astype(mask.dtype))
