"""VQA evaluation as the official `vqa_mplug.py`: open-ended generation, VQA accuracy, result file.

Per question: the fused states of (image, question) as in training
(docs/fixtures.md#generation-settings), the official beam search (`generate.beam_search`, beam 5 /
min 1 / max 10 by default, jitted), the best hypothesis decoded with the official post-processing
(docs/fixtures.md#post-processing). With `ecfg.rank_answers` the answer is instead chosen from a
candidate list ALBEF-style (top `rank_k` candidates by first-token probability, re-scored by their
full log-likelihood; see `tasks.vqa.Task.rank`): `ecfg.answer_list` (official answer_list.json) or,
for the synthetic data, every answer it can produce.

Metrics (`mplug_jax.scoring.vqa`, official normalisation): 'acc' and 'acc_<answer type>' when
the questions have answers (synthetic held-out split; official val json with 'answer' lists; or
`input.eval_labels`), plus the result file `vqa_result.json` = [{"question_id", "answer"}]
(what the VQA test server takes), written by the trainer under `<workdir>/results/`.

Multi-device / multi-process: every process reads the same eval questions; each batch is split
over the mesh's batch axes and the outputs are replicated (as `pretrain_zeroshot`).
"""
from __future__ import annotations

import functools
import json
import time

import jax
import numpy as np

from mplug_jax import metrics
from mplug_jax.data import eval_loader
from mplug_jax.data.formats.base import read_annotations
from mplug_jax.data.synthetic import shapes as synthetic
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.inputs import vqa as vqa_input
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import vqa as vqa_scoring
from mplug_jax.sharding import make_mesh, replicated

PREDICT_FNS = ("vqa_generate", "vqa_rank")
RESULT_FILE = "vqa_result.json"


class Evaluator:
    """Evaluator `vqa`.

    Args:
      predict_fns: {'vqa_generate', 'vqa_rank'} of the VQA task.
      ecfg: eval block (num_examples, batch_size, beam_size, min_length, max_length,
        rank_answers, rank_k, answer_list, log_every_batches, num_examples_shown).
      config: run config (input, model.image_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg, self.config = ecfg, config
        inp = config.input
        self.image_size = config.model.image_size
        n = int(ecfg.get("num_examples", 0) or 0)
        if inp.dataset == "synthetic" and n <= 0:
            raise ValueError("evals.<vqa>.num_examples must be > 0 for the synthetic data")
        src = vqa_input.source(inp, "heldout", n, self.image_size, config.seed)
        self.source = eval_loader.Head(src, n) if n > 0 else src
        if len(self.source) == 0:
            raise ValueError("the VQA eval set is empty")
        self.input_cfg = inp
        self.qids = [self.source[i]["question_id"] for i in range(len(self.source))]
        self.annotations = self._annotations(inp)
        if mesh is None:
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
        self.mesh = mesh
        self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = int(ecfg.batch_size)
        if self.batch_size % self.shards:
            raise ValueError(f"eval batch_size {self.batch_size} must be a multiple of the "
                             f"{self.shards} batch shards of mesh {dict(mesh.shape)}")
        out = replicated(mesh)
        self.rank = bool(ecfg.get("rank_answers", False))
        if self.rank:
            self.candidates = self._candidates(inp, ecfg)
            ids, mask = tokenizer.get_tokenizer().encode(
                [a + tokenizer.EOS for a in self.candidates])
            self._cand = (ids, mask)
            k = min(int(ecfg.rank_k), len(self.candidates))
            self._predict = jax.jit(functools.partial(predict_fns["vqa_rank"], k=k),
                                    out_shardings=out)
        else:
            if not 1 <= int(ecfg.min_length) <= int(ecfg.max_length):
                raise ValueError(f"need 1 <= min_length <= max_length, got {ecfg.min_length} "
                                 f"/ {ecfg.max_length}")
            self._predict = jax.jit(functools.partial(
                predict_fns["vqa_generate"], beam_size=int(ecfg.beam_size),
                min_length=int(ecfg.min_length), max_length=int(ecfg.max_length)),
                out_shardings=out)

    def _annotations(self, inp) -> dict | None:
        """{question_id: annotation} for scoring, or None (e.g. the test split)."""
        if inp.dataset == "synthetic":
            return vqa_scoring.annotations_from_records(
                [{k: r[k] for k in ("question_id", "answer", "answer_type")}
                 for r in (self.source[i] for i in range(len(self.source)))])
        if inp.get("eval_labels"):
            return vqa_scoring.load_annotations(inp.eval_labels)
        raw = [r for f in inp.eval_annotations for r in read_annotations(f)]
        with_answers = [r for r in raw if isinstance(r, dict) and "question_id" in r
                        and isinstance(r.get("answer"), list) and r["answer"]]
        return vqa_scoring.annotations_from_records(with_answers) if with_answers else None

    @staticmethod
    def _candidates(inp, ecfg) -> list[str]:
        if ecfg.get("answer_list"):
            with open(ecfg.answer_list, encoding="utf-8") as f:
                cands = json.load(f)
            if not isinstance(cands, list) or not all(isinstance(a, str) for a in cands):
                raise ValueError(f"{ecfg.answer_list}: expected a JSON array of answer strings")
        elif inp.dataset == "synthetic":
            cands = synthetic.vqa_answer_vocabulary()
        else:
            raise ValueError("evals.<vqa>.rank_answers needs evals.<vqa>.answer_list (the "
                             "official answer_list.json)")
        if not cands:
            raise ValueError("the candidate answer list is empty")
        return list(cands)

    def _put(self, *arrays: np.ndarray):
        """Whole-batch numpy arrays -> global arrays split over the batch axes."""
        n, pid = jax.process_count(), jax.process_index()
        local = [np.asarray(a)[pid * len(a) // n:(pid + 1) * len(a) // n] for a in arrays]
        return make_global_batch(local, self.mesh)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """Pad a (last, short) batch to batch_size rows by repeating its last row."""
        short = self.batch_size - len(x)
        return x if short == 0 else np.concatenate([x, np.repeat(x[-1:], short, 0)])

    def answers(self, params) -> dict:
        """{question_id: answer} for every eval question (progress lines on long runs)."""
        out = {}
        ds = vqa_input.eval_batches(self.config, self.source, self.batch_size)
        total = -(-len(self.source) // self.batch_size)
        every = int(self.cfg.get("log_every_batches", 0) or 0)
        t0 = time.perf_counter()
        for i, b in enumerate(ds):
            rows = len(b["idx"])
            arrays = [self._pad(b[k]) for k in ("image", "question_ids", "question_mask")]
            if self.rank:
                res = self._predict(params, *self._put(*arrays), *self._cand)
                texts = [self.candidates[int(j)] for j in np.asarray(res["best"])[:rows]]
            else:
                res = self._predict(params, *self._put(*arrays))
                tok = tokenizer.get_tokenizer()
                texts = [tok.decode_official(ids) for ids in np.asarray(res["ids"])[:rows, 0]]
            for j, text in zip(b["idx"], texts):
                out[self.qids[int(j)]] = text
            if every and (i + 1) % every == 0 and jax.process_index() == 0:
                dt = time.perf_counter() - t0
                row = {"samples_per_s": (i + 1) * self.batch_size / dt,
                       "step_time_s": dt / (i + 1), "eta_min": dt / (i + 1) * (total - i - 1) / 60}
                print("vqa eval " + metrics.progress_line(i + 1, total, row), flush=True)
        return out

    def run(self, params) -> dict:
        """Metrics (floats), a few 'examples' (question, answer, human answers) and the result
        file under `FILES`."""
        answers = self.answers(params)
        out: dict = {"num_questions": len(answers)}
        if self.annotations is not None:
            scored = {q: a for q, a in answers.items() if q in self.annotations}
            res = vqa_scoring.evaluate(scored, self.annotations)
            res.pop("per_question")
            res.pop("unanswered")
            out.update(res)
        shown = []
        for i in range(min(int(self.cfg.get("num_examples_shown", 0) or 0), len(self.source))):
            r = self.source[i]
            ann = (self.annotations or {}).get(r["question_id"], {})
            shown.append((r["question"], answers.get(r["question_id"], ""),
                          ann.get("answers", ann.get("label"))))
        out["examples"] = shown
        out[FILES] = {RESULT_FILE: [{"question_id": q, "answer": a} for q, a in answers.items()]}
        return out

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        lines = [f"{res['num_questions']} questions"]
        if "acc" in res:
            types = ", ".join(f"{k[4:]} {100 * v:.2f}%" for k, v in sorted(res.items())
                              if k.startswith("acc_"))
            lines[0] += f": VQA accuracy {100 * res['acc']:.2f}%" + (f" ({types})" if types
                                                                    else "")
        for q, a, gt in res.get("examples", []):
            lines.append(f"  {q!r:45} -> {a!r:14} humans: {gt}")
        return "\n".join(lines)
