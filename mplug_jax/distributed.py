"""Multi-process start-up: `jax.distributed.initialize` only when the run spans processes.

Single-process runs need nothing. A multi-process run is detected from, in order:
  1. explicit settings: env MPLUG_COORDINATOR (host:port), MPLUG_NUM_PROCESSES, MPLUG_PROCESS_ID
     (what `launch/` scripts and the 2-process test set);
  2. SLURM with more than one task (SLURM_NTASKS > 1; JAX reads SLURM_* itself);
  3. a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts; JAX reads the metadata).
"""
from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)
_initialized = False
_barriers = 0


def _explicit() -> dict | None:
    addr = os.environ.get("MPLUG_COORDINATOR")
    if not addr:
        return None
    try:
        return dict(coordinator_address=addr,
                    num_processes=int(os.environ["MPLUG_NUM_PROCESSES"]),
                    process_id=int(os.environ["MPLUG_PROCESS_ID"]))
    except KeyError as err:
        raise RuntimeError(f"MPLUG_COORDINATOR is set but {err.args[0]} is not: set "
                           "MPLUG_NUM_PROCESSES and MPLUG_PROCESS_ID too") from err


def needs_initialize() -> bool:
    """Whether this process is one of several (see module docstring)."""
    if _explicit():
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize() -> None:
    """Call `jax.distributed.initialize` once if the run spans processes; else do nothing.

    Must run before anything touches a JAX device.
    """
    global _initialized
    if _initialized or not needs_initialize():
        return
    kwargs = _explicit() or {}
    if kwargs and os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU multi-process runs (tests, debugging) need a cross-process collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count())


def _client():
    from jax._src import distributed as jax_distributed  # the client orbax's barriers use too
    return jax_distributed.global_state.client


def _key(name: str) -> str:
    global _barriers
    _barriers += 1  # every process makes the same calls in the same order
    return f"mplug_{name}_{_barriers}"


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process has reached this point; nothing in a single-process run.

    Goes through JAX's coordination service, not a device collective: CPU (gloo) collectives
    give up after 30 s, so the first one after a compile fails when another process is still
    compiling (a loaded host compiles the same program much later). Call it after each compile
    that precedes a collective."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(_key(name), timeout_s * 1000)


def from_process0(name: str, value: str, timeout_s: int = 1800) -> str:
    """Process 0's `value` on every process (e.g. a verdict only process 0 can reach, such as
    the workdir lock's); `value` itself in a single-process run. Coordination service, no
    device collective."""
    if jax.process_count() == 1:
        return value
    key = _key(name)
    if jax.process_index() == 0:
        _client().key_value_set(key, value)
        return value
    return _client().blocking_key_value_get(key, timeout_s * 1000)


def all_true(name: str, ok: bool, timeout_s: int = 1800) -> bool:
    """Whether `ok` holds on every process (e.g. each read its part of a checkpoint)."""
    if jax.process_count() == 1:
        return ok
    key, client = _key(name), _client()
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if ok else "0")
    return all(client.blocking_key_value_get(f"{key}/{i}", timeout_s * 1000) == "1"
               for i in range(jax.process_count()))
