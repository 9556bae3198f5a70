"""Zero-shot video captioning (VATEX; paper section 5.4.2) from a caption (or pretraining) model.

Per video: `num_frames` frames sampled uniformly (`data.inputs.video_zeroshot`), encoded in one
batched call, tokens concatenated into float[B, T * N, D]; the decoder states are built by
`tasks.caption.Task.embed_states`: with `task.zero_shot_prompt` (the config sets "a video of",
the paper's prefix prompt) the prompt goes through the text encoder and fusion with the video
tokens, as the zero-shot "a picture of" of image captioning; then the caption task's beam
search (`task.generation`; official VATEX: beam 10, min 15, max 25). Predictions are decoded
with the official post-processing and the official prompt list (`OFFICIAL_PROMPTS`) is
stripped from their start (official `videocap_mplug.py`).

mPLUG-2 video captioning (`tasks.mplug2_video_caption`) uses the same evaluator with the
task's own `encode_video` (temporal modules, universal layers), `resize='nearest'` (the
release's test resize) and `prompt_strip='split'`: the release's `.split(prompt)[-1].strip()`
(docs/fixtures.md#mplug-2-generation), which also removes a prompt glued to the caption
("a video ofa red circle").

Metrics: BLEU-1..4 / METEOR / ROUGE-L / CIDEr via `scoring.caption.evaluate` against the
references (VATEX `enCap`, mPLUG-2 `golden_captions`). Result files: `caption_results.json`
(official mPLUG v1 form: question_id = video id, pred_caption, gold_caption) and, by format,
`vatex_submission.json` {videoID: caption} (the official VATEX submission dict) or
`video_caption_result.json` [{"video_id", "pred_caption", "gold_caption"}] (the mPLUG-2
release's result file). Videos that cannot be decoded are skipped and counted
('num_skipped_videos').

Eval block keys: type='video_caption', dataset ('json' | 'synthetic'), format
('vatex_caption' | 'video_caption' = mPLUG-2 jsonl), annotations, video_root, num_frames,
batch_size, metrics, tokenize, limit, workers, log_every, num_examples_shown, resize
('bicubic' | 'nearest'), prompt_strip ('official_list' = `OFFICIAL_PROMPTS`, default | 'split'
= the mPLUG-2 release) with prompt (for 'split'), synthetic_*.
"""
from __future__ import annotations

import jax

from mplug_jax.data.ops import tokenizer
from mplug_jax.data.inputs import video_zeroshot as video_input
from mplug_jax.evaluators.common import FILES
from mplug_jax.scoring import caption as scoring
from mplug_jax.sharding import replicated

PREDICT_FNS = ("caption_beam_embeds",)  # + encode_video or encode_image
# Stripped from the start of predictions, as the official VATEX evaluation (longest first).
OFFICIAL_PROMPTS = ("a video tutorial on", "a video clip of", "a video showing", "a picture of",
                    "a video of")
SUBMISSION_FILE = "vatex_submission.json"
MPLUG2_RESULT_FILE = "video_caption_result.json"
PROMPT_STRIPS = ("official_list", "split")


def strip_prompts(text: str, prompts=OFFICIAL_PROMPTS) -> str:
    """`text` without a leading prompt of `prompts` (whole words only), stripped."""
    text = text.strip()
    for p in sorted(prompts, key=len, reverse=True):
        if text == p or text.startswith(p + " "):
            return text[len(p):].strip()
    return text


def split_prompt(text: str, prompt: str) -> str:
    """The mPLUG-2 release's post-processing: `text.split(prompt)[-1].strip()` (no-op for an
    empty prompt)."""
    return text.split(prompt)[-1].strip() if prompt else text.strip()


class Evaluator:
    """Evaluator `video_caption`.

    Args:
      predict_fns: {'encode_image', 'caption_beam_embeds'} of `mplug_jax.tasks.caption.Task`.
      ecfg: eval block (module docstring).
      config: run config (model.image_size, seed).
      mesh: the run's mesh; None = a 1-device mesh on this process's first device.
    """

    def __init__(self, predict_fns: dict, ecfg, config, mesh=None):
        self.cfg = ecfg
        self.batch_size = int(ecfg.batch_size)
        self.mesh = video_input.default_mesh(mesh, self.batch_size)
        fmt = ecfg.get("format", "vatex_caption")
        if fmt not in ("vatex_caption", "video_caption"):
            raise ValueError(f"video_caption eval format must be 'vatex_caption' or "
                             f"'video_caption', got {fmt!r}")
        self.input = video_input.VideoEval.from_eval_block(
            ecfg, config, fmt, "video caption")
        self.source = self.input.source
        self.format = fmt
        self.prompt_strip = str(ecfg.get("prompt_strip", "official_list"))
        if self.prompt_strip not in PROMPT_STRIPS:
            raise ValueError(f"video_caption eval prompt_strip must be one of {PROMPT_STRIPS}, "
                             f"got {self.prompt_strip!r}")
        self.prompt = str(ecfg.get("prompt", "") or "")
        if self.prompt_strip == "split" and not self.prompt:
            raise ValueError("video_caption eval prompt_strip='split' needs the prompt (e.g. "
                             "prompt='a video of')")
        self.metrics = tuple(ecfg.get("metrics", scoring.METRICS))
        self.tokenize = str(ecfg.get("tokenize", "ptb"))
        encode = video_input.video_encoder(predict_fns, "video_caption")
        beam = predict_fns["caption_beam_embeds"]

        def caption(params, frames):
            return beam(params, encode(params, frames))["ids"]

        self._caption = jax.jit(caption, out_shardings=replicated(self.mesh))

    def captions(self, params) -> dict[int, str]:
        """{source index: caption} of every video that decodes (prompts stripped)."""
        tok, out = tokenizer.get_tokenizer(), {}
        for b in self.input:
            ids = jax.device_get(self._caption(params, *video_input.put_batch(self.mesh,
                                                                              b["frames"])))
            for j, row, ok in zip(b["idx"], ids, b["valid"]):
                if ok:
                    out[int(j)] = self.clean(tok.decode_official(row))
        return out

    def clean(self, text: str) -> str:
        """Decoded text -> the caption written to the result files (prompt removed)."""
        if self.prompt_strip == "split":
            return split_prompt(text, self.prompt)
        return strip_prompts(text)

    def run(self, params) -> dict:
        """Metrics, a few examples and the result files (module docstring)."""
        caps = self.captions(params)
        order = sorted(caps)
        vids = [self.source[i]["video_id"] for i in order]
        preds = [caps[i] for i in order]
        refs = [self.source[i]["gold_captions"] for i in order]
        res: dict = dict(scoring.evaluate(preds, refs, self.metrics, self.tokenize)) \
            if preds else {}
        res["num_videos"] = len(preds)
        res["num_skipped_videos"] = self.input.num_skipped
        k = int(self.cfg.get("num_examples_shown", 5) or 0)
        res["captions"] = list(zip(vids[:k], preds[:k], [r[0] for r in refs[:k]]))
        files = {"caption_results.json": scoring.result_rows(vids, preds, refs)}
        if self.format == "video_caption":
            files[MPLUG2_RESULT_FILE] = [
                {"video_id": v, "pred_caption": p, "gold_caption": list(r)}
                for v, p, r in zip(vids, preds, refs)]
        else:
            files[SUBMISSION_FILE] = dict(zip(vids, preds))
        res[FILES] = files
        return res

    @staticmethod
    def report(res: dict) -> str:
        """Human-readable summary of `run`'s result."""
        names = [m for m in scoring.METRICS if m in res]
        lines = [f"video captions of {res['num_videos']} videos "
                 f"({res['num_skipped_videos']} skipped): "
                 + "  ".join(f"{m} {100 * res[m]:.1f}" for m in names)]
        for vid, gen, ref in res.get("captions", []):
            lines.append(f"  {vid}: {gen!r:50}  reference: {ref!r}")
        return "\n".join(lines)
