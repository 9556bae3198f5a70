"""Zero-shot text-to-video retrieval (MSRVTT 1k-A; paper section 5.4.2), official v1 style.

From any checkpoint whose task has the ITC / ITM heads (a pretraining or retrieval workdir):
1. Videos: `num_frames` frames sampled uniformly (`data.inputs.video_zeroshot`), the B * T frames
   of a batch through `image_embed` in one call. ITC embedding of a video = the mean of its T
   per-frame unit [CLS] embeddings, re-normalised (BLIP's zero-shot video retrieval averages
   the projected [CLS] features before normalising; the shared `image_embed` predict fn
   returns them already normalised, so here unit vectors are averaged; identical for
   identical frames). ITM input = the T frames' tokens concatenated, float[B, T * N, D]; each
   frame keeps the image model's positional embeddings (no temporal embedding in v1).
2. Texts: the MSRVTT captions (pre_caption 40 words) as `[CLS] caption`, `max_text_tokens`
   (official 35), through `text_embed`.
3. Candidates and re-ranking exactly as the image `retrieval` evaluator (this class reuses its
   sharded top-k, the on-device ITM re-ranking and the official score matrices), with score =
   ITM "match" logit + cosine similarity (official video retrieval), k_test 128; non-candidates
   -100.
4. Recalls via `scoring.retrieval` with txt2video the identity (one caption per video):
   txt_r* = video -> text, vid_r* = text -> video (the paper's number), vid_mdR = median rank
   (1-based) of text -> video, r_mean.

mPLUG-2 (`mplug2_retrieval` / `mplug2_pretrain` tasks): when the task has a `video_embed`
predict fn, step 1 uses it instead: the whole clip float32[B, T, R, R, 3] through the model's
own video path (dual vision encoder with the local temporal modules, universal layers), its
pooled unit ITC feature and its universal-layer tokens float[B, N, H] as the ITM input; with
`resize='nearest'` (the mPLUG-2 configs) frames get the release's test transform. Steps 2-4
are the same (score = ITM logit + similarity unless add_similarity=False).

Videos that cannot be decoded are skipped with their captions and counted
('num_skipped_videos'). Result file `video_retrieval_result.json` in the format of
`scoring.retrieval.result_file` (video ids as the item keys, "<video id>#0" as text keys).

Eval block keys: type='video_retrieval', dataset ('json' | 'synthetic'), annotations,
video_root, num_frames, batch_size (videos and texts per embedding call), max_text_tokens,
k_test, sim_chunk, itm_batch_size, add_similarity (default True; False = ITM logit only),
limit, workers, log_every, log_every_batches, top_n, synthetic_* (see
`data.inputs.video_zeroshot.eval_source`).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mplug_jax.data.inputs import retrieval as retrieval_input
from mplug_jax.data.inputs import video_zeroshot as video_input
from mplug_jax.evaluators import retrieval as image_retrieval
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import retrieval as R
from mplug_jax.sharding import replicated

# Plus 'video_embed' (mPLUG-2) or 'image_embed' (mPLUG v1, frames averaged): checked in
# `Evaluator.__init__`.
PREDICT_FNS = ("text_embed", "itm_score")
RESULT_FILE = "video_retrieval_result.json"


def video_embed_fn(image_embed):
    """fn(params, frames float32[B, T, R, R, 3]) -> (float32[B, E] unit video embedding =
    normalised mean of the T unit frame embeddings, float[B, T * N, D] frame tokens
    concatenated), from the `image_embed` predict fn."""
    def fn(params, frames):
        b, t = frames.shape[:2]
        feats, states = image_embed(params, frames.reshape((b * t,) + frames.shape[2:]))
        mean = feats.astype(jnp.float32).reshape(b, t, -1).mean(1)
        unit = mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
        return unit, states.reshape(b, t * states.shape[1], states.shape[2])
    return fn


class Evaluator(image_retrieval.Evaluator):
    """Evaluator `video_retrieval` (see module docstring).

    Args:
      predict_fns: {'text_embed', 'itm_score'} and 'video_embed' (mPLUG-2 tasks: used as is)
        or 'image_embed' (mPLUG v1 pretrain / retrieval: per frame, averaged).
      ecfg: eval block (module docstring).
      config: run config (model.image_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        # A copy with add_similarity (default True: official video re-ranking = ITM logit +
        # similarity), read by the inherited `scores`.
        self.cfg = ml_collections.ConfigDict(ecfg)
        with self.cfg.unlocked():
            self.cfg.add_similarity = bool(ecfg.get("add_similarity", True))
        self.mesh = mesh = video_input.default_mesh(mesh, int(ecfg.batch_size))
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        for key in ("sim_chunk", "itm_batch_size"):
            if int(ecfg[key]) <= 0 or int(ecfg[key]) % shards:
                raise ValueError(f"evals.<video_retrieval>.{key}={ecfg[key]} must be a positive "
                                 f"multiple of the {shards} batch shards of mesh "
                                 f"{dict(mesh.shape)}")
        if int(ecfg.k_test) < 1:
            raise ValueError(f"evals.<video_retrieval>.k_test must be >= 1, got {ecfg.k_test}")
        self.input = video_input.VideoEval.from_eval_block(
            ecfg, config, "msrvtt_retrieval", "video retrieval")
        self.source = self.input.source
        self.max_tokens = int(ecfg.get("max_text_tokens", 35))
        self.kept: list[int] = []
        rep = replicated(mesh)
        rows = NamedSharding(mesh, PartitionSpec(tuple(
            a for a in ("data", "fsdp") if a in mesh.axis_names) or None))
        if "video_embed" in predict_fns:
            video_fn = predict_fns["video_embed"]
        elif "image_embed" in predict_fns:
            video_fn = video_embed_fn(predict_fns["image_embed"])
        else:
            raise ValueError("evaluator 'video_retrieval' needs predict fn 'video_embed' or "
                             f"'image_embed'; the task has {sorted(predict_fns)}")
        self._video = jax.jit(video_fn, out_shardings=(rep, rows))
        self._text = jax.jit(predict_fns["text_embed"], out_shardings=(rep, rows))
        itm = predict_fns["itm_score"]

        def pair_scores(params, vid_all, txt_all, mask_all, vid_rows, txt_rows):
            # Stacked [nb, B, ...] states: row r is (r // B, r % B); gathered on device.
            def take(a, r):
                b = a.shape[1]
                return jax.lax.with_sharding_constraint(a[r // b, r % b], rows)
            return itm(params, take(vid_all, vid_rows), take(txt_all, txt_rows),
                       take(mask_all, txt_rows))

        self._pairs = jax.jit(pair_scores, out_shardings=rep)

    def embed(self, params):
        """(float32[NV, E], float32[NT, E] unit features, video tokens, text states, text
        masks on device) of the videos that decode and their captions (NT = NV)."""
        b = int(self.cfg.batch_size)
        feats_v, states_v, self.kept = [], [], []
        for batch in self.input:
            f, st = self._video(params, *video_input.put_batch(self.mesh, batch["frames"]))
            n = int(batch["valid"].sum())
            feats_v.append(np.asarray(f)[:n])
            states_v.append(st)
            self.kept += [int(i) for i in batch["idx"][:n]]
        if not self.kept:
            raise ValueError("video retrieval: no video of the eval set could be decoded")
        ids, mask = retrieval_input.encode_texts([self.source[i]["caption"] for i in self.kept],
                                                 self.max_tokens)
        feats_t, states_t, masks = [], [], []
        for s in range(0, len(ids), b):
            n = len(ids[s:s + b])
            ids_g, mask_g = video_input.put_batch(
                self.mesh, image_retrieval._pad_rows(ids[s:s + b], b),
                image_retrieval._pad_rows(mask[s:s + b], b))
            f, st = self._text(params, ids_g, mask_g)
            feats_t.append(np.asarray(f)[:n])
            states_t.append(st)
            masks.append(mask_g)
        stack = image_retrieval._Stacked
        return (np.concatenate(feats_v).astype(np.float32),
                np.concatenate(feats_t).astype(np.float32), stack(states_v, self.mesh),
                stack(states_t, self.mesh), stack(masks, self.mesh))

    def run(self, params) -> dict:
        """Recalls (percent), vid_mdR, sizes, eval_seconds and the result file."""
        t0 = time.perf_counter()
        sc = self.scores(params)
        n = len(self.kept)
        v2t_rank, t2v_rank = R.retrieval_ranks(sc["i2t"], sc["t2i"], np.arange(n),
                                               [[i] for i in range(n)])
        rec = R.recall_metrics(v2t_rank, t2v_rank)
        out = {k.replace("img_", "vid_"): v for k, v in rec.items()}
        out.update(vid_mdR=float(np.median(t2v_rank + 1)), num_videos=n,
                   num_skipped_videos=self.input.num_skipped, k_test_v2t=sc["k_test"]["i2t"],
                   k_test_t2v=sc["k_test"]["t2i"], eval_seconds=time.perf_counter() - t0)
        vids = [self.source[i]["video_id"] for i in self.kept]
        out[FILES] = {RESULT_FILE: R.result_file(
            sc["i2t"], sc["t2i"], vids, [R.text_key(v, 0) for v in vids],
            [self.source[i]["caption"] for i in self.kept], sc["k_test"],
            int(self.cfg.get("top_n", 10) or 10))}
        return out

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        return (f"{res['num_videos']} videos ({res['num_skipped_videos']} skipped; k_test "
                f"{res['k_test_t2v']}, {res['eval_seconds']:.0f}s): text->video R@1/5/10 "
                f"{res['vid_r1']:.2f} / {res['vid_r5']:.2f} / {res['vid_r10']:.2f}, MdR "
                f"{res['vid_mdR']:.1f}; video->text {res['txt_r1']:.2f} / {res['txt_r5']:.2f} "
                f"/ {res['txt_r10']:.2f}; r_mean {res['r_mean']:.2f} "
                f"(chance R@1 {100 / res['num_videos']:.2f})")
