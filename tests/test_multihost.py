"""Two local processes (2 fake CPU devices each, gloo collectives over loopback) train `tiny`.

Phase 1: both processes start (`distributed.maybe_initialize` from MPLUG_* env) and train under
the `fsdp` preset (params, optimizer state and queues split across the processes' devices).
Only process 1 gets a SIGTERM (after step 2), as when a scheduler preempts one host: both
processes must stop at the same step and checkpoint (orbax: every process writes its shards and
its own grain iterator state). Phase 2: both restart in the same workdir, resume, and this time
only process 0 gets a SIGTERM, two steps after the resume. The losses of every step (written by
process 0 only) equal one process running the same global batches (process 0's local batch,
then process 1's: `make_global_batch` order) on 1 device.

This file is also the worker: `python tests/test_multihost.py WORKDIR SIGNAL_AT_STEP PROCESS`.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
STOP_AT, EVAL_AT, LOCAL_DEVICES, PROCESSES = 2, 3, 2, 2


def mh_config():
    """The strategy tests' config on synthetic records; only loop settings differ, so the
    1-device step compiled there is the reference here (same schedule: total_steps 20)."""
    from test_sharding_strategies import small_config
    c = small_config("fsdp", {"data": 2, "fsdp": 2, "tensor": 1})  # 4 devices in 2 processes
    c.input.train_size = 64
    c.log_every_steps, c.ckpt_every_steps = 1, 100
    c.peak_flops = 1e9  # no matmul benchmark at start-up
    # A periodic held-out evaluation at step 3 runs across both processes.
    c.evals.heldout.update(every_steps=EVAL_AT, num_examples=16, batch_size=8, num_captions=2,
                           max_decode_len=6)
    return c


def worker(workdir: str, stop_at: int, signalled: int) -> None:
    from mplug_jax import distributed
    distributed.maybe_initialize()  # from MPLUG_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
    import jax
    from mplug_jax import metrics, trainer
    assert jax.process_count() == PROCESSES and jax.device_count() == PROCESSES * LOCAL_DEVICES
    write = metrics.MetricWriter.write

    def write_then_stop(self, step, scalars, console=True):
        write(self, step, scalars, console)
        if step == stop_at and jax.process_index() == signalled:
            signal.raise_signal(signal.SIGTERM)  # this process only; both must stop together

    metrics.MetricWriter.write = write_then_stop
    result = trainer.run(mh_config(), workdir)
    print("RESULT " + json.dumps({"process": jax.process_index(), "step": result["step"],
                                  "stopped": result["stopped"]}), flush=True)


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(0)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mplug_jax import metrics  # noqa: E402

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: pathlib.Path, stop_at: int, signalled: int, cache: pathlib.Path,
            timeout: int = 300):
    """Run both processes to completion; returns their stdout texts."""
    port = _free_port()
    procs, logs = [], []
    for pid in range(PROCESSES):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MPLUG_", "SLURM_"))}
        env.update(
            MPLUG_COORDINATOR=f"127.0.0.1:{port}", MPLUG_NUM_PROCESSES=str(PROCESSES),
            MPLUG_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
            # The suite's codegen flags (tests/conftest.py) with this process's device count;
            # the resume compiles hit the cache.
            XLA_FLAGS=" ".join([f for f in os.environ["XLA_FLAGS"].split()
                                if not f.startswith("--xla_force_host_platform_device_count")]
                               + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"]),
            JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        log = open(workdir.parent / f"{workdir.name}_stop{stop_at}_p{pid}.log", "w+")
        procs.append(subprocess.Popen([sys.executable, __file__, str(workdir), str(stop_at),
                                       str(signalled)],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    for pid, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"process {pid} exited with {p.returncode}:\n{text[-4000:]}"
    return texts


def _result(text: str) -> dict:
    return json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])


def reference_run(steps: int) -> tuple[list[dict], dict]:
    """One process, one device, the same global batches: [p0 local batch; p1 local batch].
    Returns (metrics of every step, held-out metrics at step EVAL_AT)."""
    from mplug_jax.data.inputs import pretrain as pretrain_input
    from mplug_jax.evaluators.pretrain_zeroshot import Evaluator
    from test_sharding_strategies import one_device_step
    from mplug_jax import trainer
    from mplug_jax.data.pipeline import make_global_batch
    config = mh_config()
    inp = config.input
    source = pretrain_input.source(inp, "train", inp.train_size, config.model.image_size,
                                   config.seed)
    shards = [iter(pretrain_input.dataset(source, image_size=config.model.image_size,
                                    batch_size=inp.batch_size // PROCESSES,
                                    max_words=inp.max_words, max_tokens=inp.max_tokens,
                                    seed=inp.shuffle_seed, train=True, augment=None,
                                    shard_index=i, shard_count=PROCESSES))
              for i in range(PROCESSES)]
    s, step, mesh = one_device_step()
    state = trainer.init_state(s, config.seed)
    out, evals = [], None
    for i in range(steps):
        local = [next(it) for it in shards]
        batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        state, m = step(state, make_global_batch(batch, mesh))
        out.append(metrics.to_floats(m))
        if i + 1 == EVAL_AT:
            evals = Evaluator(s.task.predict_fns(), config.evals.heldout, config,
                              mesh=mesh).run(state.params)
    return out, evals


def test_two_processes_train_checkpoint_resume(tmp_path):
    if not jax.config.values.get("jax_cpu_collectives_implementation"):
        pytest.skip("this jax build has no CPU cross-process collectives (gloo)")
    workdir, cache = tmp_path / "run", tmp_path / "xla_cache"
    texts = _launch(workdir, STOP_AT, 1, cache)
    results = [_result(t) for t in texts]
    stop1 = results[0]["step"]  # the agreed step: the signalled process's step or a later one
    assert stop1 >= STOP_AT and results == [
        {"process": i, "step": stop1, "stopped": "sigterm"} for i in range(PROCESSES)]
    ckpt = workdir / "ckpt" / str(stop1)
    assert {f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)} <= set(
        os.listdir(ckpt / "data_iter"))  # one grain iterator state per process
    texts = _launch(workdir, stop1 + 2, 0, cache)
    results = [_result(t) for t in texts]
    stop2 = results[0]["step"]
    assert stop2 >= stop1 + 2 and results == [
        {"process": i, "step": stop2, "stopped": "sigterm"} for i in range(PROCESSES)]
    assert "resumed from" in texts[0]
    # Only process 0 writes metrics and console rows.
    assert f"step {stop1 + 1}/" in texts[0] and f"step {stop1 + 1}/" not in texts[1]
    rows = [r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, stop2 + 1))
    ref, ref_evals = reference_run(stop2)
    for r, want in zip(rows, ref, strict=True):
        for k in ("train/loss", "train/loss_itc", "train/loss_itm", "train/loss_mlm",
                  "train/loss_prefix_lm", "train/l2_grads"):
            # float32 reductions split over 4 devices vs 1: ~1e-6 relative.
            np.testing.assert_allclose(r[k], want[k], rtol=2e-5, err_msg=f"step {r['step']} {k}")
    # The periodic held-out evaluation ran on both processes' devices, like 1 device.
    evals = [r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl"))
             if "heldout/itm_acc" in r]
    assert [r["step"] for r in evals] == list(range(EVAL_AT, stop2 + 1, EVAL_AT))
    for k in ("i2t_r1", "t2i_r1", "itm_acc", "mlm_acc"):
        assert evals[0][f"heldout/{k}"] == pytest.approx(ref_evals[k]), k
