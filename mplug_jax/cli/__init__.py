"""`mplug-jax` command line: parses arguments and calls library functions, nothing else."""
from __future__ import annotations

import argparse
import os
import sys

from mplug_jax import compilation_cache, errors
from mplug_jax.cli import checkpoints, predict, runs

# The parser and `main` are here; the commands are in checkpoints (parity, convert, export),
# predict, and runs (train, evaluate, shardings, plan, schedule, score).


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mplug-jax", description=__doc__,
                                epilog=compilation_cache.HELP)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("parity", help="compare our model with an official golden fixture")
    s.add_argument("--fixture", action="append", required=True,
                   help="fixture folder (docs/fixtures.md); repeat for several")
    s.add_argument("--image-atol", type=float, default=1e-4,
                   help="max abs difference allowed for image preprocessing")
    s.set_defaults(fn=checkpoints.parity)

    s = sub.add_parser("convert", help="official PyTorch checkpoint -> mplug-jax checkpoint dir")
    s.add_argument("--checkpoint", required=True, help=".pth / .pt / .bin / .safetensors")
    s.add_argument("--config-bert", required=True, help="official config_bert*.json")
    s.add_argument("--config-yaml", help="official task yaml (gives image_res)")
    s.add_argument("--image-size", type=int, help="override the image resolution "
                   "(positional embeddings are resized bilinearly)")
    s.add_argument("--strict", action="store_true",
                   help="fail if any of our params (incl. pretraining heads) is missing")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(fn=checkpoints.convert)

    s = sub.add_parser("export", help="mplug-jax checkpoint -> official state dict")
    s.add_argument("--ckpt", required=True,
                   help="a `convert` output dir or a pretraining workdir")
    s.add_argument("--out", required=True, help="output .safetensors or .pth")
    s.add_argument("--step", type=int, help="workdir step (default: latest)")
    s.add_argument("--momentum", action="store_true", help="export the momentum params")
    s.set_defaults(fn=checkpoints.export)

    s = sub.add_parser("predict", help="answer a question about an image or a video, caption "
                       "it, or locate a referring expression (--task ground)")
    s.add_argument("--checkpoint", required=True, help="a workdir of ours (VQA, caption, or "
                   "pretraining: zero-shot captions; mPLUG-2 video QA / caption for --video) or "
                   "a `mplug-jax convert` directory")
    s.add_argument("--image", action="append", help="image file; repeat for several")
    s.add_argument("--video", action="append", help="video file (PyAV / OpenCV) or folder of "
                   "frame images, for mPLUG-2 video checkpoints; repeat for several")
    s.add_argument("--question", action="append", help="VQA question (one, or one per image "
                   "or video)")
    s.add_argument("--task", choices=("vqa", "caption", "ground", "grounding", "video_qa",
                                      "video_caption"),
                   help="required for converted checkpoints; default: the workdir's task "
                   "(ground = grounding: the box of --text)")
    s.add_argument("--text", action="append", help="grounding: referring expression (one, or "
                   "one per image)")
    s.add_argument("--out", help="grounding: save the image with the box drawn as this PNG")
    s.add_argument("--step", type=int, default=0, help="workdir step (0 = latest)")
    s.add_argument("--beam-size", type=int, help="default 5 (official)")
    s.add_argument("--min-length", type=int, help="default 1 (VQA) / 8 (caption) / 4 (video "
                   "caption)")
    s.add_argument("--max-length", type=int, help="default 10 (VQA) / 25 (caption) / 20 "
                   "(video caption)")
    s.add_argument("--json", action="store_true", help="one JSON object per image")
    s.set_defaults(fn=predict.predict)

    s = sub.add_parser("score", help="score a result file in a task's official format "
                       "against official annotations; prints the metrics JSON")
    from mplug_jax import scoring
    s.add_argument("--task", required=True, choices=scoring.TASKS,
                   help="task whose result format and metrics to use "
                   "(mplug_jax/scoring/<task>.py)")
    s.add_argument("--results", required=True, help="result file (ours or the official code's)")
    s.add_argument("--annotations", required=True, help="annotation file in the official format")
    s.add_argument("--out", help="also write the metrics JSON here")
    s.add_argument("--boxes", choices=("xywh", "corners"), help="grounding: the split file's box "
                   "layout (default: corners for flickr tuples, else xywh; official: corners "
                   "for referit and flickr)")
    s.add_argument("--int-box", action="store_true", help="grounding: truncate the split's "
                   "boxes to ints first, as the official pull_item")
    s.set_defaults(fn=runs.score)

    s = sub.add_parser("train", help="train: same flags as `python -m mplug_jax.main`",
                       add_help=False)
    s.set_defaults(fn=None)

    for name, fn, help_ in (
            ("evaluate", runs.evaluate, "run a config's evaluators on a checkpoint: metrics JSON "
                                    "and the result files each benchmark takes"),
            ("shardings", runs.shardings, "print the sharding of every train-state leaf"),
            ("plan", runs.plan, "compile the train step ahead of time: per-device memory, FLOPs, "
                            "fits or not")):
        s = sub.add_parser(name, help=help_, description=help_ + ". Config fields can be "
                           "overridden with --config.a.b=value (ml_collections syntax).")
        s.__class__ = runs.ConfigOverridesParser  # keep the --config.x=y overrides
        s.add_argument("--config", required=True, help="config file[:arg], e.g. "
                       "configs/pretrain.py:large")
        s.add_argument("--devices", type=int, help="plan for this many fake CPU devices "
                       "(default: the devices JAX sees)")
        if name == "evaluate":
            s.add_argument("--checkpoint", required=True, help="a workdir of ours, a "
                           "`mplug-jax convert` directory or an official checkpoint file")
            s.add_argument("--step", type=int, default=0, help="workdir step (0 = latest)")
            s.add_argument("--out", required=True, help="directory for metrics.json and the "
                           "result files")
        if name == "plan":
            s.add_argument("--device-memory-gb", type=float, default=40.0,
                           help="memory of one target device in GB (default 40); exit code 3 "
                                "when the step does not fit")
        s.set_defaults(fn=fn)

    s = sub.add_parser("schedule", help="write the learning rate of every optimizer group at "
                       "every update of a run: JSON {group: [lr, ...]} and a PNG beside it. "
                       "Config fields can be overridden with --config.a.b=value.")
    s.__class__ = runs.ConfigOverridesParser  # keep the --config.x=y overrides
    s.add_argument("--config", required=True, help="config file[:arg], e.g. configs/vqa.py:base")
    s.add_argument("--steps-per-epoch", type=int, required=True,
                   help="optimizer updates per epoch (train examples // input.batch_size)")
    s.add_argument("--out", required=True, help="output .json (the plot: same name, .png)")
    s.set_defaults(fn=runs.schedule)

    s = sub.add_parser("prepare", help="build a TFDS (array_record) dataset from official "
                                       "annotations")
    try:
        from mplug_jax.data import prepare
        prepare.add_prepare_args(s)
        s.set_defaults(fn=prepare.run_prepare)
    except ImportError as err:
        s.set_defaults(fn=lambda a, e=err: print(f"prepare unavailable: {e}") or 2)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `mplug-jax ARGV`; returns the exit status. Config and input errors of every command
    print one `error:` line and give 2 (`mplug_jax.errors`; `--debug` before or after the
    command, or MPLUG_JAX_DEBUG=1, shows their traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Config files (configs/*.py) import `configs.common`: resolve them from the working
    # directory, as `python -m mplug_jax.main` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    debug = errors.debug_requested(argv)

    def command() -> int:
        rest = compilation_cache.setup_from_argv(errors.without_debug(argv))  # train included
        if rest and rest[0] == "train":
            return runs.train(rest[1:])
        args = build_parser().parse_args(rest)
        args.debug = debug  # kept by a re-exec (runs.reexec_with_cpu_devices)
        return int(args.fn(args) or 0)

    return errors.guarded(command, debug)
