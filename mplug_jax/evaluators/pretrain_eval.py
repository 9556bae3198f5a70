"""Held-out zero-shot evaluation of a pretrained model (the README main job's report).

On `num_examples` records of the held-out split (official test transform, no augmentation):
- retrieval: unit ITC features, similarity = image @ text^T; i2t / t2i R@1 (chance 1/N);
- ITM accuracy on N matched pairs + N mismatched pairs (image i, caption i+1): chance 0.5;
- MLM accuracy on 15% masked caption tokens (fixed seed); baseline = always predicting the
  most frequent masked token;
- greedy captions from [CLS] to [SEP] for the first `num_captions` images, next to references.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import losses


class PretrainZeroShot:
    """Evaluator `pretrain_zeroshot`.

    Args:
      task: a `PretrainTask` (predict fns `embed`, `itm_logits`, `mlm_logits`, `greedy_decode`).
      ecfg: eval block (num_examples, batch_size, num_captions, max_decode_len).
      config: run config (input.max_words / max_tokens, model.image_size, seed).
    """

    def __init__(self, task, ecfg, config):
        from mplug_jax.data.pipeline import pretrain_dataset
        from mplug_jax.trainer import make_source
        self.task, self.cfg = task, ecfg
        if ecfg.num_examples % ecfg.batch_size:
            raise ValueError(f"eval num_examples {ecfg.num_examples} must be a multiple of "
                             f"batch_size {ecfg.batch_size}")
        self.source = make_source(config.input, "heldout", ecfg.num_examples,
                                  config.model.image_size, config.seed)
        ds = pretrain_dataset(self.source, image_size=config.model.image_size,
                              batch_size=ecfg.batch_size, max_words=config.input.max_words,
                              max_tokens=config.input.max_tokens, train=False, augment=None,
                              num_epochs=1)
        self.batches = list(ds)
        self.vocab_size = task.model.vocab_size
        self._embed = jax.jit(task.embed)
        self._itm = jax.jit(task.itm_logits)
        self._mlm = jax.jit(lambda p, im, i, m: jnp.argmax(task.mlm_logits(p, im, i, m), -1))
        self._decode = jax.jit(task.greedy_decode, static_argnums=2)

    def run(self, params) -> dict:
        """Metrics (floats) plus 'captions': [(generated, reference)]."""
        img_f, txt_f, itm_hits, mlm_hits, mlm_n, mlm_targets = [], [], 0, 0, 0, []
        key = jax.random.PRNGKey(1234)
        for i, b in enumerate(self.batches):
            im, ids, mask = b["image"], b["text_ids"], b["text_mask"]
            fi, ft = self._embed(params, im, ids, mask)
            img_f.append(np.asarray(fi))
            txt_f.append(np.asarray(ft))
            pos = np.asarray(self._itm(params, im, ids, mask)).argmax(-1)
            neg = np.asarray(self._itm(params, im, np.roll(ids, 1, 0),
                                       np.roll(mask, 1, 0))).argmax(-1)
            itm_hits += int((pos == 1).sum() + (neg == 0).sum())
            masked, picked = losses.mask_tokens(jax.random.fold_in(key, i), jnp.asarray(ids),
                                                jnp.asarray(mask), self.vocab_size)
            pred = np.asarray(self._mlm(params, im, masked, mask))
            picked = np.asarray(picked)
            mlm_hits += int((pred == ids)[picked].sum())
            mlm_n += int(picked.sum())
            mlm_targets.append(ids[picked])
        img, txt = np.concatenate(img_f), np.concatenate(txt_f)
        n = len(img)
        sim = img @ txt.T
        targets = np.concatenate(mlm_targets)
        majority = np.bincount(targets).max() / max(len(targets), 1) if len(targets) else 0.0
        out = {
            "i2t_r1": float(np.mean(sim.argmax(1) == np.arange(n))),
            "t2i_r1": float(np.mean(sim.argmax(0) == np.arange(n))),
            "retrieval_chance": 1.0 / n,
            "itm_acc": itm_hits / (2 * n), "itm_chance": 0.5,
            "mlm_acc": mlm_hits / max(mlm_n, 1), "mlm_majority_baseline": float(majority),
        }
        k = int(self.cfg.num_captions)
        if k:
            from mplug_jax.data.tokenizer import get_tokenizer
            b0 = self.batches[0]
            gen = np.asarray(self._decode(params, b0["image"][:k], int(self.cfg.max_decode_len)))
            refs = [self.source[int(j)]["caption"] for j in b0["idx"][:k]]
            out["captions"] = [(_decode_text(get_tokenizer(), g), r) for g, r in zip(gen, refs)]
        return out

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        lines = [
            f"zero-shot i2t R@1 {100 * res['i2t_r1']:.1f}%  t2i R@1 {100 * res['t2i_r1']:.1f}%  "
            f"(chance {100 * res['retrieval_chance']:.1f}%)",
            f"ITM accuracy {100 * res['itm_acc']:.1f}% (chance 50.0%)",
            f"MLM accuracy {100 * res['mlm_acc']:.1f}% (majority-token baseline "
            f"{100 * res['mlm_majority_baseline']:.1f}%)",
        ]
        for gen, ref in res.get("captions", []):
            lines.append(f"  generated: {gen!r:60}  reference: {ref!r}")
        return "\n".join(lines)


def _decode_text(tok, ids: np.ndarray) -> str:
    """Ids after [CLS] up to [SEP] -> text (official: decode, drop special tokens, strip)."""
    ids = [int(t) for t in ids[1:]]
    if losses.SEP_ID in ids:
        ids = ids[:ids.index(losses.SEP_ID)]
    return tok.decode([t for t in ids if t != losses.PAD_ID]).strip()
