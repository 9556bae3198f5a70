"""Device prefetch: the next global batch is read and put on the devices while a step runs.

`DevicePrefetch` wraps a checkpointable host iterator (grain's). The loop takes a batch
(`next`), dispatches the step (asynchronous) and then calls `prefetch()`, which reads the next
host batch and starts its transfer while the devices compute. Its `get_state()` is the host iterator's state *before* that buffered
batch, so a checkpoint written after step t resumes with batch t + 1 and resumed runs see
exactly the batches an uninterrupted run sees. It satisfies grain's orbax checkpoint handler
(bytes state, `set_state`, `start_prefetch`).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator


class DevicePrefetch:
    """Iterator of device batches, one ahead.

    Args:
      host_iter: iterator of process-local numpy batches with `get_state()` / `set_state()`.
      put: local numpy batch -> global device batch (e.g. `pipeline.make_global_batch`).
    """

    def __init__(self, host_iter: Iterator, put: Callable[[Any], Any]):
        self._it, self._put = host_iter, put
        self._state = None  # host state before the buffered batch
        self._next = None

    def _fill(self) -> None:
        self._state = self._it.get_state()
        self._next = self._put(next(self._it))  # device_put is asynchronous

    def __iter__(self):
        return self

    def __next__(self):
        if self._next is None:
            self._fill()
        batch, self._next = self._next, None
        return batch

    def prefetch(self) -> None:
        """Read the next batch and start its transfer (no-op when one is buffered)."""
        if self._next is None:
            self._fill()

    def peek(self):
        """The batch the next `next()` returns (fetched if needed)."""
        self.prefetch()
        return self._next

    def get_state(self) -> bytes:
        state = self._state if self._next is not None else self._it.get_state()
        return json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        self._it.set_state(json.loads(state))
        self._next = None

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; filling is lazy here."""
