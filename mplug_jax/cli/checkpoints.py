"""`mplug-jax parity / convert / export`: official checkpoints and fixtures."""
from __future__ import annotations

import json
import os
import sys


def parity(args) -> int:
    """`mplug-jax parity`: every check of each --fixture; 1 when any fails."""
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
    from mplug_jax.mplug2 import convert as mplug2_convert
    conv = mplug2_convert.load_converted(args.ckpt)
    state = mplug2_convert.export_official(conv)
    return _write_official(state, *mplug2_convert.official_config_files(conv.model,
                                                                         conv.start_layer),
                           args.out)


def convert(args) -> int:
    """`mplug-jax convert`: an official mPLUG or mPLUG-2 checkpoint -> a converted directory."""
    from mplug_jax.interop import convert as convert_lib, official_keys
    from mplug_jax.mplug2 import convert as mplug2_convert
    if mplug2_convert.is_mplug2_config(args.config_bert):
        return _convert_mplug2(args)
    overrides = {"image_size": args.image_size} if args.image_size else None
    allow = None if args.strict else official_keys.HEADS_ABSENT_IN_TASK_CHECKPOINTS
    conv = convert_lib.load_official(args.checkpoint, args.config_bert, args.config_yaml,
                                     overrides, allow_missing=allow)
    convert_lib.save_converted(conv, args.out)
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


def export(args) -> int:
    """`mplug-jax export`: a converted directory or a workdir -> an official state dict."""
    from mplug_jax.interop import convert as convert_lib, official_config
    from mplug_jax.mplug2 import convert as mplug2_convert
    if mplug2_convert.is_converted_dir(args.ckpt):
        return _export_mplug2(args)
    if os.path.isfile(os.path.join(args.ckpt, "mplug_config.json")):
        conv = convert_lib.load_converted(args.ckpt)
        params = conv.momentum if args.momentum else conv.params
        if params is None:
            print("error: this checkpoint has no momentum params", file=sys.stderr)
            return 2
        state = convert_lib.export_official(params, conv.model, None if args.momentum else
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
        state = convert_lib.export_official(chosen, model, None if args.momentum else momentum)
        start = 0
    return _write_official(state, *official_config.official_config_files(
        convert_lib.model_kwargs(model), start), args.out)


def _write_official(state: dict, bert: dict, yml: dict, out: str) -> int:
    """Save an official state dict as `out` and its configs beside it
    (`<out base>.config_bert.json`, `<out base>.config.yaml`)."""
    import yaml
    from mplug_jax.interop import official_io
    official_io.save_state_dict(state, out)
    base = os.path.splitext(out)[0]
    with open(base + ".config_bert.json", "w") as f:
        json.dump(bert, f, indent=2)
    with open(base + ".config.yaml", "w") as f:
        yaml.safe_dump(yml, f)
    print(f"wrote {len(state)} tensors to {out} (+ {base}.config_bert.json, {base}.config.yaml)")
    return 0
