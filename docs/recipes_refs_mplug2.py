"""Reference facts behind docs/recipes.md for mPLUG-2 (X-PLUG/mPLUG-2 at commit a46aa97; the
paper's appendix B.2.3): the types and conventions of docs/recipes_refs.py, which holds mPLUG's."""
from __future__ import annotations

from recipes_refs import NS, Ref, Row, Section

M2_SCHED_WHY = "warm-up from 0, not from warmup_lr 1e-6 (documented deviation)"
M2_B23 = "mPLUG-2 B.2.3"


def _m2_qa() -> Section:
    y, sh = "mPLUG-2/configs_video/VideoQA_msrvtt_large.yaml", "mPLUG-2/scripts/run_videoqa.sh"
    return Section(
        "mPLUG-2 video QA, MSRVTT-QA (large)",
        (("configs/mplug2/video_qa.py:large", "release"),
         ("configs/mplug2/video_qa.py:large_paper", "paper")),
        (Row("image_size", Ref(224, f"{y}:26"), Ref(224, M2_B23)),
         Row("frames", Ref(16, f"{y}:27"), Ref(16, M2_B23)),
         Row("batch", Ref(32, f"{y}:34, {sh}:3", "4 per GPU x 8 GPUs"), Ref(128, M2_B23)),
         Row("lr", Ref(2e-5, f"{y}:11"), Ref(2e-5, M2_B23)),
         Row("vision_lr", Ref(2e-6, f"{y}:11"), Ref(NS)),
         Row("wd", Ref(0.02, f"{y}:11"), Ref(NS)),
         Row("epochs", Ref(10, f"{y}:13"), Ref(10, M2_B23)),
         Row("schedule", Ref("per-step cosine: from 1e-6 over 200 updates, min 1e-6",
                             f"{y}:13"), Ref(NS), why=M2_SCHED_WHY, why_paper=M2_SCHED_WHY),
         Row("beam", Ref(5, "mPLUG-2/video_qa_mplug2.py"), Ref(NS)),
         Row("max_length", Ref(10, "mPLUG-2/video_qa_mplug2.py"), Ref(NS)),
         Row("eval_every", Ref("every epoch", "mPLUG-2/video_qa_mplug2.py"), Ref(NS)),
         Row("selection", Ref("val/acc", "mPLUG-2/video_qa_mplug2.py"), Ref(NS))),
        ("`base` / `base_paper` are the same recipes on mplug2_base (the release has no base "
         "model; the paper gives the same values for both sizes).",))


def _m2_caption() -> Section:
    y = "mPLUG-2/configs_video/VideoCaption_msrvtt_large.yaml"
    sh, py = "mPLUG-2/scripts/run_videocaption.sh", "mPLUG-2/video_caption_mplug2.py"
    return Section(
        "mPLUG-2 video captioning, MSRVTT (large)",
        (("configs/mplug2/video_caption.py:large", "release"),
         ("configs/mplug2/video_caption.py:large_paper", "paper")),
        (Row("image_size", Ref(224, f"{y}:24"), Ref(224, M2_B23)),
         Row("frames", Ref(16, f"{y}:25"), Ref(16, M2_B23)),
         Row("batch", Ref(64, f"{y}:32, {sh}:3, {py}", "4 per GPU x 8 GPUs x 2 accumulated"),
             Ref(128, M2_B23, "cross-entropy stage")),
         Row("accum", Ref(2, py), Ref(NS)),
         Row("lr", Ref(2e-5, f"{y}:11"), Ref(2e-5, M2_B23)),
         Row("vision_lr", Ref(2e-6, f"{y}:11"), Ref(NS)),
         Row("wd", Ref(0.02, f"{y}:11"), Ref(NS)),
         Row("epochs", Ref(10, f"{y}:13"), Ref(10, M2_B23)),
         Row("schedule", Ref("per-step cosine: from 1e-6 over 200 updates, min 1e-6",
                             f"{y}:13"), Ref(NS), why=M2_SCHED_WHY, why_paper=M2_SCHED_WHY),
         Row("text_tokens", Ref(20, py), Ref(NS)),
         Row("prompt", Ref("a video of", f"{y}:9"),
             Ref("what does the video describe?", M2_B23,
                 "capitalised there; lower-case here: uncased tokenizer, `.split(prompt)`")),
         Row("beam", Ref(5, f"{y}:22"), Ref(5, M2_B23)),
         Row("min_length", Ref(4, py), Ref(NS)),
         Row("max_length", Ref(20, py), Ref(25, M2_B23)),
         Row("eval_every", Ref("every epoch", py), Ref(NS)),
         Row("selection", Ref("val/CIDEr", py), Ref(NS))),
        ("The paper then optimises CIDEr (SCST) for 5 more epochs at lr 1e-6, batch 16 "
         f"({M2_B23}): `large_paper,mode=scst` (next section) from this stage's workdir; "
         "`large_paper` itself is the cross-entropy stage.",
         "Paper batch 128: accumulation kept (2 micro-batches of 64). Training targets stay "
         "at 20 ids (the release's), of which the paper prompt takes 7 ([CLS] + 6).",
         "`base` / `base_paper` are the same recipes on mplug2_base (the release has no base "
         "model; the paper gives the same values for both sizes)."))


M2_SCST_SRC = "here the mPLUG release's SCST value, see the COCO captioning SCST section"


def _m2_caption_scst() -> Section:
    return Section(
        "mPLUG-2 video captioning, MSRVTT, SCST (large, `mode=scst`)",
        (("configs/mplug2/video_caption.py:large_paper,mode=scst", "ours"),),
        (Row("start", None, Ref(NS, M2_B23, "after the cross-entropy stage; which checkpoint "
                                "not stated")),
         Row("image_size", None, Ref(224, M2_B23)),
         Row("frames", None, Ref(16, M2_B23)),
         Row("batch", None, Ref(16, M2_B23, "CIDEr optimisation stage")),
         Row("accum", None, Ref(NS)),
         Row("lr", None, Ref(1e-6, M2_B23)),
         Row("vision_lr", None, Ref(NS, M2_B23, "one lr stated; here for all, as mPLUG's SCST")),
         Row("wd", None, Ref(NS)),
         Row("epochs", None, Ref(5, M2_B23, "extra epochs after the cross-entropy stage")),
         Row("schedule", None, Ref(NS, note="here constant: the mPLUG-2 release's schedule "
                                   "at lr = warmup_lr = min_lr")),
         Row("prompt", None, Ref("what does the video describe?", M2_B23,
                                 "capitalised there; lower-case here, as the CE stage")),
         Row("beam", None, Ref(5, M2_B23, "inference; the SCST search uses it too")),
         Row("min_length", None, Ref(NS)),
         Row("max_length", None, Ref(25, M2_B23, "inference; the SCST search uses it too")),
         Row("scst_length_norm", None, Ref(NS, note=M2_SCST_SRC)),
         Row("scst_search_dropout", None, Ref(NS, note=M2_SCST_SRC)),
         Row("scst_tokenize", None, Ref(NS, note=M2_SCST_SRC)),
         Row("scst_cider_df", None, Ref(NS, note=M2_SCST_SRC)),
         Row("eval_every", None, Ref(NS)),
         Row("selection", None, Ref(NS))),
        ("The mPLUG-2 release has no SCST (its caption model's SCST path is dead code, "
         "docs/fixtures.md#mplug-2-release-quirks): this stage follows the paper and, where "
         "it is silent "
         "(the search: the K = 5 beam hypotheses per video; the baseline: their mean reward; "
         "the reward tokenisation, document frequencies and loss divisor), the mPLUG "
         "release's SCST (the COCO captioning SCST section above). `base` / `large` refuse "
         "`mode=scst`; `base_paper,mode=scst` is the same stage on mplug2_base.",
         "Starts from the `large_paper` cross-entropy workdir (`init.checkpoint`) at its best "
         "val CIDEr checkpoint (`init.select='best'`, as that stage's release "
         "checkpoint_best.pth); evaluation and selection as that stage (every epoch, the "
         "best val CIDEr kept).",
         "Constant lr: the mPLUG release's SCST schedule (stairs from 1e-5, min 8e-8) is "
         "mPLUG's, not taken; the mPLUG-2 release's per-step cosine with lr = warmup_lr = "
         "min_lr = 1e-6 is constant."))


SECTIONS = (_m2_qa(), _m2_caption(), _m2_caption_scst())
# Pairs tested like the sections' but not tabulated (same values on another model size).
EXTRA_PAIRS = (("configs/mplug2/video_qa.py:base", "configs/mplug2/video_qa.py:base_paper",
                "mPLUG-2 video QA, MSRVTT-QA (large)"),
               ("configs/mplug2/video_caption.py:base",
                "configs/mplug2/video_caption.py:base_paper",
                "mPLUG-2 video captioning, MSRVTT (large)"))
