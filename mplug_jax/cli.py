"""`mplug-jax` command line: parses arguments and calls library functions, nothing else."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parity(args) -> int:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from mplug_jax.interop.parity import format_table, run_parity
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


def _convert(args) -> int:
    from mplug_jax.interop import convert, official
    overrides = {"image_size": args.image_size} if args.image_size else None
    allow = None if args.strict else official.HEADS_ABSENT_IN_TASK_CHECKPOINTS
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
    from mplug_jax.interop import convert, official
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
        from mplug_jax import checkpoint as ckpt_lib
        model, params, momentum = ckpt_lib.load_for_export(args.ckpt, step=args.step)
        chosen = momentum if args.momentum else params
        state = convert.export_official(chosen, model, None if args.momentum else momentum)
        start = 0
    official.save_state_dict(state, args.out)
    bert, yml = official.official_config_files(convert.model_kwargs(model), start)
    base = os.path.splitext(args.out)[0]
    with open(base + ".config_bert.json", "w") as f:
        json.dump(bert, f, indent=2)
    with open(base + ".config.yaml", "w") as f:
        import yaml
        yaml.safe_dump(yml, f)
    print(f"wrote {len(state)} tensors to {args.out} (+ {base}.config_bert.json, "
          f"{base}.config.yaml)")
    return 0


def _train(args, rest) -> int:
    from mplug_jax import main as train_main
    return train_main.cli([sys.argv[0]] + rest) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mplug-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("parity", help="compare our model with an official golden fixture")
    s.add_argument("--fixture", action="append", required=True,
                   help="fixture folder (FORMAT.md); repeat for several")
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

    s = sub.add_parser("train", help="train: same flags as `python -m mplug_jax.main`",
                       add_help=False)
    s.set_defaults(fn=None)

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
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return _train(None, argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
