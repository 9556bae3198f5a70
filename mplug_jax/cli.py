"""`mplug-jax` command line: parses arguments and calls library functions, nothing else."""
from __future__ import annotations

import argparse
import json
import os
import sys

from mplug_jax import compilation_cache, errors


def _parity(args) -> int:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from mplug_jax.parity import format_table, run_parity
    failed = 0
    for fx in args.fixture:
        if not os.path.isfile(os.path.join(fx, "expected.npz")):
            print(f"error: {fx} is not a parity fixture (no expected.npz)", file=sys.stderr)
            return 2
        rows = run_parity(fx, image_atol=args.image_atol)
        ok = all(r.ok for r in rows)
        failed += not ok
        print(f"== {fx}")
        print(format_table(rows))
        print(f"parity {'PASSED' if ok else 'FAILED'}: {sum(r.ok for r in rows)}/{len(rows)} ok")
    return 1 if failed else 0


def _convert_mplug2(args) -> int:
    from mplug_jax.mplug2 import convert as mplug2_convert
    overrides = {"image_size": args.image_size} if args.image_size else None
    conv = mplug2_convert.load_official(args.checkpoint, args.config_bert, args.config_yaml,
                                        overrides)
    mplug2_convert.save_converted(conv, args.out)
    print(f"converted mPLUG-2 {args.checkpoint} -> {args.out}")
    print(f"  model: {json.dumps(conv.model_cfg)}")
    print(f"  fusion pattern: {conv.model.pattern} (official modules from {conv.start_layer}); "
          f"official tensors kept unused: {len(conv.extras)}")
    for note in conv.notes:
        print(f"  note: {note}")
    return 0


def _export_mplug2(args) -> int:
    import yaml
    from mplug_jax.interop import official_io
    from mplug_jax.mplug2 import convert as mplug2_convert
    conv = mplug2_convert.load_converted(args.ckpt)
    state = mplug2_convert.export_official(conv)
    official_io.save_state_dict(state, args.out)
    bert, yml = mplug2_convert.official_config_files(conv.model, conv.start_layer)
    base = os.path.splitext(args.out)[0]
    with open(base + ".config_bert.json", "w") as f:
        json.dump(bert, f, indent=2)
    with open(base + ".config.yaml", "w") as f:
        yaml.safe_dump(yml, f)
    print(f"wrote {len(state)} tensors to {args.out} (+ {base}.config_bert.json, "
          f"{base}.config.yaml)")
    return 0


def _convert(args) -> int:
    from mplug_jax.interop import convert, official_keys
    from mplug_jax.mplug2 import convert as mplug2_convert
    if mplug2_convert.is_mplug2_config(args.config_bert):
        return _convert_mplug2(args)
    overrides = {"image_size": args.image_size} if args.image_size else None
    allow = None if args.strict else official_keys.HEADS_ABSENT_IN_TASK_CHECKPOINTS
    conv = convert.load_official(args.checkpoint, args.config_bert, args.config_yaml, overrides,
                                 allow_missing=allow)
    convert.save_converted(conv, args.out)
    print(f"converted {args.checkpoint} -> {args.out}")
    print(f"  model: {json.dumps(conv.model_cfg)}")
    print(f"  fusion pattern: {conv.model.pattern} (official modules from {conv.start_layer})")
    print(f"  momentum params: {'yes' if conv.momentum is not None else 'no'}; "
          f"official tensors kept unused: {len(conv.extras)}")
    for note in conv.notes:
        print(f"  note: {note}")
    if conv.missing:
        print(f"  not in the checkpoint, freshly initialised: {', '.join(conv.missing)}")
    return 0


def _export(args) -> int:
    from mplug_jax.interop import convert, official_config, official_io
    from mplug_jax.mplug2 import convert as mplug2_convert
    if mplug2_convert.is_converted_dir(args.ckpt):
        return _export_mplug2(args)
    if os.path.isfile(os.path.join(args.ckpt, "mplug_config.json")):
        conv = convert.load_converted(args.ckpt)
        params = conv.momentum if args.momentum else conv.params
        if params is None:
            print("error: this checkpoint has no momentum params", file=sys.stderr)
            return 2
        state = convert.export_official(params, conv.model, None if args.momentum else
                                        conv.momentum, conv.extras, conv.start_layer,
                                        exclude=conv.missing)
        model, start = conv.model, conv.start_layer
    else:
        from mplug_jax import tasks, workdir
        config, params, momentum = workdir.restore_params(args.ckpt, step=args.step)
        model = tasks.model(config)
        if args.momentum and momentum is None:
            print("error: this workdir keeps no momentum params", file=sys.stderr)
            return 2
        # The momentum copy holds only what the momentum forwards use: complete it.
        chosen = {**params, **momentum} if args.momentum else params
        state = convert.export_official(chosen, model, None if args.momentum else momentum)
        start = 0
    official_io.save_state_dict(state, args.out)
    bert, yml = official_config.official_config_files(convert.model_kwargs(model), start)
    base = os.path.splitext(args.out)[0]
    with open(base + ".config_bert.json", "w") as f:
        json.dump(bert, f, indent=2)
    with open(base + ".config.yaml", "w") as f:
        import yaml
        yaml.safe_dump(yml, f)
    print(f"wrote {len(state)} tensors to {args.out} (+ {base}.config_bert.json, "
          f"{base}.config.yaml)")
    return 0


def _evaluate(args) -> int:
    if args.devices:
        _reexec_with_cpu_devices(args)
    from mplug_jax import evaluate, plan
    config = plan.load_config(args.config, args.overrides)
    evaluate.evaluate(config, args.checkpoint, args.out, step=args.step)
    return 0


def _draw_boxes(image_path: str, boxes: list, out: str) -> None:
    """Save `image_path` with each [x1, y1, x2, y2] box outlined in red as PNG `out`."""
    from PIL import Image, ImageDraw
    with Image.open(image_path) as im:
        img = im.convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 200))
    for box in boxes:
        draw.rectangle([float(v) for v in box], outline=(255, 0, 0), width=width)
    img.save(out, format="PNG")


def _ground(args, pred=None) -> int:
    from mplug_jax.predict import Predictor
    if not args.text:
        raise ValueError("grounding needs --text (the referring expression; one, or one per "
                         "--image)")
    if len(args.text) not in (1, len(args.image)):
        raise ValueError(f"{len(args.image)} --image but {len(args.text)} --text")
    if args.out and len(args.image) != 1:
        raise ValueError("--out draws the box of one --image; pass a single image")
    if pred is None:
        pred = Predictor.from_checkpoint(args.checkpoint, task="grounding", step=args.step)
    texts = args.text * (len(args.image) if len(args.text) == 1 else 1)
    boxes = pred.ground(args.image, texts)
    for image, text, box in zip(args.image, texts, boxes):
        rounded = [round(v, 1) for v in box]
        if args.json:
            print(json.dumps({"image": image, "text": text, "box": rounded}))
        else:
            print(f"{image}\t{text}\t{rounded}" if len(boxes) > 1 else rounded)
    if args.out:
        _draw_boxes(args.image[0], boxes, args.out)
        print(f"wrote {args.out}")
    return 0


def _answer_or_caption(args, pred, inputs: list[str], key: str, qa_task: str,
                       about: str) -> int:
    """Answers (`pred.task == qa_task`: one --question for all inputs or one each) or captions
    for `inputs`, printed one per line (tab-separated with the input when several; JSON rows
    keyed `key` with --json). `about` names the inputs in the errors ('' or ' videos')."""
    if args.text or args.out:
        raise ValueError("--text / --out are for grounding checkpoints (--task ground)")
    if pred.task == qa_task:
        if not args.question:
            what = f"questions about{about}" if about else "questions"
            raise ValueError(f"{args.checkpoint} answers {what}: pass --question")
        if len(args.question) not in (1, len(inputs)):
            raise ValueError(f"{len(inputs)} --{key} but {len(args.question)} --question")
        questions = args.question * (len(inputs) if len(args.question) == 1 else 1)
        texts = pred.answer(inputs, questions)
    else:
        if args.question:
            raise ValueError(f"{args.checkpoint} captions{about} (task {pred.task!r}): drop "
                             "--question")
        texts = pred.caption(inputs)
    for i, text in enumerate(texts):
        if args.json:
            row = {key: inputs[i]}
            row.update({"question": questions[i], "answer": text} if pred.task == qa_task
                       else {"caption": text})
            print(json.dumps(row))
        else:
            print(text if len(texts) == 1 else f"{inputs[i]}\t{text}")
    return 0


def _predict(args) -> int:
    from mplug_jax.predict import Predictor, VideoPredictor
    if args.min_length is not None and args.max_length is not None \
            and args.min_length > args.max_length:
        raise ValueError(f"--min-length {args.min_length} is above --max-length "
                         f"{args.max_length}: no output could satisfy both")
    if bool(args.image) == bool(args.video):
        raise ValueError("pass --image (photos) or --video (video files / frame folders), "
                         "not both or neither")
    if args.video and args.task in ("ground", "grounding", "vqa", "caption"):
        raise ValueError(f"--task {args.task} takes --image; videos use --task video_qa or "
                         "video_caption (or an mPLUG-2 workdir without --task)")
    if args.task in ("ground", "grounding"):
        return _ground(args)
    if args.video:
        pred = VideoPredictor.from_checkpoint(args.checkpoint, task=args.task, step=args.step,
                                              beam_size=args.beam_size,
                                              min_length=args.min_length,
                                              max_length=args.max_length)
        return _answer_or_caption(args, pred, args.video, "video", "video_qa", " videos")
    pred = Predictor.from_checkpoint(args.checkpoint, task=args.task, step=args.step,
                                     beam_size=args.beam_size, min_length=args.min_length,
                                     max_length=args.max_length)
    if isinstance(pred, VideoPredictor):
        raise ValueError(f"{args.checkpoint} is an mPLUG-2 video checkpoint (task "
                         f"{pred.task!r}): pass --video (a video file or frame folder), not "
                         "--image")
    if pred.task == "grounding":
        return _ground(args, pred)
    return _answer_or_caption(args, pred, args.image, "image", "vqa", "")


def _score(args) -> int:
    from mplug_jax import scoring
    metrics = scoring.score_file(args.task, args.results, args.annotations)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _train(rest: list[str]) -> int:
    from mplug_jax import main as train_main
    return train_main.run(["mplug-jax train"] + rest)


class _ConfigOverridesParser(argparse.ArgumentParser):
    """Subcommand parser that keeps `--config.a.b=value` overrides (ml_collections syntax) in
    `args.overrides` and the subcommand's raw arguments in `args.argv` (for re-exec)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        overrides = [a for a in args if a.startswith("--config.")]
        ns, rest = super().parse_known_args([a for a in args if a not in overrides], namespace)
        ns.overrides, ns.argv = overrides, args
        return ns, rest


def _reexec_with_cpu_devices(args) -> None:
    """Re-run this subcommand with `args.devices` fake CPU devices, unless already done.

    XLA reads the device count once, when the backend starts, so a fresh process is the only
    reliable way (the caller may have imported and started JAX already). The fake-device
    program is compiled, never run: -O0 codegen (memory and FLOPs are fixed before LLVM runs;
    same numbers on `tiny`) makes planning `large` minutes faster.
    """
    n = str(args.devices)
    if os.environ.get("MPLUG_FAKE_DEVICES") == n:
        return
    env = dict(os.environ, MPLUG_FAKE_DEVICES=n, JAX_PLATFORMS="cpu")
    if getattr(args, "debug", False):
        env[errors.DEBUG_ENV] = "1"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    fast = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    flags += [f for f in fast if f.split("=")[0] not in env.get("XLA_FLAGS", "")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mplug_jax.cli", args.command, *args.argv],
              env)


def _shardings(args) -> int:
    if args.devices:
        _reexec_with_cpu_devices(args)
    from mplug_jax import plan
    config = plan.load_config(args.config, args.overrides)
    print("# mplug-jax shardings " + " ".join(args.argv))
    print(plan.state_table(config), end="")
    return 0


def _plan(args) -> int:
    if args.devices:
        _reexec_with_cpu_devices(args)
    from mplug_jax import plan
    config = plan.load_config(args.config, args.overrides)
    print("# mplug-jax plan " + " ".join(args.argv))
    result = plan.plan(config, device_memory_gb=args.device_memory_gb)
    print(plan.format_plan(result), end="", flush=True)
    return 0 if result.fits else 3


def _schedule(args) -> int:
    from mplug_jax import lr_schedule, plan
    config = plan.load_config(args.config, args.overrides)
    json_path, png = lr_schedule.write_lr_table(config, args.steps_per_epoch, args.out)
    print(f"wrote the learning rate of every optimizer group at every update "
          f"(optim.schedule={config.optim.schedule}) to {json_path} and {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mplug-jax", description=__doc__,
                                epilog=compilation_cache.HELP)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("parity", help="compare our model with an official golden fixture")
    s.add_argument("--fixture", action="append", required=True,
                   help="fixture folder (docs/fixtures.md); repeat for several")
    s.add_argument("--image-atol", type=float, default=1e-4,
                   help="max abs difference allowed for image preprocessing")
    s.set_defaults(fn=_parity)

    s = sub.add_parser("convert", help="official PyTorch checkpoint -> mplug-jax checkpoint dir")
    s.add_argument("--checkpoint", required=True, help=".pth / .pt / .bin / .safetensors")
    s.add_argument("--config-bert", required=True, help="official config_bert*.json")
    s.add_argument("--config-yaml", help="official task yaml (gives image_res)")
    s.add_argument("--image-size", type=int, help="override the image resolution "
                   "(positional embeddings are resized bilinearly)")
    s.add_argument("--strict", action="store_true",
                   help="fail if any of our params (incl. pretraining heads) is missing")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(fn=_convert)

    s = sub.add_parser("export", help="mplug-jax checkpoint -> official state dict")
    s.add_argument("--ckpt", required=True,
                   help="a `convert` output dir or a pretraining workdir")
    s.add_argument("--out", required=True, help="output .safetensors or .pth")
    s.add_argument("--step", type=int, help="workdir step (default: latest)")
    s.add_argument("--momentum", action="store_true", help="export the momentum params")
    s.set_defaults(fn=_export)

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
    s.set_defaults(fn=_predict)

    s = sub.add_parser("score", help="score a result file in a task's official format "
                       "against official annotations; prints the metrics JSON")
    from mplug_jax import scoring
    s.add_argument("--task", required=True, choices=scoring.TASKS,
                   help="task whose result format and metrics to use "
                   "(mplug_jax/scoring/<task>.py)")
    s.add_argument("--results", required=True, help="result file (ours or the official code's)")
    s.add_argument("--annotations", required=True, help="annotation file in the official format")
    s.add_argument("--out", help="also write the metrics JSON here")
    s.set_defaults(fn=_score)

    s = sub.add_parser("train", help="train: same flags as `python -m mplug_jax.main`",
                       add_help=False)
    s.set_defaults(fn=None)

    for name, fn, help_ in (
            ("evaluate", _evaluate, "run a config's evaluators on a checkpoint: metrics JSON "
                                    "and the result files each benchmark takes"),
            ("shardings", _shardings, "print the sharding of every train-state leaf"),
            ("plan", _plan, "compile the train step ahead of time: per-device memory, FLOPs, "
                            "fits or not")):
        s = sub.add_parser(name, help=help_, description=help_ + ". Config fields can be "
                           "overridden with --config.a.b=value (ml_collections syntax).")
        s.__class__ = _ConfigOverridesParser  # keep the --config.x=y overrides
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
    s.__class__ = _ConfigOverridesParser  # keep the --config.x=y overrides
    s.add_argument("--config", required=True, help="config file[:arg], e.g. configs/vqa.py:base")
    s.add_argument("--steps-per-epoch", type=int, required=True,
                   help="optimizer updates per epoch (train examples // input.batch_size)")
    s.add_argument("--out", required=True, help="output .json (the plot: same name, .png)")
    s.set_defaults(fn=_schedule)

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
            return _train(rest[1:])
        args = build_parser().parse_args(rest)
        args.debug = debug  # kept by a re-exec (_reexec_with_cpu_devices)
        return int(args.fn(args) or 0)

    return errors.guarded(command, debug)


if __name__ == "__main__":
    sys.exit(main())
