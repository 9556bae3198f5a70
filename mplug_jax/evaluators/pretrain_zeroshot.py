"""Held-out zero-shot evaluation of a pretrained model (the README main job's report).

On `num_examples` records of the held-out split (official test transform, no augmentation):
- retrieval: unit ITC features, similarity = image @ text^T; i2t / t2i R@1 (chance 1/N);
- ITM accuracy on N matched pairs + N mismatched pairs (image i, caption i+1): chance 0.5;
- MLM accuracy on 15% masked caption tokens (fixed seed); baseline = always predicting the
  most frequent masked token;
- greedy captions from [CLS] to [SEP] for the first `num_captions` images, next to references.

Multi-device / multi-process: every process reads the whole (small) held-out set; each eval
batch is split over the mesh's batch axes (each process contributes its rows) and every output
is replicated, so all processes compute the same metrics and no host gathers anything.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax import losses
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.data.ops.tokenizer import get_tokenizer
from mplug_jax.sharding import make_mesh, replicated

PREDICT_FNS = ("embed", "itm_logits", "mlm_logits", "greedy_decode")


class Evaluator:
    """Evaluator `pretrain_zeroshot`.

    Args:
      predict_fns: {'embed', 'itm_logits', 'mlm_logits', 'greedy_decode'} of the task (see
        `mplug_jax.tasks.pretrain`).
      ecfg: eval block (num_examples, batch_size, num_captions, max_decode_len).
      config: run config (input, model.image_size / vocab_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg = ecfg
        if ecfg.num_examples % ecfg.batch_size:
            raise ValueError(f"eval num_examples {ecfg.num_examples} must be a multiple of "
                             f"batch_size {ecfg.batch_size}")
        self.source = pretrain_input.source(config.input, "heldout", ecfg.num_examples,
                                            config.model.image_size, config.seed)
        # Full batches only (a skipped record shortens the last one, which is left out).
        self.batches = [b for b in pretrain_input.eval_batches(config, self.source,
                                                               ecfg.batch_size)
                        if len(b["idx"]) == ecfg.batch_size]
        self.vocab_size = config.model.vocab_size
        if mesh is None:
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
        self.mesh = mesh
        self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if ecfg.batch_size % self.shards:
            raise ValueError(f"eval batch_size {ecfg.batch_size} must be a multiple of the "
                             f"{self.shards} batch shards of mesh {dict(mesh.shape)}")
        out = replicated(mesh)
        fns = predict_fns
        self._embed = jax.jit(fns["embed"], out_shardings=out)
        self._itm = jax.jit(fns["itm_logits"], out_shardings=out)
        self._mlm = jax.jit(lambda p, im, i, m: jnp.argmax(fns["mlm_logits"](p, im, i, m), -1),
                            out_shardings=out)
        self._decode = jax.jit(fns["greedy_decode"], static_argnums=2, out_shardings=out)

    def _put(self, *arrays: np.ndarray):
        """Whole-batch numpy arrays (the same on every process) -> global arrays split over the
        batch axes: this process passes only the rows of its devices."""
        n, pid = jax.process_count(), jax.process_index()
        local = [np.asarray(a)[pid * len(a) // n:(pid + 1) * len(a) // n] for a in arrays]
        return make_global_batch(local, self.mesh)

    def run(self, params) -> dict:
        """Metrics (floats) plus 'captions': [(generated, reference)]."""
        img_f, txt_f, itm_hits, mlm_hits, mlm_n, mlm_targets = [], [], 0, 0, 0, []
        key = jax.random.PRNGKey(1234)
        for i, b in enumerate(self.batches):
            ids, mask = b["text_ids"], b["text_mask"]
            im, ids_g, mask_g = self._put(b["image"], ids, mask)
            fi, ft = self._embed(params, im, ids_g, mask_g)
            img_f.append(np.asarray(fi))
            txt_f.append(np.asarray(ft))
            pos = np.asarray(self._itm(params, im, ids_g, mask_g)).argmax(-1)
            neg = np.asarray(self._itm(params, im, *self._put(np.roll(ids, 1, 0),
                                                              np.roll(mask, 1, 0)))).argmax(-1)
            itm_hits += int((pos == 1).sum() + (neg == 0).sum())
            masked, picked = losses.mask_tokens(jax.random.fold_in(key, i), jnp.asarray(ids),
                                                jnp.asarray(mask), self.vocab_size)
            masked, picked = np.asarray(masked), np.asarray(picked)
            pred = np.asarray(self._mlm(params, im, *self._put(masked, mask)))
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
            b0 = self.batches[0]
            rows = min(-(-k // self.shards) * self.shards, len(b0["image"]))
            image, = self._put(b0["image"][:rows])
            gen = np.asarray(self._decode(params, image, int(self.cfg.max_decode_len)))[:k]
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
