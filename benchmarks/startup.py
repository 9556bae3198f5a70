"""Start-up time of the commands with and without JAX's persistent compilation cache.

For each variant (`tiny`: the main job's model; `base`: ViT-B/16 mPLUG at 256 px, random
weights) it times, from process start, in fresh processes:
  train    `mplug-jax train --config=configs/pretrain.py:VARIANT ...` until the console line of
           step 1 (imports, data, init, compile, one step), then stops it;
  predict  `mplug-jax predict` on one photo until the answer is printed (a 1-step pretraining
           workdir of tiny captions zero-shot; base answers a question from a `convert`-layout
           directory of random weights, which is what loading an official checkpoint costs).
Each command runs with the cache off, cold (empty cache directory: compile and write) and warm
(the same directory again), counting the cache's hits and writes from JAX's monitoring events.

    python benchmarks/startup.py                      # tiny and base -> startup_cpu2.json
    python benchmarks/startup.py --variants tiny --warm-repeats 1 --out /tmp/s.json
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

# `mplug-jax ARGS` with every persistent-cache event echoed to stderr as it happens (the train
# run is stopped before it would exit).
_COUNTING = (
    "import sys; from jax import monitoring\n"
    "names = {'/jax/compilation_cache/compile_requests_use_cache': 'request',\n"
    "         '/jax/compilation_cache/cache_hits': 'hit',\n"
    "         '/jax/compilation_cache/cache_misses': 'write'}\n"
    "def on(event, **_):\n"
    "    if event in names: print('#cache ' + names[event], file=sys.stderr, flush=True)\n"
    "monitoring.register_event_listener(on)\n"
    "from mplug_jax import cli; sys.exit(cli.main(sys.argv[1:]))\n")

_TRAIN_FLAGS = {
    "tiny": ["--config.log_every_steps=1"],
    "base": ["--config.log_every_steps=1", "--config.input.allow_synthetic=True",
             "--config.init.allow_scratch=True", "--config.input.batch_size=2"],
}


def _prepare_tiny(path: str) -> None:
    """A 1-step `configs/pretrain.py:tiny` workdir (no evals), in a cache-less subprocess."""
    code = ("import sys; from configs import pretrain; from mplug_jax import trainer\n"
            "c = pretrain.get_config('tiny'); c.total_steps = 1; c.evals = {}\n"
            "trainer.run(c, sys.argv[1])\n")
    _check_call([sys.executable, "-c", code, path])


def _prepare_base(path: str) -> None:
    """A `mplug-jax convert`-layout directory of randomly initialised base weights."""
    code = ("import sys, jax; from configs import pretrain; from mplug_jax import params as P\n"
            "from mplug_jax.interop import convert; from mplug_jax.models.mplug import MPLUG\n"
            "cfg = dict(pretrain.get_config('base').model.to_dict())\n"
            "model = MPLUG.from_config(cfg)\n"
            "p = P.init_params(model, jax.random.PRNGKey(0))\n"
            "convert.save_converted(convert.Converted(model, cfg, 0, p, None, {}, [], "
            "['random weights (start-up benchmark)']), sys.argv[1])\n")
    _check_call([sys.executable, "-c", code, path])


def _env(cache: str) -> dict:
    env = dict(os.environ, MPLUG_JAX_CACHE_DIR=cache, PYTHONUNBUFFERED="1",
               PYTHONPATH=common.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_COMPILATION_CACHE_MAX_SIZE"):
        env.pop(name, None)  # only the flag under test decides
    return env


def _check_call(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=common.REPO, env=_env("off"), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{out.stderr[-3000:]}")


def timed_run(args: list[str], cache: str, until: str | None, timeout: float) -> dict:
    """Run `mplug-jax ARGS` (cache dir or 'off'); seconds from start to the first output line
    matching `until` (then the process is killed), or to its exit when `until` is None."""
    load = common.load_average()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _COUNTING, *args], cwd=common.REPO,
                            env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    events = {"request": 0, "hit": 0, "write": 0}
    seconds, lines, answer = None, [], None
    deadline = t0 + timeout
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("#cache "):
            events[line.split()[1]] += 1
            continue
        lines.append(line)
        if until is not None and re.search(until, line):
            seconds, answer = time.perf_counter() - t0, line
            proc.kill()
            break
        if time.perf_counter() > deadline:
            proc.kill()
            break
    rc = proc.wait()
    if until is None and rc == 0:
        seconds, answer = time.perf_counter() - t0, lines[-1] if lines else None
    if seconds is None:
        raise RuntimeError(f"mplug-jax {' '.join(args[:2])} (cache {cache}) gave no result "
                           f"(exit {rc}):\n" + "\n".join(lines[-30:]))
    return {"seconds": round(seconds, 2), "cpu_s": round(_children_cpu() - cpu0, 2),
            "cache_requests": events["request"],
            "cache_hits": events["hit"], "cache_writes": events["write"],
            "compiled": events["request"] - events["hit"], "output": answer,
            "load_avg_start": load, "load_avg_end": common.load_average()}


def _children_cpu() -> float:
    """User + system CPU seconds of the waited-for child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def import_time(repeats: int) -> dict:
    """Wall and CPU seconds of a fresh `python -c 'import mplug_jax.cli, mplug_jax.predict'`
    (medians; on a shared CPU the CPU seconds are what an idle machine would take)."""
    times, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _children_cpu(), time.perf_counter()
        _check_call([sys.executable, "-c", "import mplug_jax.cli, mplug_jax.predict"])
        times.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - c0)
    return {"median_s": round(statistics.median(times), 2), "times_s": [round(t, 2) for t in
                                                                       times],
            "cpu_median_s": round(statistics.median(cpus), 2)}


def measure(name: str, args: list[str], until: str | None, root: str, modes: list[str],
            warm_repeats: int, timeout: float, log, before=None) -> dict:
    """The command with the cache off, cold and warm (`warm_repeats` times); `before()` runs
    before each (e.g. removes the train workdir, so that every run starts fresh)."""
    cache = os.path.join(root, f"cache_{name}")
    out = {"command": "mplug-jax " + " ".join(args)}
    for mode in modes:
        for i in range(warm_repeats if mode == "warm" else 1):
            if before is not None:
                before()
            row = timed_run(args, "off" if mode == "off" else cache, until, timeout)
            key = mode if mode != "warm" or warm_repeats == 1 else f"warm{i + 1}"
            out[key] = row
            log(f"{name:14s} {key:6s} {row['seconds']:7.2f} s (CPU {row['cpu_s']:6.2f} s)  requests {row['cache_requests']:3d}"
                f"  hits {row['cache_hits']:3d}  writes {row['cache_writes']:3d}  "
                f"load {row['load_avg_start'][0]}")
    if os.path.isdir(cache):
        out["cache_bytes"] = sum(os.path.getsize(os.path.join(cache, f))
                                 for f in os.listdir(cache))
    warm = [v["seconds"] for k, v in out.items() if k.startswith("warm")]
    if warm and "cold" in out:
        out["warm_median_s"] = statistics.median(warm)
        out["cold_over_warm"] = round(out["cold"]["seconds"] / out["warm_median_s"], 2)
    return out


def _write(path: str, result: dict, start: float) -> None:
    """(Re)write the results so far (after every command: a long run keeps what it measured)."""
    import jax  # noqa: F401  (device facts for the header; compiles nothing)
    common.write_json(path, dict(result, load_avg_end=common.load_average(),
                                 total_s=round(time.perf_counter() - start, 1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["tiny", "base"], choices=("tiny", "base"))
    p.add_argument("--commands", nargs="+", default=["train", "predict"],
                   choices=("train", "predict"))
    p.add_argument("--warm-repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "startup_cpu2.json"))
    p.add_argument("--keep", help="work directory to use and keep (default: a temporary one)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    root = args.keep or tempfile.mkdtemp(prefix="mplug_startup_")
    os.makedirs(root, exist_ok=True)
    photo = os.path.join(root, "photo.jpg")
    try:
        from skimage import data
        from PIL import Image
        Image.fromarray(data.astronaut()).save(photo)  # a real 512x512 photo
    except ImportError:
        from PIL import Image
        Image.new("RGB", (512, 512), (180, 40, 40)).save(photo)
    result = {"what": "seconds (wall; cpu_s: user + system CPU seconds) from process start "
                      "to the first train step's console line / the predict answer (the "
                      "1-step tiny workdir captions nonsense: timing only); off = no persistent cache, cold = empty cache "
                      "(compile + write), warm = the same cache again; compiled = cache "
                      "requests - hits",
              "load_avg_start": common.load_average(), "variants": {},
              "imports": import_time(3)}
    print(f"imports (mplug_jax.cli + predict): {result['imports']['median_s']} s (CPU "
          f"{result['imports']['cpu_median_s']} s)", flush=True)
    for variant in args.variants:
        rows = result["variants"][variant] = {}
        if "predict" in args.commands:
            ckpt = os.path.join(root, f"{variant}_ckpt")
            if not os.path.exists(ckpt):
                (_prepare_tiny if variant == "tiny" else _prepare_base)(ckpt)
            pargs = ["predict", "--checkpoint", ckpt, "--image", photo]
            pargs += (["--task", "caption"] if variant == "tiny" else
                      ["--task", "vqa", "--question", "what is the woman wearing?"])
            modes = ["off", "cold", "warm"] if variant == "tiny" else ["cold", "warm"]
            rows["predict"] = measure(f"{variant}/predict", pargs, None, root, modes,
                                      args.warm_repeats, args.timeout, print)
            _write(args.out, result, start)
        if "train" in args.commands:
            wd = os.path.join(root, f"{variant}_train")
            targs = ["train", f"--config=configs/pretrain.py:{variant}", f"--workdir={wd}",
                     *_TRAIN_FLAGS[variant]]
            modes = ["off", "cold", "warm"] if variant == "tiny" else ["cold", "warm"]

            rows["train"] = measure(f"{variant}/train", targs, r"^step 1/", root, modes,
                                    args.warm_repeats, args.timeout, print,
                                    before=lambda d=wd: shutil.rmtree(d, ignore_errors=True))
            _write(args.out, result, start)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
