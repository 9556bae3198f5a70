"""Image-text retrieval evaluation as the official `retrieval_img_mplug.py evaluation()` +
`itm_eval()` (docs/fixtures.md#retrieval-evaluation; docs/official-formats.md#retrieval-evaluation).

1. Embeddings of every image and text (`image_embed` / `text_embed` predict fns; texts
   `[CLS] caption` padded and truncated to `input.max_tokens`, official 30), in batches split
   over the mesh's batch axes; the image and text states stay on the devices, split over the
   batch axes.
2. Candidates: cosine similarities image x text computed in chunks of `sim_chunk` query rows
   (the chunk split over the batch axes, the other side's unit features replicated), the top
   `k_test` of each row kept (`topk_candidates_sharded`): never the whole similarity matrix on
   a device. i2t: top texts of each image; t2i: top images of each text.
3. ITM re-ranking of the k x (images + texts) candidate pairs (`itm_score`), jitted on a fixed
   batch of `itm_batch_size` pairs (the last one padded), the state rows gathered on device;
   score = raw ITM "match" logit (official; with `add_similarity`, as the official video
   retrieval, + the cosine similarity); other pairs -100.
4. Ranks and R@1/5/10 (`scoring.retrieval`, several captions per image: the best one counts).

k_test is capped at the number of items of each direction (official topk would raise). The
result file `retrieval_result.json` (format in `scoring.retrieval`) holds each query's top-10
ranked items, keyed by image path / "image#caption number"; `mplug-jax score --task retrieval
--results R --annotations EVAL_JSON` re-scores it to the same recalls.

Multi-process: every process reads the whole eval set and passes its rows of each batch;
outputs the host needs (unit features, scores) are replicated, so all processes compute the
same metrics.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mplug_jax.data.inputs import retrieval as retrieval_input
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import retrieval as R
from mplug_jax.sharding import make_mesh, replicated

PREDICT_FNS = ("image_embed", "text_embed", "itm_score")
RESULT_FILE = "retrieval_result.json"
BATCH_AXES = ("data", "fsdp")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def _shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))


def put_rows(mesh, *arrays: np.ndarray):
    """Whole-batch numpy arrays (the same on every process) -> global arrays split over the
    batch axes (each process passes the rows of its devices)."""
    n, pid = jax.process_count(), jax.process_index()
    local = [np.asarray(a)[pid * len(a) // n:(pid + 1) * len(a) // n] for a in arrays]
    return make_global_batch(local, mesh)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """x with its last row repeated up to n rows."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)]) if len(x) < n else x


@functools.lru_cache(maxsize=16)
def _topk_fn(k: int, mesh):
    """Jitted (queries [C, E], items [M, E]) -> top-k of queries @ items^T, replicated."""
    return jax.jit(lambda a, b: jax.lax.top_k(a @ b.T, k), out_shardings=replicated(mesh))


def topk_candidates_sharded(queries: np.ndarray, items: np.ndarray, k: int, chunk: int,
                            mesh) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items of every query by cosine similarity, chunk by chunk.

    Args:
      queries: float32[Q, E] unit features; items: float32[M, E] unit features.
      k: 1 <= k <= M. chunk: query rows per jitted call (a multiple of the mesh's batch
        shards); each call sees float32[chunk, M] similarities split over the batch axes.
      mesh: the evaluation mesh.
    Returns:
      (float32[Q, k] similarities descending, int64[Q, k] item indices), as
      `scoring.retrieval.topk_candidates` on the full matrix.
    """
    q, m = len(queries), len(items)
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be in [1, {m}] (number of items)")
    if chunk % _shards(mesh):
        raise ValueError(f"sim_chunk {chunk} must be a multiple of the {_shards(mesh)} batch "
                         f"shards of mesh {dict(mesh.shape)}")
    fn = _topk_fn(k, mesh)
    items_r = jax.device_put(np.asarray(items, np.float32), replicated(mesh))
    vals, idx = [], []
    for s in range(0, q, chunk):
        rows = np.asarray(queries[s:s + chunk], np.float32)
        n = len(rows)
        v, i = fn(put_rows(mesh, _pad_rows(rows, chunk))[0], items_r)
        vals.append(np.asarray(v)[:n])
        idx.append(np.asarray(i)[:n])
    return np.concatenate(vals), np.concatenate(idx).astype(np.int64)


class _Stacked:
    """Per-batch device arrays [B, ...] split over the batch axes, stacked to [nb, B, ...]
    (split on dim 1: no data moves); row r = (r // B, r % B)."""

    def __init__(self, parts: list, mesh):
        spec = PartitionSpec(None, _batch_axes(mesh) or None)
        self.batch = parts[0].shape[0]
        self.array = jax.jit(lambda *xs: jnp.stack(xs),
                             out_shardings=NamedSharding(mesh, spec))(*parts)


class Evaluator:
    """Evaluator `retrieval`.

    Args:
      predict_fns: {'image_embed', 'text_embed', 'itm_score'} (retrieval or pretrain task).
      ecfg: eval block: k_test, batch_size (images / texts per embedding call), sim_chunk,
        itm_batch_size, add_similarity, annotations (json files; empty = input's eval split),
        split ('val' | 'test': which built-in synthetic split), log_every_batches, top_n.
      config: run config (input, model.image_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg = ecfg
        inp = config.input
        self.image_size = int(config.model.image_size)
        self.split = retrieval_input.eval_split(
            inp, self.image_size, config.seed, list(ecfg.get("annotations") or []) or None,
            split=ecfg.get("split", "val"))
        self.ids, self.mask = retrieval_input.encode_texts(self.split.texts, int(inp.max_tokens))
        if mesh is None:
            mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
        self.mesh = mesh
        shards = _shards(mesh)
        for key in ("batch_size", "sim_chunk", "itm_batch_size"):
            if int(ecfg[key]) <= 0 or int(ecfg[key]) % shards:
                raise ValueError(f"evals.<retrieval>.{key}={ecfg[key]} must be a positive "
                                 f"multiple of the {shards} batch shards of mesh "
                                 f"{dict(mesh.shape)}")
        if int(ecfg.k_test) < 1:
            raise ValueError(f"evals.<retrieval>.k_test must be >= 1, got {ecfg.k_test}")
        rep = replicated(mesh)
        rows = NamedSharding(mesh, PartitionSpec(_batch_axes(mesh) or None))
        self._image = jax.jit(predict_fns["image_embed"], out_shardings=(rep, rows))
        self._text = jax.jit(predict_fns["text_embed"], out_shardings=(rep, rows))
        itm = predict_fns["itm_score"]

        def pair_scores(params, img_all, txt_all, mask_all, img_rows, txt_rows):
            bi, bt = img_all.shape[1], txt_all.shape[1]
            def take(a, r, b):
                return jax.lax.with_sharding_constraint(a[r // b, r % b], rows)
            return itm(params, take(img_all, img_rows, bi), take(txt_all, txt_rows, bt),
                       take(mask_all, txt_rows, bt))

        self._pairs = jax.jit(pair_scores, out_shardings=rep)

    # ---- stages -----------------------------------------------------------------------------

    def embed(self, params) -> tuple[np.ndarray, np.ndarray, _Stacked, _Stacked, _Stacked]:
        """(float32[NI, E], float32[NT, E] unit features, image states, text states, text
        masks on device)."""
        b = int(self.cfg.batch_size)
        feats_i, states_i, feats_t, states_t, masks = [], [], [], [], []
        paths = self.split.images
        for s in range(0, len(paths), b):
            n = len(paths[s:s + b])
            img = _pad_rows(retrieval_input.load_images(paths[s:s + b], self.image_size), b)
            f, st = self._image(params, *put_rows(self.mesh, img))
            feats_i.append(np.asarray(f)[:n])
            states_i.append(st)
        for s in range(0, len(self.ids), b):
            n = len(self.ids[s:s + b])
            ids, mask = _pad_rows(self.ids[s:s + b], b), _pad_rows(self.mask[s:s + b], b)
            ids_g, mask_g = put_rows(self.mesh, ids, mask)
            f, st = self._text(params, ids_g, mask_g)
            feats_t.append(np.asarray(f)[:n])
            states_t.append(st)
            masks.append(mask_g)
        return (np.concatenate(feats_i).astype(np.float32),
                np.concatenate(feats_t).astype(np.float32), _Stacked(states_i, self.mesh),
                _Stacked(states_t, self.mesh), _Stacked(masks, self.mesh))

    def rerank(self, params, img_s: _Stacked, txt_s: _Stacked, txt_m: _Stacked,
               img_rows: np.ndarray, txt_rows: np.ndarray, what: str = "") -> np.ndarray:
        """float32[P] ITM scores of the pairs (image img_rows[p], text txt_rows[p])."""
        p = int(self.cfg.itm_batch_size)
        n = len(img_rows)
        every = int(self.cfg.get("log_every_batches", 0) or 0)
        n_batches = -(-n // p)
        out, t0 = [], time.perf_counter()
        for j, s in enumerate(range(0, n, p)):
            ir = _pad_rows(np.asarray(img_rows[s:s + p], np.int32), p)
            tr = _pad_rows(np.asarray(txt_rows[s:s + p], np.int32), p)
            out.append(np.asarray(self._pairs(params, img_s.array, txt_s.array, txt_m.array,
                                              *put_rows(self.mesh, ir, tr))))
            if every and (j + 1) % every == 0 and j + 1 < n_batches:
                rate = (time.perf_counter() - t0) / (j + 1)
                _log(f"retrieval {what}: {j + 1}/{n_batches} ITM batches of {p} pairs, "
                     f"{rate:.2f} s/batch, ETA {rate * (n_batches - j - 1):.0f} s")
        return np.concatenate(out)[:n].astype(np.float32) if out else np.zeros(0, np.float32)

    def scores(self, params) -> dict:
        """The two official score matrices and what they came from:
        {'i2t', 't2i': float32 [NI, NT] / [NT, NI], 'k_test': {'i2t', 't2i'}, 'sims'
        (None: never materialised)}."""
        img_f, txt_f, img_s, txt_s, txt_m = self.embed(params)
        ni, nt = len(img_f), len(txt_f)
        chunk = int(self.cfg.sim_chunk)
        add_sim = bool(self.cfg.get("add_similarity", False))
        out = {"k_test": {}}
        for name, queries, items in (("i2t", img_f, txt_f), ("t2i", txt_f, img_f)):
            k = min(int(self.cfg.k_test), len(items))
            out["k_test"][name] = k
            top_sim, top_idx = topk_candidates_sharded(queries, items, k, chunk, self.mesh)
            q_rows = np.repeat(np.arange(len(queries)), k)
            c_rows = top_idx.reshape(-1)
            img_rows, txt_rows = (q_rows, c_rows) if name == "i2t" else (c_rows, q_rows)
            s = self.rerank(params, img_s, txt_s, txt_m, img_rows, txt_rows, name)
            s = s.reshape(len(queries), k)
            if add_sim:
                s = s + top_sim
            logits = np.stack([np.zeros_like(s), s], -1)  # score_matrix reads class 1
            out[name] = R.score_matrix(top_idx, logits, nt if name == "i2t" else ni)
        return out

    def run(self, params) -> dict:
        """Recall metrics (percent, official names), sizes, eval_seconds and the result file."""
        t0 = time.perf_counter()
        return self.finish(self.scores(params), t0)

    def finish(self, sc: dict, t0: float | None = None) -> dict:
        """`run`'s result from the output of `scores` (`t0`: start time, for eval_seconds)."""
        sp = self.split
        t0 = time.perf_counter() if t0 is None else t0
        out = dict(R.itm_eval(sc["i2t"], sc["t2i"], sp.txt2img, sp.img2txt))
        out.update(num_images=len(sp.images), num_texts=len(sp.texts),
                   k_test_i2t=sc["k_test"]["i2t"], k_test_t2i=sc["k_test"]["t2i"],
                   skipped_images=int(sp.skipped.get("missing_file", 0)),
                   eval_seconds=time.perf_counter() - t0)
        text_keys = [R.text_key(sp.keys[i], j) for i, ts in enumerate(sp.img2txt)
                     for j in range(len(ts))]
        out[FILES] = {RESULT_FILE: R.result_file(
            sc["i2t"], sc["t2i"], sp.keys, text_keys, sp.texts, sc["k_test"],
            int(self.cfg.get("top_n", 10) or 10))}
        return out

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        return (f"{res['num_images']} images, {res['num_texts']} texts (k_test "
                f"{res['k_test_i2t']}/{res['k_test_t2i']}, {res['eval_seconds']:.0f}s): "
                f"text retrieval R@1/5/10 {res['txt_r1']:.2f} / {res['txt_r5']:.2f} / "
                f"{res['txt_r10']:.2f}; image retrieval {res['img_r1']:.2f} / "
                f"{res['img_r5']:.2f} / {res['img_r10']:.2f}; r_mean {res['r_mean']:.2f} "
                f"(chance R@1 {100 / res['num_images']:.2f})")
