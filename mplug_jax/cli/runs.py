"""`mplug-jax train / evaluate / shardings / plan / schedule / score`: commands on a config or
a result file; the config commands take `--config.a.b=value` overrides (`ConfigOverridesParser`)
and may re-run themselves on fake CPU devices (`--devices`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from mplug_jax import errors


def _config(args):
    """The config of `--config` with its `--config.a.b=value` overrides, in a process with
    `--devices` fake CPU devices when asked (re-executed first)."""
    if getattr(args, "devices", None):
        reexec_with_cpu_devices(args)
    from mplug_jax import plan as plan_lib
    return plan_lib.load_config(args.config, args.overrides)


def evaluate(args) -> int:
    """`mplug-jax evaluate`: every eval block of a config on a checkpoint."""
    from mplug_jax import evaluate as evaluate_lib
    evaluate_lib.evaluate(_config(args), args.checkpoint, args.out, step=args.step)
    return 0


def score(args) -> int:
    """`mplug-jax score`: a result file's metrics, printed as JSON."""
    from mplug_jax import scoring
    options = {}
    if args.task == "grounding":
        options = dict(int_box=args.int_box,
                       corners=None if args.boxes is None else args.boxes == "corners")
    elif args.boxes or args.int_box:
        raise ValueError("--boxes / --int-box are for --task grounding")
    metrics = scoring.score_file(args.task, args.results, args.annotations, **options)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def train(rest: list[str]) -> int:
    """`mplug-jax train`: the flags of `python -m mplug_jax.main`."""
    from mplug_jax import main as train_main
    return train_main.run(["mplug-jax train"] + rest)


class ConfigOverridesParser(argparse.ArgumentParser):
    """Subcommand parser that keeps `--config.a.b=value` overrides (ml_collections syntax) in
    `args.overrides` and the subcommand's raw arguments in `args.argv` (for re-exec)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        overrides = [a for a in args if a.startswith("--config.")]
        ns, rest = super().parse_known_args([a for a in args if a not in overrides], namespace)
        ns.overrides, ns.argv = overrides, args
        return ns, rest


def reexec_with_cpu_devices(args) -> None:
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


def shardings(args) -> int:
    """`mplug-jax shardings`: the sharding of every train-state leaf."""
    config = _config(args)
    from mplug_jax import plan as plan_lib
    print("# mplug-jax shardings " + " ".join(args.argv))
    print(plan_lib.state_table(config), end="")
    return 0


def plan(args) -> int:
    """`mplug-jax plan`: the compiled train step's memory and FLOPs; 3 when it does not fit."""
    config = _config(args)
    from mplug_jax import plan as plan_lib
    print("# mplug-jax plan " + " ".join(args.argv))
    result = plan_lib.plan(config, device_memory_gb=args.device_memory_gb)
    print(plan_lib.format_plan(result), end="", flush=True)
    return 0 if result.fits else 3


def schedule(args) -> int:
    """`mplug-jax schedule`: every optimizer group's learning rate at every update."""
    config = _config(args)
    from mplug_jax import lr_schedule
    json_path, png = lr_schedule.write_lr_table(config, args.steps_per_epoch, args.out)
    print(f"wrote the learning rate of every optimizer group at every update "
          f"(optim.schedule={config.optim.schedule}) to {json_path} and {png}")
    return 0
