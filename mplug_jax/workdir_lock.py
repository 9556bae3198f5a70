"""One trainer per workdir: `<workdir>/train.lock`, held for the whole run.

The lock is an exclusive `fcntl.flock` on the lock file, so the kernel drops it when its holder
exits or is killed (kill -9 included): a lock file left by a dead run is taken over at once.
The file records the holder (pid, host, start time) for the refusal message. Where the
filesystem has no flock (some FUSE mounts), the recorded holder decides instead: a live pid
on this host, or any pid on another host (whose liveness cannot be checked), keeps the
workdir; a dead pid on this host is taken over.

Multi-process runs: only process 0 takes the lock (`workdir_guard.claim` shares its verdict).
Remote workdirs (gs://, s3://) have no atomic lock here and are not locked.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from mplug_jax.errors import ConfigError

LOCK = "train.lock"


class WorkdirBusy(ConfigError):
    """Another trainer holds the workdir."""


def _proc_start(pid: int) -> str | None:
    """Start time of process `pid` in clock ticks since boot (Linux), telling a reused pid
    from the recorded one; None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(info: dict) -> bool:
    """Whether the recorded holder runs on this host (pid alive and not reused)."""
    pid = int(info.get("pid", -1))
    if info.get("host") != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    recorded, now = info.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or str(recorded) == now


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _holder(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('started', '?')}")


def _flock(fd: int) -> bool | None:
    """True: locked; False: another holder has it; None: the filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


class WorkdirLock:
    """The held lock of one workdir (`acquire`, then `release` when the run ends)."""

    def __init__(self, path: str, fd: int, note: str):
        self.path, self._fd, self.note = path, fd, note

    @classmethod
    def acquire(cls, workdir) -> "WorkdirLock | None":
        """Take `<workdir>/train.lock`, or raise `WorkdirBusy` naming the holder at once.

        Returns None for remote workdirs (not lockable). `note` of the result says when the
        lock of a dead run was taken over ('' otherwise)."""
        if "://" in str(workdir):
            return None
        os.makedirs(str(workdir), exist_ok=True)
        path = os.path.join(str(workdir), LOCK)
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            held = _flock(fd)
            info = _read(path)
            if held is False or (held is None and info and (
                    _alive_here(info) or info.get("host") != socket.gethostname())):
                os.close(fd)
                raise WorkdirBusy(
                    f"workdir {workdir} is in use by another trainer: {_holder(info)} (lock "
                    f"{path}); wait for it to end or pick another --workdir"
                    + ("" if held is False else "; if that run is dead, delete the lock file"))
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:  # the previous holder removed it as we opened it
                same = False
            if not same:
                os.close(fd)
                continue
            mine = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"), "proc_start": _proc_start(os.getpid())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
            note = (f"took over the lock of {_holder(info)}, which no longer runs"
                    if info.get("pid") else "")
            return cls(path, fd, note)
        raise WorkdirBusy(f"could not take the lock {path}: it keeps being replaced")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # before unlocking: a waiter re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
