"""The learning rate of every optimizer group at every update of a run (`mplug-jax schedule`).

Evaluates the schedules `optim.make_schedules` builds for a config, so what it writes is what
the train step uses (`trainer.make_train_step` logs the same values as train/lr, train/lr_<group>).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from mplug_jax import optim, trainer


def lr_table(config, steps_per_epoch: int) -> dict[str, list[float]]:
    """{group: [lr at update 0, 1, ..., total_steps - 1]} for every lr group of `config.optim`.

    Args:
      config: a full run config (`optim`, `total_steps` / `total_epochs`).
      steps_per_epoch: optimizer updates per epoch (the trainer uses train examples //
        input.batch_size); sets the run length of epoch-based configs and the epochs of the
        'epoch_cosine' schedule.
    Returns:
      group name ('base', and e.g. 'vision') -> float list of length total_steps.
    """
    if int(steps_per_epoch) < 1:
        raise ValueError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
    total = trainer.total_steps(config, int(steps_per_epoch))  # the trainer's run length rule
    if total < 1:
        raise ValueError(f"the run has no optimizer updates (total_steps {total})")
    schedules = optim.make_schedules(config.optim, total, int(steps_per_epoch))
    steps = np.arange(total, dtype=np.int32)
    out = {}
    for name, schedule in schedules.items():
        values = np.broadcast_to(np.asarray(jax.jit(schedule)(steps), np.float32), (total,))
        # The float32 the train step uses, written in its shortest form (1e-05, not 9.99e-06).
        out[name] = [float(str(v)) for v in values]
    return out


def plot_lr_table(table: dict[str, list[float]], path: str, title: str = "",
                  steps_per_epoch: int = 0) -> None:
    """PNG of the learning rate per group over updates; dotted lines at epoch boundaries
    (when `steps_per_epoch` > 0 and there are at most 50 of them)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    n = max((len(v) for v in table.values()), default=0)
    if steps_per_epoch > 0 and n // steps_per_epoch <= 50:
        for e in range(1, (n - 1) // steps_per_epoch + 1):
            ax.axvline(e * steps_per_epoch, color="0.8", linestyle=":", linewidth=1)
    for name, values in table.items():
        ax.plot(np.arange(len(values)), values, label=name, linewidth=1.5)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=10)
    ax.legend(title="group")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_lr_table(config, steps_per_epoch: int, out: str) -> tuple[str, str]:
    """Write `lr_table` as JSON to `out` and its plot beside it (same name, .png).

    Returns (json path, png path)."""
    table = lr_table(config, steps_per_epoch)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with open(out, "w") as f:
        json.dump(table, f)
    png = os.path.splitext(out)[0] + ".png"
    title = (f"{config.task.name}: optim.schedule={config.optim.schedule}, "
             f"{steps_per_epoch} updates per epoch, {len(next(iter(table.values())))} updates")
    plot_lr_table(table, png, title, int(steps_per_epoch))
    return out, png
