"""Faults and bad input around a workdir: kill -9 mid-save plus a damaged newest checkpoint,
the workdir lock (live and dead holders), the config check before anything is written, and
metrics.jsonl cut short by a killed writer."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vqa as vqa_config
from mplug_jax import checkpoint, metrics, trainer, workdir, workdir_lock
from test_trainer import _losses, loop_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def kill_config():
    """`loop_config` checkpointing every 2 steps (2, 4, 6), all kept."""
    c = loop_config()
    c.ckpt_every_steps, c.keep_ckpts = 2, 5
    return c


# Run by the test in a subprocess: trains `kill_config` and SIGKILLs itself right after the
# asynchronous save of step 6 has started (its files are being written).
KILLED_RUN = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from mplug_jax import checkpoint, trainer
from test_reliability import kill_config
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
    out = save(self, step, *args, **kwargs)
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
checkpoint.Checkpointer.save = save_then_die
trainer.run(kill_config(), sys.argv[1])
"""


def _garble(step_dir: pathlib.Path) -> int:
    """Overwrite every array data file of a saved state with garbage; returns how many."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        p.write_bytes(b"\x00garbage" * 8)
    return len(files)


@pytest.mark.integration
def test_kill9_mid_save_and_a_damaged_latest_step_resume_bit_identically(tmp_path, capsys):
    """kill -9 while step 6 is being written, then step 4's array files garbled and a row cut
    short in metrics.jsonl: the rerun skips step 4 (saying why), resumes from step 2, takes
    over the dead run's lock, and logs steps 3-6 once each, bit-identical to the killed run's
    uninterrupted first pass; the undone rows and the cut one move to metrics.dropped.jsonl."""
    wd = tmp_path / "run"
    code = KILLED_RUN.format(repo=str(REPO), tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(wd)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    first = _losses(wd)  # the killed run's rows: one uninterrupted pass over steps 1-6
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    ck = checkpoint.Checkpointer(wd / "ckpt", keep=None, async_save=False, create=False)
    assert ck.all_steps() == [2, 4]  # step 6 never finalised
    ck.close()
    lock = json.loads((wd / workdir_lock.LOCK).read_text())
    assert lock["pid"] > 0 and lock["pid"] != os.getpid()  # left behind by the dead run
    assert _garble(wd / "ckpt" / "4") > 0
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a row cut short
    capsys.readouterr()

    out = trainer.run(kill_config(), str(wd))
    assert out["stopped"] == "done" and out["step"] == 6
    logs = capsys.readouterr()
    assert "skipping checkpoint step 4" in logs.err
    assert f"took over the lock of pid {lock['pid']}" in logs.out
    assert "at step 2 (unreadable newer steps kept as 4.unreadable)" in logs.out
    again = _losses(wd)  # also asserts that no step is logged twice
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in again:
        assert again[step] == first[step], step  # bit-identical floats, every train metric
    dropped = (wd / "metrics.dropped.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in dropped[:-1]] == [3, 4, 5, 6]
    assert dropped[-1] == '{"step": 7, "train/lo'
    assert (wd / "losses.png").exists() and not (wd / workdir_lock.LOCK).exists()
    assert (wd / "ckpt" / "4.unreadable").is_dir()


def _tiny_state_and_iter():
    it = grain.MapDataset.range(10).to_iter_dataset().__iter__()
    next(it), next(it)
    return {"w": jnp.arange(4.0)}, it


def test_restore_latest_skips_an_empty_iterator_state_and_fails_in_one_line(tmp_path):
    """An empty data_iter JSON (step 2) is skipped for step 1 with a one-line warning; when no
    step can be read, one `CheckpointError` names each step and why; a chosen unreadable step
    is one line too."""
    state, it = _tiny_state_and_iter()
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", keep=None, async_save=False)
    ck.save(1, state, it, force=True)
    next(it)
    ck.save(2, {"w": state["w"] + 1}, it, force=True)
    ck.close()
    (tmp_path / "ckpt" / "2" / "data_iter" / "process_0-of-1.json").write_text("")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    sh = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", keep=None, async_save=False, create=False)
    warned = []
    fresh = _tiny_state_and_iter()[1]
    got, step = ck.restore_latest(abstract, sh, fresh, warn=warned.append)
    assert step == 1 and np.array_equal(got["w"], state["w"]) and next(fresh) == 2
    assert len(warned) == 1 and "step 2" in warned[0] and "JSONDecodeError" in warned[0]
    (tmp_path / "ckpt" / "1" / "data_iter" / "process_0-of-1.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError) as err:
        ck.restore_latest(abstract, sh, fresh, warn=warned.append)
    assert "no checkpoint of" in str(err.value) and "step 2: " in str(err.value)
    assert "step 1: " in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint step 2 of .* cannot be"):
        ck.restore_step(2, abstract, sh, fresh)
    ck.close()


def test_read_arrays_reads_only_the_named_parts_on_one_device(tmp_path, monkeypatch):
    """`Checkpointer.read_arrays` (what `workdir.restore_params` uses): the named subtrees of a
    state saved sharded over every device, with the saved shapes, on the first device alone;
    a part the step lacks is left out, and nothing else (the optimizer state) comes back. The
    direct tensorstore read gives what orbax's general restore gives."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    w = jax.device_put(jnp.arange(16.0).reshape(8, 2), split)
    state = {"params": {"w": w, "b": jnp.ones(3, jnp.bfloat16)}, "extra": {},
             "opt_state": {"mu": jnp.zeros((8, 2))}}
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", keep=None, async_save=False)
    ck.save(3, state, None, force=True)
    ck.close()
    ck = checkpoint.Checkpointer(tmp_path / "ckpt", keep=None, async_save=False, create=False)
    got = ck.read_arrays(3, ("params", "extra/params_m"))
    assert set(got) == {"params"} and set(got["params"]) == {"w", "b"}
    assert got["params"]["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.asarray(w))
    for leaf in jax.tree.leaves(got):
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with pytest.raises(checkpoint.CheckpointError, match="step 4 of .* cannot be read"):
        ck.read_arrays_step(4, ("params",))
    direct = checkpoint._read_local_arrays(tmp_path / "ckpt" / "3" / "state", ("params",))
    assert direct is not None and set(direct["params"]) == {"w", "b"}  # not orbax's path
    monkeypatch.setattr(checkpoint, "_read_local_arrays", lambda directory, keys: None)
    via_orbax = ck.read_arrays(3, ("params", "extra/params_m"))
    assert jax.tree.structure(via_orbax) == jax.tree.structure(got)
    for x, y in zip(jax.tree.leaves(via_orbax), jax.tree.leaves(got)):
        assert x.dtype == y.dtype and x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ck.close()


def test_restore_params_falls_back_to_the_newest_readable_step(tmp_path, pretrain_workdir,
                                                               capsys):
    """predict / export / evaluate (`restore_params`): a garbled latest step is skipped for
    the one before it, with a warning; asking for that step by number is a one-line error."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(pretrain_workdir, run)
    assert _garble(run / "ckpt" / "2") > 0
    _, want, _ = workdir.restore_params(pretrain_workdir, step=1)
    _, got, _ = workdir.restore_params(run)
    assert "skipping checkpoint step 2" in capsys.readouterr().err
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(checkpoint.CheckpointError, match="step 2 of .* cannot be read"):
        workdir.restore_params(run, step=2)


def test_a_second_trainer_is_refused_while_the_first_holds_the_workdir(tmp_path):
    held = workdir_lock.WorkdirLock.acquire(tmp_path)  # the first trainer, in this process
    try:
        with pytest.raises(workdir_lock.WorkdirBusy,
                           match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            trainer.run(loop_config(), str(tmp_path))
        assert not (tmp_path / "config.json").exists() and not (tmp_path / "ckpt").exists()
    finally:
        held.release()
    assert not (tmp_path / workdir_lock.LOCK).exists()


@pytest.mark.integration
def test_a_lock_held_by_another_process_then_left_by_it_dead(tmp_path):
    """A live holder in another process is named in the refusal; once it is killed (-9, no
    cleanup: its lock file stays) the next trainer takes the workdir over."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mplug_jax.workdir_lock import "
         "WorkdirLock; WorkdirLock.acquire(sys.argv[1]); print('held', flush=True); "
         "time.sleep(120)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid} on host"):
            workdir_lock.WorkdirLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["pid"] == holder.pid
    lock = workdir_lock.WorkdirLock.acquire(tmp_path)
    try:
        assert f"took over the lock of pid {holder.pid}" in lock.note
        assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    """Filesystems without flock: a live pid on this host or any pid on another host keeps
    the workdir; a dead pid on this host is taken over."""
    monkeypatch.setattr(workdir_lock, "_flock", lambda fd: None)
    path = tmp_path / workdir_lock.LOCK
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    path.write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "earlier"}))
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getppid()} on host {host}"):
        workdir_lock.WorkdirLock.acquire(tmp_path)
    path.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(workdir_lock.WorkdirBusy, match="delete the lock file"):
        workdir_lock.WorkdirLock.acquire(tmp_path)
    path.write_text(json.dumps({"pid": dead.pid, "host": host, "started": "earlier"}))
    lock = workdir_lock.WorkdirLock.acquire(tmp_path)
    assert f"took over the lock of pid {dead.pid}" in lock.note
    lock.release()


def _checkpointed_workdir(path: pathlib.Path, cfg) -> bytes:
    """A workdir whose config.json is `cfg`'s and whose ckpt/ holds a step directory."""
    workdir.write_config(workdir.resolve(path), cfg)
    (path / "ckpt" / "2").mkdir(parents=True)
    return (path / "config.json").read_bytes()


def test_another_task_into_a_checkpointed_workdir_is_refused_before_any_write(tmp_path):
    before = _checkpointed_workdir(tmp_path, loop_config())
    vqa = vqa_config.get_config("tiny,mode=smoke")
    with pytest.raises(workdir.ConfigMismatch, match="task 'pretrain' != 'vqa'.*"
                       "--config.init.checkpoint="):
        trainer.run(vqa, str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == before
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / workdir_lock.LOCK).exists()  # released on the refusal


def test_config_check_allows_extending_a_run_and_refuses_another_model(tmp_path):
    wd = workdir.resolve(tmp_path)
    _checkpointed_workdir(tmp_path, loop_config())
    longer = loop_config()
    longer.total_steps, longer.optim.lr = 60, 1e-4  # extending a run: fine
    longer.model.update(dtype="bfloat16", remat_policy="full")  # same params: fine
    workdir.check_resumable(wd, longer)
    wider = loop_config()
    wider.model.hidden_size = 64
    with pytest.raises(workdir.ConfigMismatch, match="model.hidden_size 32 != 64"):
        workdir.check_resumable(wd, wider)
    (tmp_path / "ckpt" / "2").rmdir()
    workdir.check_resumable(wd, wider)  # no checkpoint: nothing to lose, no check


def test_metrics_jsonl_cut_short_is_read_and_continued(tmp_path, capsys):
    """A partial last row (writer killed) is skipped with a warning by every reader (the
    loss plot included); the next writer starts a fresh line; `keep_until` moves rows past
    a step, and the cut one, to metrics.dropped.jsonl."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.5}\n'
                    '{"step": 3, "train/lo')
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2]
    assert "skipped unparsable line(s) [3]" in capsys.readouterr().err
    assert metrics.plot_losses(tmp_path) is not None
    w = metrics.MetricWriter(tmp_path)
    w.write(4, {"train/loss": 2.0}, console=False)
    w.close()
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 4]
    assert path.read_text().splitlines()[2] == '{"step": 3, "train/lo'
    w = metrics.MetricWriter(tmp_path)
    assert "moved 3 rows past step 1" in w.keep_until(1)
    assert w.keep_until(1) is None  # nothing left to move
    w.close()
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1]
    moved = (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()
    assert moved == ['{"step": 2, "train/loss": 2.5}', '{"step": 3, "train/lo',
                     '{"step": 4, "train/loss": 2.0}']


def test_workdir_and_checkpoint_refusals_are_one_line_errors():
    """The command-line entries report a busy workdir, a config mismatch and an unreadable
    checkpoint as one `error:` line with exit status 2 (`errors.guarded`), not a traceback."""
    from mplug_jax import errors

    for err in (workdir_lock.WorkdirBusy("run is busy"), workdir.ConfigMismatch("other task"),
                checkpoint.CheckpointError("step 4 cannot be read")):
        assert errors.is_user_error(err)

        def fail(err=err):
            raise err
        assert errors.guarded(fail) == errors.EXIT_USER_ERROR
