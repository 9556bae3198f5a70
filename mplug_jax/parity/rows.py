"""One row of a parity report and what every fixture kind shares: comparing arrays, checking
the image preprocessing, printing the table."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mplug_jax.data.ops.image import load_image


@dataclasses.dataclass
class Row:
    """A compared array or check: its largest error against the tolerance, and the verdict."""

    name: str
    shape: tuple
    max_err: float
    tol: float
    ok: bool
    note: str = ""


def compare_arrays(got: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                   tols: dict[str, float], exact: Any = (), default_tol: float = 1e-5,
                   skip: Any = ()) -> list[Row]:
    """One Row per expected array: max |got - expected| <= tols[name] (default_tol when not
    listed), or exact equality for names in `exact` (integer arrays: count of mismatches)."""
    rows = []
    for name, want in expected.items():
        if name in skip:
            continue
        is_exact = name in exact
        tol = 0.0 if is_exact else float(tols.get(name, default_tol))
        if name not in got:
            rows.append(Row(name, tuple(want.shape), float("inf"), tol, False, "not computed"))
            continue
        g = np.asarray(got[name])
        if g.shape != want.shape:
            rows.append(Row(name, tuple(want.shape), float("inf"), tol, False,
                            f"shape {g.shape}"))
            continue
        if is_exact:
            bad = float(np.sum(g != want))
            rows.append(Row(name, tuple(want.shape), bad, 0.0, bad == 0, "mismatching entries"))
            continue
        err = float(np.abs(g.astype(np.float64) - want).max()) if want.size else 0.0
        rows.append(Row(name, tuple(want.shape), err, tol, bool(err <= tol)))
    return rows


def image_row(fixture: str, images: list[dict], pixels: np.ndarray, atol: float) -> Row:
    """'preprocess:image': our test transform (`load_image`) of each fixture image file
    (`images[i]['file']`, relative to `fixture`) against the official float32[B, 3, R, R]."""
    res = pixels.shape[-1]
    err = max(float(np.abs(load_image(os.path.join(fixture, e["file"]), res)
                           .transpose(2, 0, 1) - pixels[i]).max())
              for i, e in enumerate(images[:pixels.shape[0]]))
    return Row("preprocess:image", tuple(pixels.shape), err, atol, err <= atol)


def nhwc(x: np.ndarray) -> jax.Array:
    """Official NCHW images float[B, 3, R, R] -> our float32[B, R, R, 3]."""
    return jnp.asarray(x, jnp.float32).transpose(0, 2, 3, 1)


def format_table(rows: list[Row]) -> str:
    """The report: one line per row (name, shape, max abs error, tolerance, verdict)."""
    lines = [f"{'output':<28} {'shape':<20} {'max abs err':>12} {'tolerance':>10}  ok"]
    for r in rows:
        lines.append(f"{r.name:<28} {str(r.shape):<20} {r.max_err:>12.3g} {r.tol:>10.3g}  "
                     f"{'yes' if r.ok else 'NO ' + r.note}")
    return "\n".join(lines)
