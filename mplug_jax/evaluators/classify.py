"""Classification evaluation (type 'classify'), shared by SNLI-VE and NLVR2: accuracy overall
and per class, and a result file.

Contract with a task `T` (= `config.task.name`):
- module `mplug_jax.data.inputs.T` defines `LABELS` (class names, index = class id),
  `eval_records(config, ecfg) -> list[dict]` (the evaluated records) and
  `eval_batches(config, records, batch_size, process_index, process_count)` (the one eval
  signature of every task input) yielding numpy batches of this process's rows: every model
  input plus `label` int32[b], `valid` int32[b] (0 = a padding row of the last batch) and
  `idx` int32[b] (the record's id in the result file), the same number of batches on every
  process, b = ecfg.batch_size / process_count;
- the task's `predict_fns()['classify'](params, batch) -> float32[B, C]` logits (C =
  len(LABELS)), jitted here with replicated outputs; `batch` is the global batch with every
  key `eval_batches` yields (label / valid / idx included: ignore them);
- records of `eval_records` may carry 'idx' (else their position is their id) and
  'sentence' (shown in the report's examples).
Each batch is assembled into global arrays split over the mesh's batch axes; predictions are
argmax of the logits. Metrics (`scoring.classify.accuracy`): 'acc', 'n', 'acc_<class>',
'n_<class>', 'pred_<class>'; result file `T_result.json` = [{"id", "pred", "label"}] under
`FILES`, which `mplug-jax score --task T` re-scores against the annotation file.

ecfg: type, every_steps, batch_size, log_every_batches (progress lines with ETA, 0 = none),
num_examples_shown, plus what the input module reads (split, num_examples, ...).
"""
from __future__ import annotations

import importlib
import time

import jax
import numpy as np

from mplug_jax import metrics
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import classify as scoring
from mplug_jax.sharding import make_mesh, replicated

PREDICT_FNS = ("classify",)
_META = ("label", "valid", "idx")


def input_module(task: str):
    """`mplug_jax.data.inputs.<task>`, checked for the contract's names."""
    try:
        module = importlib.import_module(f"mplug_jax.data.inputs.{task}")
    except ModuleNotFoundError as e:
        raise ValueError(f"evaluator 'classify' needs module mplug_jax.data.inputs.{task} for "
                         f"task {task!r}: {e}") from e
    missing = [n for n in ("LABELS", "eval_records", "eval_batches") if not hasattr(module, n)]
    if missing:
        raise ValueError(f"mplug_jax.data.inputs.{task} lacks {missing} (evaluator 'classify')")
    return module


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class Evaluator:
    """Evaluator `classify` (see module docstring).

    Args:
      predict_fns: {'classify'} of the task.
      ecfg: eval block.
      config: run config.
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg, self.config = ecfg, config
        self.task = str(config.task.name)
        self.input = input_module(self.task)
        self.labels = [str(x) for x in self.input.LABELS]
        self.records = self.input.eval_records(config, ecfg)
        if mesh is None:
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
        self.mesh = mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = int(ecfg["batch_size"])
        if self.batch_size <= 0 or self.batch_size % shards or \
                self.batch_size % jax.process_count():
            raise ValueError(f"evals.<classify>.batch_size {self.batch_size} must be a positive "
                             f"multiple of the {shards} batch shards of mesh {dict(mesh.shape)} "
                             f"and of the {jax.process_count()} processes")
        out = replicated(mesh)
        self._predict = jax.jit(predict_fns["classify"], out_shardings=out)
        self._gather = jax.jit(lambda x: x, out_shardings=out)

    def predictions(self, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx, predicted class, gold class), int64[N] each, over every evaluated record."""
        total = -(-len(self.records) // self.batch_size)
        every = int(self.cfg.get("log_every_batches", 0) or 0)
        idx, pred, gold = [], [], []
        t0 = time.perf_counter()
        batches = self.input.eval_batches(self.config, self.records, self.batch_size,
                                          jax.process_index(), jax.process_count())
        for i, b in enumerate(batches):
            g = make_global_batch(b, self.mesh)
            logits = np.asarray(self._predict(params, g))
            if logits.ndim != 2 or logits.shape != (self.batch_size, len(self.labels)):
                raise ValueError(f"predict fn 'classify' of task {self.task!r} returned shape "
                                 f"{logits.shape}, expected ({self.batch_size}, "
                                 f"{len(self.labels)}) for classes {self.labels}")
            meta = {k: np.asarray(v) for k, v in self._gather({k: g[k] for k in _META}).items()}
            keep = meta["valid"] > 0
            idx.append(meta["idx"][keep])
            pred.append(np.argmax(logits, -1)[keep])
            gold.append(meta["label"][keep])
            if every and (i + 1) % every == 0 and jax.process_index() == 0:
                dt = time.perf_counter() - t0
                row = {"samples_per_s": (i + 1) * self.batch_size / dt,
                       "step_time_s": dt / (i + 1),
                       "eta_min": dt / (i + 1) * max(total - i - 1, 0) / 60}
                print(f"{self.task} eval " + metrics.progress_line(i + 1, total, row),
                      flush=True)
        return _cat(idx), _cat(pred), _cat(gold)

    def run(self, params) -> dict:
        """Metrics (numbers), a few 'examples' and the result file under `FILES`."""
        idx, pred, gold = self.predictions(params)
        if len(idx) != len(self.records) or len(set(idx.tolist())) != len(idx):
            raise ValueError(f"{self.task} eval batches gave {len(idx)} rows ({len(set(idx))} "
                             f"distinct ids) for {len(self.records)} records")
        out: dict = scoring.accuracy(pred, gold, self.labels)
        by_id = {i: (p, y) for i, p, y in zip(idx.tolist(), pred.tolist(), gold.tolist())}
        shown = []
        for pos, r in enumerate(self.records[:int(self.cfg.get("num_examples_shown", 0) or 0)]):
            p, y = by_id.get(int(r.get("idx", pos)), (None, None))
            if p is not None:
                shown.append((r.get("sentence", ""), self.labels[p], self.labels[y]))
        out["examples"] = shown
        out[FILES] = {f"{self.task}_result.json": scoring.result_rows(idx, pred, gold,
                                                                       self.labels)}
        return out

    def report(self, res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        per = ", ".join(f"{c} {100 * res[f'acc_{c}']:.2f}% of {res[f'n_{c}']}"
                        for c in self.labels if f"acc_{c}" in res)
        lines = [f"{res['n']} examples: accuracy {100 * res['acc']:.2f}% ({per})"]
        for sentence, p, y in res.get("examples", []):
            lines.append(f"  {sentence!r:50} -> {p:13} gold: {y}")
        return "\n".join(lines)
