r"""Write docs/recipes.md: per task and preset, each fine-tuning setting of our config beside
the release's (file:line) and the paper's (section / table), marked same / differs, with the
reason where we differ on purpose.

  python docs/make_recipes.py            # rewrite docs/recipes.md
  python docs/make_recipes.py --check    # exit 1 if docs/recipes.md is not current

The reference facts live in docs/recipes_refs.py (mPLUG-2's in docs/recipes_refs_mplug2.py);
our values are read from the configs (pure Python: the config files are imported and
`get_config` called, nothing is built or compiled).
tests/test_recipes.py checks that the file is current and that each paper preset differs from
its release preset in exactly the settings the references say differ.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "recipes.md"
for _p in (str(REPO), str(REPO / "docs")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import recipes_refs as refs  # noqa: E402  (docs/ is not a package)
import recipes_refs_mplug2 as refs_m2  # noqa: E402

SECTIONS = refs.SECTIONS + refs_m2.SECTIONS  # the page's order
EXTRA_PAIRS = refs_m2.EXTRA_PAIRS


def load(spec: str):
    """The ConfigDict of `configs/x.py:ARG` (or `configs/mplug2/x.py:ARG`)."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module(path[:-3].replace("/", "."))
    return module.get_config(arg or None)


def fmt(value) -> str:
    """A value as the tables show (and compare) it: 3e-05 -> '3e-5', 8.0 -> '8', '' -> "''"."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1:
            return str(int(value))
        text = f"{value:.3g}"
        if "e" in text:
            mantissa, exp = text.split("e")
            text = f"{mantissa}e{int(exp)}"
        return text
    if isinstance(value, str):
        return "''" if value == "" else value
    return str(value)


def _first(c, name: str):
    """task.generation.<name>, else the first eval block that has <name>."""
    gen = c.get("task", {}).get("generation")
    if gen is not None and name in gen:
        return gen[name]
    for block in c.get("evals", {}).values():
        if name in block:
            return block[name]
    return None


def _vision_lr(c):
    group = c.optim.lr_groups.get("vision")
    return c.optim.lr * (group.mult if group is not None else 1.0)


def _schedule(c) -> str:
    o = c.optim
    if o.schedule == "epoch_cosine":
        return (f"epoch_cosine: from {fmt(o.warmup_lr)}, {o.warmup_stairs} stairs of "
                f"{o.stair_microbatches} micro-batches, min {fmt(o.end_lr)}")
    if o.schedule == "cosine":
        return (f"per-step cosine: from 0 over {o.warmup_steps} updates, "
                f"min {fmt(o.end_lr)}")
    return o.schedule


def _text_tokens(c):
    for name in ("max_question_tokens", "max_caption_tokens", "max_text_tokens", "max_tokens",
                 "max_query_len"):
        if name in c.input:
            return c.input[name]
    return None


def _eval_block(c):
    evals = c.get("evals", {})
    best = c.get("best", {}).get("eval", "")
    if best in evals:
        return evals[best]
    return next(iter(evals.values()), None)


def _eval_every(c) -> str:
    block = _eval_block(c)
    if block is None:
        return "none"
    epochs, steps = block.get("every_epochs", 0) or 0, block.get("every_steps", 0) or 0
    parts = [f"every {steps} steps"] if steps else []
    if epochs:
        parts.append("every epoch" if epochs == 1 else f"every {fmt(float(epochs))} epochs")
    return " and ".join(parts) or "end of run"


def _selection(c) -> str:
    best = c.get("best", {})
    return f"{best.eval}/{best.metric}" if best.get("eval") else "last"


# name -> (label, config paths the setting covers (fnmatch), getter)
FIELDS = {
    "start": ("starts from (`init.select` of the previous stage's workdir)",
              ("init.select", "init.step"), lambda c: c.init.select),
    "image_size": ("image size (px)", ("model.image_size",), lambda c: c.model.image_size),
    "frames": ("frames per video", ("model.num_frames", "evals.*.num_frames"),
               lambda c: c.model.num_frames),
    "batch": ("global batch (per update)", ("input.batch_size",), lambda c: c.input.batch_size),
    "accum": ("micro-batches per update", ("optim.accum_steps",),
              lambda c: c.optim.accum_steps),
    "lr": ("lr (lr1)", ("optim.lr", "optim.lr_groups.*.mult"), lambda c: c.optim.lr),
    "vision_lr": ("visual-encoder lr (lr2)", ("optim.lr_groups.*",), _vision_lr),
    "wd": ("weight decay", ("optim.wd",), lambda c: c.optim.wd),
    "epochs": ("epochs", ("total_epochs", "total_steps"), lambda c: c.total_epochs),
    "schedule": ("schedule (warm-up, min lr)", ("optim.schedule", "optim.warmup_*",
                                                "optim.end_lr", "optim.stair_microbatches"),
                 _schedule),
    "clip_norm": ("gradient clipping", ("optim.clip_norm",), lambda c: c.optim.clip_norm),
    "queue": ("ITC queue", ("task.itc.queue_size",), lambda c: c.task.itc.queue_size),
    "negatives": ("in-batch negatives (`task.negatives`)", ("task.negatives",),
                  lambda c: c.task.get("negatives", "global")),
    "text_tokens": ("text tokens (train)", ("input.max_*",), _text_tokens),
    "prompt": ("prompt", ("task.prompt", "evals.*.prompt"), lambda c: c.task.prompt),
    "beam": ("beam size", ("task.generation.beam_size", "evals.*.beam_size"),
             lambda c: _first(c, "beam_size")),
    "min_length": ("min length", ("task.generation.min_length", "evals.*.min_length"),
                   lambda c: _first(c, "min_length")),
    "max_length": ("max length", ("task.generation.max_length", "evals.*.max_length"),
                   lambda c: _first(c, "max_length")),
    "scst_length_norm": ("SCST loss divisor (`task.scst.length_norm`)",
                         ("task.scst.length_norm",), lambda c: c.task.scst.length_norm),
    "scst_search_dropout": ("SCST search with dropout (`task.scst.search_dropout`)",
                            ("task.scst.search_dropout",),
                            lambda c: c.task.scst.search_dropout),
    "scst_tokenize": ("SCST reward tokenizer (`task.scst.reward_tokenize`)",
                      ("task.scst.reward_tokenize",), lambda c: c.task.scst.reward_tokenize),
    "scst_cider_df": ("SCST CIDEr-D document frequencies (`task.scst.cider_df`)",
                      ("task.scst.cider_df",), lambda c: c.task.scst.cider_df),
    "k_test": ("k_test (re-ranked)", ("evals.*.k_test",), lambda c: c.evals.val.k_test),
    "eval_every": ("evaluation", ("evals.*.every_*",), _eval_every),
    "selection": ("kept checkpoint", ("best.*",), _selection),
}


def value(row: refs.Row, config) -> str:
    """Our formatted value of a row's setting."""
    return fmt(FIELDS[row.field][2](config))


def ref_value(ref: refs.Ref | None) -> str | None:
    """The formatted value of a reference; None where it states none."""
    return None if ref is None or ref.value is None else fmt(ref.value)


def paper_differs(row: refs.Row) -> bool:
    """Whether the paper states a value for this row that differs from the release's."""
    p, r = ref_value(row.paper), ref_value(row.release)
    return p is not None and r is not None and p != r


def flatten(c, prefix: str = "") -> dict:
    """{dotted path: value} of every leaf of a ConfigDict."""
    out = {}
    for key, v in c.items():
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = v
    return out


def covered(path: str, rows) -> bool:
    """Whether a config path belongs to the setting of one of `rows`."""
    return any(fnmatch.fnmatch(path, pat) for row in rows for pat in FIELDS[row.field][1])


def _cell(ref: refs.Ref | None) -> str:
    if ref is None:
        return "—"
    text = fmt(ref.value) if ref.value is not None else "not stated"
    extra = "; ".join(x for x in (ref.note, f"`{ref.src}`" if ref.src else "") if x)
    return f"{text} ({extra})" if extra else text


def _mark(ours: str, ref: refs.Ref | None) -> str:
    want = ref_value(ref)
    if want is None:
        return "—"
    return "same" if ours == want else "**differs**"


def _why(row: refs.Row, role: str, ours: str) -> str:
    rel, pap = ref_value(row.release), ref_value(row.paper)
    if role == "release" and rel is not None and ours != rel:
        return row.why
    if role == "release" and pap is not None and ours != pap:
        return "the release's value"
    if role in ("paper", "ours") and pap is not None and ours != pap:
        return row.why_paper
    if role == "paper" and rel is not None and ours != rel:
        return "the paper's value" if ours == pap else row.why
    return ""


def section_md(section: refs.Section) -> list[str]:
    """Markdown lines of one section: one table per preset, then the notes."""
    out = [f"## {section.title}", ""]
    for spec, role in section.presets:
        config = load(spec)
        kind = {"release": "release preset", "paper": "paper preset",
                "ours": "no release; follows the paper"}[role]
        out += [f"`{spec}` ({kind})", "",
                "| setting | ours | release (file:line) | paper (section) | vs release | "
                "vs paper | why we differ |",
                "|---|---|---|---|---|---|---|"]
        for row in section.rows:
            ours = value(row, config)
            out.append(f"| {FIELDS[row.field][0]} | {ours} | {_cell(row.release)} | "
                       f"{_cell(row.paper)} | {_mark(ours, row.release)} | "
                       f"{_mark(ours, row.paper)} | {_why(row, role, ours)} |")
        out.append("")
    out += [f"- {note}" for note in section.notes]
    return out + ([""] if section.notes else [])


def render() -> str:
    """The whole of docs/recipes.md."""
    lines = [
        "# Fine-tuning recipes: our presets, the release, the paper",
        "",
        "Generated by `python docs/make_recipes.py` from the configs and the reference facts "
        "in `docs/recipes_refs.py` and `docs/recipes_refs_mplug2.py`; `tests/test_recipes.py` "
        "fails when this file is not current. Do not edit by hand.",
        "",
        "Release presets (`base`, `large`, `coco_large`, ...) follow the official code; paper "
        "presets (`..._paper`) take the values the paper states where they differ from the "
        "release and keep the release's everywhere else. \"vs release\" / \"vs paper\": "
        "our value against that source (— where it states none); \"why we differ\": the "
        "reason where we differ on purpose.",
        "",
        "Sources. `mPLUG/...`: alibaba/AliceMind, folder mPLUG/, line numbers read at commit "
        "3b159e6 (docs/official-formats.md was read at a6d5afe: lines may differ there); "
        "`mPLUG-2/...`: "
        "X-PLUG/mPLUG-2 at commit a46aa97. A file without a line: an argparse default or a "
        "hard-coded value of that script. Paper: `mPLUG arXiv` section 7.1 / Table 11 are "
        "appendix A.4 / Table 9 of the EMNLP version (same values); Table 11's \"LR "
        "(ViT-L/BERT_base)\" pairs are read as lr1 / lr2 (lr2 the smaller, as every release "
        "yaml). `mPLUG-2 B.2.3`: the mPLUG-2 paper's appendix.",
        "",
    ]
    for section in SECTIONS:
        lines += section_md(section)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    """Write docs/recipes.md, or with --check report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.exists() and OUT.read_text() == text
        print(f"{OUT} is {'current' if current else 'stale: run python docs/make_recipes.py'}")
        return 0 if current else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
