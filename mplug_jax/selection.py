"""When the trainer evaluates, which checkpoint it selects, and which checkpoint a stage starts
from.

Cadence (keys of a `config.evals.<name>` block; the trainer's periodic evaluations):
- `every_steps`: after every N-th update (0 = off);
- `every_epochs`: at the end of every k-th epoch (k may be fractional; 0 = off), where an epoch
  is `steps_per_epoch` updates (the run's `<workdir>/epochs.json`);
- `from_epoch`: periodic evaluations only from epoch index `from_epoch` on, counted from 0 as
  the official loops count them (VQA's test result files: 5 = the last three of 8 epochs);
- `enabled` (default True): False = never run (e.g. a test split whose file is not given);
- every enabled block not in `config.test_on_best` also runs once on the final params.

Selection: `config.best` = {eval, metric, mode} keeps the best state under `<workdir>/best/`
(`workdir.BestKeeper`); after a completed run every block named in `config.test_on_best` runs
on that selected checkpoint, its result files under `<workdir>/results/<name>_step<N>/` with N
the selected step, its metrics logged at the final step with `<name>/selected_step` = N.

Stage chaining: `init.select` says which checkpoint of a training workdir `init.checkpoint`
loads: '' / 'latest' (the newest, or `init.step` when > 0), 'best' (`<workdir>/best/`) or
'epoch:N' (the checkpoint saved at the end of epoch N, counted from 0 as the official
`checkpoint_%02d.pth` files are: 'epoch:3' = after 4 epochs; the source run must keep it,
`ckpt_every_epochs`).
"""
from __future__ import annotations

import json
import re
import time

import jax
from etils import epath

from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import metrics as mlib
from mplug_jax.evaluators import common as evaluators

EPOCHS = "epochs.json"  # {"steps_per_epoch", "total_steps", "batch_size"} of a workdir's run
_EPOCH = re.compile(r"epoch:(\d+)")


def log(msg: str) -> None:
    """Console line from process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def epoch_period(every_epochs: float, steps_per_epoch: int) -> int:
    """Updates between two evaluations (or saves) every `every_epochs` epochs (>= 1)."""
    return max(int(round(float(every_epochs) * steps_per_epoch)), 1)


def due(ecfg, step: int, steps_per_epoch: int) -> bool:
    """Whether eval block `ecfg` is due after update `step` (1-based; see module docstring)."""
    if not ecfg.get("enabled", True):
        return False
    if (step - 1) // max(steps_per_epoch, 1) < int(ecfg.get("from_epoch", 0) or 0):
        return False
    every = int(ecfg.get("every_steps", 0) or 0)
    if every > 0 and step % every == 0:
        return True
    epochs = float(ecfg.get("every_epochs", 0) or 0)
    return epochs > 0 and step % epoch_period(epochs, steps_per_epoch) == 0


def ckpt_due(config, step: int, steps_per_epoch: int) -> bool:
    """Whether a checkpoint is due after `step` by `ckpt_every_steps` / `ckpt_every_epochs`."""
    if step % config.ckpt_every_steps == 0:
        return True
    epochs = float(config.get("ckpt_every_epochs", 0) or 0)
    return epochs > 0 and step % epoch_period(epochs, steps_per_epoch) == 0


def keep_period(config, steps_per_epoch: int) -> int | None:
    """orbax `keep_period`: the epoch checkpoints of `ckpt_every_epochs` are never rotated out
    by `keep_ckpts` (a later stage may start from one, `init.select='epoch:N'`)."""
    epochs = float(config.get("ckpt_every_epochs", 0) or 0)
    return epoch_period(epochs, steps_per_epoch) if epochs > 0 else None


def final_names(config) -> list[str]:
    """The eval blocks run on the final params: every enabled one not in `test_on_best`."""
    on_best = set(config.get("test_on_best", ()) or ())
    return [n for n, e in config.get("evals", {}).items()
            if e.get("enabled", True) and n not in on_best]


def write_epochs(workdir: epath.Path, steps_per_epoch: int, total_steps: int,
                 batch_size: int) -> None:
    """`<workdir>/epochs.json`: how updates map to epochs (read by `init.select='epoch:N'`)."""
    if jax.process_index() == 0:
        (workdir / EPOCHS).write_text(json.dumps(
            {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
             "batch_size": batch_size}, indent=2) + "\n")


def run_evals(config, s, params, step: int, writer: mlib.MetricWriter, built: dict, *,
              names=None, periodic: bool = False, selected: str = "",
              log_step: int | None = None) -> dict:
    """Run eval blocks on `params` (the state at update `step`): the blocks due at `step`
    (`periodic`), else `names` (default `final_names`). Writes `<name>/<metric>` metrics rows
    at `log_step` (default `step`) and the result files under
    `<workdir>/results/<name>_step<step>/`. `built` caches evaluators. `selected`: what
    `params` are (console, and a `<name>/selected_step` metric). Returns {name: metrics} of
    the blocks that ran."""
    out = {}
    if periodic:
        todo = [n for n, e in config.evals.items() if due(e, step, s.steps_per_epoch)]
    else:
        todo = final_names(config) if names is None else list(names)
    for name in todo:
        ecfg = config.evals[name]
        if name not in built:
            built[name] = evaluators.build(name, ecfg, config, s.task.predict_fns(), s.mesh)
        ev = built[name]
        t = time.perf_counter()
        res = ev.run(params)
        files = evaluators.write_files(res, writer.workdir / "results" / f"{name}_step{step}")
        row = {f"{name}/{k}": v for k, v in evaluators.scalars(res).items()}
        if selected:
            row[f"{name}/selected_step"] = step
        writer.write(step if log_step is None else log_step, row, console=False)
        where = f" on {selected}" if selected else ""
        log(f"== eval '{name}' at step {step}{where} ({time.perf_counter() - t:.0f}s)\n"
            + ev.report(res) + "".join(f"\nwrote {p}" for p in files))
        out[name] = res
    return out


def keep_best(best, step: int, evals: dict, state) -> None:
    """Hand `evals` to the best-checkpoint keeper (`config.best`), if there is one."""
    msg = best.update(step, evals, state) if best is not None else None
    if msg:
        log(msg)


def test_on_best(config, s, best, state, step: int, writer, built: dict) -> tuple[dict, int]:
    """Run `config.test_on_best` on the selected checkpoint (`best`'s); the final `state` at
    `step` when nothing was ever selected (with a warning). Returns ({name: metrics}, the
    step of the params evaluated)."""
    names = [n for n in config.get("test_on_best", ()) or () if n in config.get("evals", {})
             and config.evals[n].get("enabled", True)]
    if not names:
        return {}, step
    found = None
    if best is not None:
        best.ckpt.wait()
        found = best.ckpt.restore_latest(s.abstract, s.shardings, None)
    if found is None:
        log(f"WARNING: no checkpoint was selected by config.best (no {config.best.get('eval')}"
            f"/{config.best.get('metric')} value): test_on_best runs on the final params")
        params, at, what = state.params, step, f"the final params (step {step})"
    else:
        params, at = found[0].params, found[1]
        what = (f"the selected checkpoint (best {best.eval}/{best.metric} = {best.value:.4g}, "
                f"step {at})")
    # Logged at the final step: a row at the (earlier) selected step would be dropped as
    # 'not seen' when a later run resumes from the final checkpoint.
    return run_evals(config, s, params, at, writer, built, names=names, selected=what,
                     log_step=step), at


def init_source(init_cfg) -> tuple[epath.Path, int | None]:
    """(workdir, step or None = its newest) that `init.checkpoint` (a training workdir) loads
    by `init.select` and `init.step`; a one-line error when that checkpoint is not there."""
    path = ckpt_lib.resolve(init_cfg.checkpoint)
    select = str(init_cfg.get("select", "") or "latest")
    step = int(init_cfg.get("step", 0) or 0) or None
    if select == "latest":
        return path, step
    if step is not None:
        raise ValueError(f"init.select={select!r} and init.step={step} both pick a checkpoint: "
                         "set one of them")
    if select == "best":
        best = path / "best"
        if not (best / "config.json").exists():
            raise FileNotFoundError(f"init.select='best': {path} has no best checkpoint "
                                    f"({best}; it is kept when the run sets config.best)")
        return best, None
    m = _EPOCH.fullmatch(select)
    if not m:
        raise ValueError(f"init.select={select!r}: expected 'latest', 'best' or 'epoch:N'")
    record = path / EPOCHS
    if not record.exists():
        raise FileNotFoundError(f"init.select={select!r}: {path} has no {EPOCHS} (how its "
                                "updates map to epochs); pick a step with init.step instead")
    spe = int(json.loads(record.read_text())["steps_per_epoch"])
    return path, (int(m.group(1)) + 1) * spe


def check_select(select) -> str | None:
    """Why `init.select` is not a valid value, or None."""
    text = str(select or "latest")
    if text in ("latest", "best") or _EPOCH.fullmatch(text):
        return None
    return f"init.select={select!r} must be 'latest', 'best' or 'epoch:N' (N >= 0)"
