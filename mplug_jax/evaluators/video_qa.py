"""Zero-shot video QA (MSRVTT-QA, MSVD-QA; paper section 5.4.2) from a VQA model by generation.

Per question: `num_frames` frames sampled uniformly (`data.inputs.video_zeroshot`), encoded by the
image encoder in one batched call, their tokens concatenated into one sequence float[B, T * N, D]
(official `videoqa_mplug.py`); then exactly the image VQA path on those embeddings: fused
[video; question] states and the official beam search (`tasks.vqa.Task.generate_from_embeds`,
beam 5 / min 1 / max 10 by default), the top hypothesis decoded with the official
post-processing. Accuracy: exact match against the annotated answer
(`scoring.video_qa`, official `cal_metric`). The official v1 script ranks a candidate answer
list instead; the paper (following BLIP) generates, which is what is done here.

Result file `video_qa_result.json` = [{"question_id", "answer"}] (question id = annotation line
index), scored again by `mplug-jax score --task video_qa`. Questions of a video that cannot be
decoded are skipped: they count in 'num_skipped_videos' / 'num_unanswered', not in 'acc'.

Eval block keys: type='video_qa', dataset ('json' | 'synthetic'), annotations, video_root,
num_frames, batch_size, max_question_tokens, beam_size, min_length, max_length, limit,
workers, log_every, num_examples_shown; synthetic_size / synthetic_frames /
synthetic_image_size / synthetic_video / synthetic_dir (dataset='synthetic').
"""
from __future__ import annotations

import functools

import jax

from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.inputs import video_zeroshot as video_input
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import video_qa as scoring
from mplug_jax.sharding import replicated

PREDICT_FNS = ("vqa_generate_embeds",)  # + encode_video or encode_image


class Evaluator:
    """Evaluator `video_qa`.

    Args:
      predict_fns: {'encode_image', 'vqa_generate_embeds'} of `mplug_jax.tasks.vqa.Task`.
      ecfg: eval block (module docstring).
      config: run config (model.image_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg = ecfg
        self.batch_size = int(ecfg.batch_size)
        self.mesh = video_input.default_mesh(mesh, self.batch_size)
        if not 1 <= int(ecfg.min_length) <= int(ecfg.max_length):
            raise ValueError(f"need 1 <= min_length <= max_length, got {ecfg.min_length} / "
                             f"{ecfg.max_length}")
        self.input = video_input.VideoEval.from_eval_block(
            ecfg, config, "video_qa", "video QA",
            text_fields={"question": int(ecfg.get("max_question_tokens", 40))},
            # official (v1 and mPLUG-2 readers): pre_question to 50 words at test time
            text_prep={"question": lambda q: text.pre_question(q, 50)})
        self.source = self.input.source
        encode, gen = video_input.video_encoder(predict_fns, "video_qa"), functools.partial(
            predict_fns["vqa_generate_embeds"], beam_size=int(ecfg.beam_size),
            min_length=int(ecfg.min_length), max_length=int(ecfg.max_length))

        def answer(params, frames, q_ids, q_mask):
            return gen(params, encode(params, frames), q_ids, q_mask)["ids"][:, 0]

        self._answer = jax.jit(answer, out_shardings=replicated(self.mesh))

    def answers(self, params) -> dict[int, str]:
        """{question_id: generated answer} for every question whose video decodes."""
        tok, out = tokenizer.get_tokenizer(), {}
        for b in self.input:
            ids = jax.device_get(self._answer(params, *video_input.put_batch(
                self.mesh, b["frames"], b["question_ids"], b["question_mask"])))
            for j, row, ok in zip(b["idx"], ids, b["valid"]):
                if ok:
                    out[self.source[int(j)]["question_id"]] = tok.decode_official(row)
        return out

    def run(self, params) -> dict:
        """Metrics, a few examples (question, answer, truth) and the result file."""
        preds = self.answers(params)
        truth = {self.source[i]["question_id"]: self.source[i]["answer"]
                 for i in range(self.input.n)}
        res: dict = dict(scoring.exact_match(preds, truth)) if preds else {
            "acc": 0.0, "num_questions": 0, "num_unanswered": len(truth)}
        res["num_skipped_videos"] = self.input.num_skipped
        by_id = {self.source[i]["question_id"]: self.source[i] for i in range(self.input.n)}
        k = int(self.cfg.get("num_examples_shown", 5) or 0)
        res["examples"] = [(by_id[q]["video_id"], by_id[q]["question"], a, by_id[q]["answer"])
                           for q, a in list(preds.items())[:k]]
        res[FILES] = {scoring.RESULT_FILE: [{"question_id": q, "answer": a}
                                            for q, a in preds.items()]}
        return res

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        lines = [f"video QA: exact-match accuracy {100 * res['acc']:.2f}% on "
                 f"{res['num_questions']} questions ({res['num_unanswered']} unanswered, "
                 f"{res['num_skipped_videos']} videos skipped)"]
        for vid, q, a, gt in res.get("examples", []):
            lines.append(f"  {vid}: {q!r:45} -> {a!r:14} answer: {gt!r}")
        return "\n".join(lines)
