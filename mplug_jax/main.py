"""Command-line entry point of the training loop.

    python -m mplug_jax.main --config=configs/pretrain.py:tiny --workdir=DIR [--config.x=y ...]

`--config` is an ml_collections config file with its argument after ':'; every field can be
overridden with `--config.a.b=value` (list fields: `a.json,b.json` or `'["a.json", "b.json"]'`,
see `mplug_jax.config_args`). The run resumes automatically from DIR's checkpoints.

A bad config or input prints one `error: ...` line and exits with status 2 (`--debug` or
MPLUG_JAX_DEBUG=1: the traceback, see `mplug_jax.errors`); a run stopped by SIGTERM exits 143.
A finished run writes what it printed at the end (the final evals) with the machine, load
average, commit and wall time to DIR/results/summary.json (`mplug_jax.run_summary`).
"""
from __future__ import annotations

import sys
import time

from absl import flags, logging

from mplug_jax import config_args, errors


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).", flag_values=fv)
    flags.DEFINE_bool("debug", False, "Show the traceback of config and input errors.",
                      flag_values=fv)
    flags.DEFINE_string(
        "compilation_cache", None, "Directory of JAX's persistent compilation cache ('off' "
        "disables it); default $MPLUG_JAX_CACHE_DIR, else ~/.cache/mplug_jax/jax_cache.",
        flag_values=fv)


def run(argv: list[str]) -> int:
    """Parse `argv` (argv[0]: the program name) and train; returns the exit status (0 done,
    143 stopped by SIGTERM). Config and input errors raise (`mplug_jax.errors`)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__.strip())
        return 0
    fv = config_args.parse_flags(argv, _define_flags, lock=True)
    if not fv.workdir:
        raise errors.ConfigError("--workdir is required (the run directory)")
    flags.FLAGS.mark_as_parsed()  # absl logging: no "logging before flag parsing" notice
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint stage at INFO
    from mplug_jax import compilation_cache
    compilation_cache.setup(fv.compilation_cache)  # before anything compiles
    from mplug_jax import distributed
    distributed.maybe_initialize()  # no-op for single-process runs
    from mplug_jax import run_summary, trainer
    load_start = run_summary.load_average()
    result = trainer.run(fv.config, fv.workdir)
    if result["stopped"] == "done":
        import jax
        if jax.process_index() == 0:
            summary = run_summary.build(
                fv.config, result, fv.workdir, argv, wall_s=time.perf_counter() - t0,
                cpu_s=time.process_time() - cpu0, load_avg_start=load_start)
            print(f"wrote {run_summary.write(fv.workdir, summary)} ({summary['wall_s']:.0f} s "
                  f"wall)", flush=True)
    return 0 if result["stopped"] == "done" else 143  # 128 + SIGTERM: the scheduler sees it


def cli(argv: list[str] | None = None) -> int:
    """`python -m mplug_jax.main ARGS` (and `mplug-jax train ARGS` through `mplug_jax.cli`):
    train, with config and input errors as one line (`errors.guarded`). Returns the status."""
    argv = list(sys.argv if argv is None else argv)
    return errors.guarded(lambda: run(argv), debug=errors.debug_requested(argv[1:]))


if __name__ == "__main__":
    sys.exit(cli())
