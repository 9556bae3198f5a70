"""Caption evaluation as the official `caption_mplug.py evaluation()`
(docs/official-formats.md#caption-evaluation).

Beam search on the eval images (task.generation: beam 5, min 8, max 25 by default), top
hypothesis decoded with the official post-processing (a training `task.prompt` stripped from
the front), metrics BLEU-1..4 / METEOR / ROUGE-L / CIDEr through `scoring.caption.evaluate`
(PTB tokenizer; SPICE not computed), result files (`evaluators.common.FILES`, written by the
trainer under `<workdir>/results/<eval>_step<N>/` or by `mplug-jax evaluate`):
`caption_results.json` (official form: question_id = file name, pred_caption, gold_caption)
and `caption_results_coco.json` (COCO-server form, when the file names carry numeric ids).
Progress with an ETA is printed every `log_every` batches. Also reported: the CIDEr of the same captions
scored against the references of another image (a shuffled-caption baseline).

Eval block keys: type='caption', every_steps, batch_size, num_images (0 = all), metrics
(subset of scoring.caption.METRICS), tokenize ('ptb' | 'simple'), num_examples (captions shown
in the report), log_every, write_results.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from mplug_jax.data import eval_loader
from mplug_jax.data.inputs import caption as caption_input
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import caption as scoring
from mplug_jax.scoring.caption import decode_text
from mplug_jax.sharding import make_mesh, replicated

PREDICT_FNS = ("caption_beam",)


class Evaluator:
    """Evaluator `caption`.

    Args:
      predict_fns: {'caption_beam'} of `mplug_jax.tasks.caption.Task`.
      ecfg: eval block (see module docstring).
      config: run config (input, model.image_size, task.prompt, seed, workdir when known).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg = ecfg
        if mesh is None:
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
        self.mesh = mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if ecfg.batch_size % shards:
            raise ValueError(f"eval batch_size {ecfg.batch_size} must be a multiple of the "
                             f"{shards} batch shards of mesh {dict(mesh.shape)}")
        self.split = caption_input.load_split(config.input, "eval", config.model.image_size,
                                              config.seed)
        recs = self.split.eval_records
        recs = eval_loader.Head(recs, int(ecfg.get("num_images", 0) or 0) or len(recs))
        self.n = len(recs)
        self.batches = list(caption_input.eval_batches(config, recs, int(ecfg.batch_size)))
        self.prompt = str(config.task.get("prompt", "") or "")
        self.metrics = tuple(ecfg.get("metrics", scoring.METRICS))
        self.tokenize = str(ecfg.get("tokenize", "ptb"))
        self._gen = jax.jit(predict_fns["caption_beam"], out_shardings=replicated(mesh))

    def _put(self, image: np.ndarray):
        n, pid = jax.process_count(), jax.process_index()
        return make_global_batch(image[pid * len(image) // n:(pid + 1) * len(image) // n],
                                 self.mesh)

    def generate(self, params) -> list[str]:
        """Captions of the first `n` eval images (official generation + post-processing)."""
        out, t0, every = [], time.perf_counter(), int(self.cfg.get("log_every", 0) or 0)
        for i, b in enumerate(self.batches):
            ids = np.asarray(jax.device_get(self._gen(params, self._put(b["image"]))["ids"]))
            out += [decode_text(row, self.prompt) for row in ids]
            if every and (i + 1) % every == 0 and jax.process_index() == 0:
                done = (i + 1) / len(self.batches)
                spent = time.perf_counter() - t0
                print(f"  caption eval {i + 1}/{len(self.batches)} batches, "
                      f"ETA {spent / done - spent:.0f}s", flush=True)
        return out[:self.n]

    def run(self, params) -> dict:
        """Metrics (floats), 'captions' [(image id, generated, references)] for the report,
        and the result files under `FILES`."""
        preds = self.generate(params)
        refs = self.split.references[:self.n]
        ids = self.split.image_ids[:self.n]
        res: dict = dict(scoring.evaluate(preds, refs, self.metrics, self.tokenize))
        # Baseline for the numbers above: every caption scored against another image's refs.
        shuffled = scoring.evaluate(preds, refs[1:] + refs[:1], ("CIDEr",), self.tokenize) \
            if self.n > 1 and "CIDEr" in self.metrics else {}
        if shuffled:
            res["CIDEr_shuffled_baseline"] = shuffled["CIDEr"]
        res["num_images"] = self.n
        k = int(self.cfg.get("num_examples", 5))
        res["captions"] = list(zip(ids[:k], preds[:k], refs[:k]))
        if self.cfg.get("write_results", True):
            res[FILES] = {"caption_results.json": scoring.result_rows(ids, preds, refs)}
            try:
                res[FILES]["caption_results_coco.json"] = scoring.result_rows(ids, preds,
                                                                              form="coco")
            except ValueError:  # file names without numeric ids: no COCO-server form
                pass
        return res

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        names = [m for m in scoring.METRICS if m in res]
        line = "  ".join(f"{m} {100 * res[m]:.1f}" for m in names)
        if "CIDEr_shuffled_baseline" in res:
            line += f"  (CIDEr of shuffled captions {100 * res['CIDEr_shuffled_baseline']:.1f})"
        lines = [f"captions of {res['num_images']} images: {line}"]
        for image_id, gen, refs in res.get("captions", []):
            lines.append(f"  {image_id}: {gen!r:50}  reference: {refs[0]!r}")
        return "\n".join(lines)
