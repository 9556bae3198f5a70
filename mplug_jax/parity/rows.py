"""One row of a parity report (shared by the fixture kinds of `parity` and `parity_tasks`)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Row:
    """A compared array or check: its largest error against the tolerance, and the verdict."""

    name: str
    shape: tuple
    max_err: float
    tol: float
    ok: bool
    note: str = ""
