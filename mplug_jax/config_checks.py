"""Checks of a whole run config before anything is built: `check(config, ...)`.

Called first by `trainer.run`, `evaluate.evaluate` and `plan.plan`, so a bad value or a missing
input file stops a run in a second with one `ConfigError` that lists every problem found,
instead of failing minutes later inside the input pipeline, the optimizer or a compile.

What is checked (fields are found by name anywhere in the config, so every task's config is
covered; a field a config lacks is skipped):

- `task.name` is a task module;
- value ranges: sizes and counts >= 1 (`batch_size`, `beam_size`, `max_length`, ...), steps,
  rates and weights >= 0, fractions in [0, 1]; `min_length <= max_length` wherever a block has
  both (the decoding settings);
- training: exactly one of `total_steps` / `total_epochs` set; `input.batch_size` divisible by
  the processes and by the mesh's batch shards times `optim.accum_steps`; `task.negatives`
  'per_device' with at least 2 rows per batch shard per loss call;
- `task.negatives` is one of `mplug_jax.negatives.CHOICES`;
- evaluation and selection (`mplug_jax.selection`): `best` names an enabled eval block and a
  metric, mode 'max' / 'min'; every `test_on_best` name is an eval block and `best` is set;
  an eval block's `input` names only `config.input` fields; `init.select` is 'latest' /
  'best' / 'epoch:N' and not combined with `init.step`;
- the workdir can be written (or created);
- input files: every path a config names (annotation lists, image / video roots, dataset
  folders, `init.*` checkpoints, `resume`) exists; `init.*` and `resume` only for a run that
  starts fresh (they are not read when the workdir already holds a checkpoint), and the
  checkpoint `init.select` picks there (a workdir's `best/`, or its `epochs.json` for
  'epoch:N'). URLs (gs://...) are not checked here.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

import ml_collections
from etils import epath

from mplug_jax.errors import ConfigError

_AT_LEAST_ONE = re.compile(
    r"(.*_)?batch_size|beam_size|max_length|max_(\w+_)?tokens|max_words|max_answers|"
    r"max_decode_len|num_frames|(log|ckpt)_every_steps|keep_ckpts|max_nonfinite_steps|"
    r"accum_steps|k_test|rank_k|top_n|sim_chunk|(captions|refs)_per_\w+")
_NON_NEGATIVE = re.compile(
    r"workers|warmup_steps|total_steps|total_epochs|every_steps|every_epochs|from_epoch|"
    r"ckpt_every_epochs|log_every(_\w+)?|lr|end_lr|"
    r"wd|clip_norm|(eval|train)_size|min_length|num_examples|limit|queue_size|mult|step|"
    r"peak_flops|targets_per_question|gather_length|(\w+_)?warmup_epochs|num_samples|top_k|"
    r"temperature|eps")
_FRACTION = re.compile(r"max_skip_rate|mask_prob|momentum|distill_alpha|b1|b2|top_p|"
                       r"color_jitter_p")
# Path fields by name (`synthetic_dir` is not one: it is created on first use).
_PATH = re.compile(r"(\w+_)?annotations|(\w+_)?files?|(\w+_)?root|tfds_dir|eval_labels|"
                   r"answer_list")
_INIT_PATHS = ("clip", "bert", "checkpoint", "config_bert", "config_yaml")


def _leaves(c, prefix: str = "") -> Iterator[tuple[str, str, Any, Any]]:
    """(dotted path, field name, value, parent ConfigDict) of every non-ConfigDict field."""
    for key, value in c.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, path + ".")
        else:
            yield path, key, value, c


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def range_problems(config) -> list[str]:
    """Out-of-range values: one message per field."""
    out = []
    for path, name, value, parent in _leaves(config):
        if not _number(value) or path.startswith("model.") or path.startswith("mesh."):
            continue
        # (NaN passes: the trainer's non-finite handling is tested with a NaN learning rate.)
        if _AT_LEAST_ONE.fullmatch(name) and value < 1:
            out.append(f"{path} must be >= 1, got {value}")
        elif (_NON_NEGATIVE.fullmatch(name) or path.startswith("task.loss_weights.")) \
                and value < 0:
            out.append(f"{path} must be >= 0, got {value}")
        elif _FRACTION.fullmatch(name) and not 0 <= value <= 1:
            out.append(f"{path} must be in [0, 1], got {value}")
        if name == "max_length" and _number(parent.get("min_length")) and \
                parent.min_length > value:
            block = path[:-len(name)]
            out.append(f"{block}min_length {parent.min_length} > {block}max_length {value}")
    return out


def negatives_problems(config) -> list[str]:
    """`task.negatives` (retrieval) not one of `negatives.CHOICES`."""
    from mplug_jax import negatives
    task = config.get("task") or {}
    try:
        if "negatives" in task:
            negatives.check(task.negatives)
    except ValueError as err:
        return [str(err)]
    return []


def selection_problems(config) -> list[str]:
    """`best`, `test_on_best`, eval blocks' `enabled` / `input`, `init.select`. A config
    without any eval block (e.g. a test that drops them) selects and tests nothing, so its
    `best` and `test_on_best` are not checked against the blocks."""
    from mplug_jax import selection
    out, evals = [], config.get("evals") or {}
    enabled = [n for n, e in evals.items() if e.get("enabled", True)]
    best = config.get("best") or {}
    if best.get("eval") and evals:
        if best.eval not in enabled:
            out.append(f"best.eval={best.eval!r} is not an enabled block of config.evals "
                       f"({sorted(enabled)})")
        if not best.get("metric"):
            out.append(f"best.metric is empty: name a metric of eval {best.eval!r}")
    if best.get("mode", "max") not in ("max", "min"):
        out.append(f"best.mode must be 'max' or 'min', got {best.get('mode')!r}")
    on_best = config.get("test_on_best") or ()
    if isinstance(on_best, str) or not all(isinstance(n, str) for n in on_best):
        out.append(f"test_on_best must be a list of eval names, got {on_best!r}")
        on_best = ()
    unknown = [n for n in on_best if n not in evals]
    if unknown and evals:
        out.append(f"test_on_best names {unknown}, which are not blocks of config.evals "
                   f"({sorted(evals)})")
    if on_best and evals and not best.get("eval"):
        out.append(f"test_on_best={list(on_best)} needs best.eval (the metric that selects the "
                   "checkpoint they run on)")
    inputs = config.get("input") or {}
    for name, ecfg in evals.items():
        if not isinstance(ecfg.get("enabled", True), bool):
            out.append(f"evals.{name}.enabled must be true or false, got {ecfg.enabled!r}")
        bad = sorted(k for k in (ecfg.get("input") or {}) if k not in inputs)
        if bad:
            out.append(f"evals.{name}.input names {bad}, which are not fields of input")
    init = config.get("init") or {}
    why = selection.check_select(init.get("select", ""))
    if why:
        out.append(why)
    elif str(init.get("select", "") or "latest") != "latest" and init.get("step"):
        out.append(f"init.select={init.select!r} and init.step={init.step} both pick a "
                   "checkpoint: set one of them")
    return out


def selected_init_missing(config) -> list[str]:
    """What the checkpoint `init.select` picks lacks (`init.checkpoint` exists already)."""
    init = config.get("init") or {}
    select = str(init.get("select", "") or "latest")
    path = str(init.get("checkpoint", "") or "")
    if select == "latest" or not path or "://" in path or not _exists(path):
        return []
    root = epath.Path(path)
    if not (root / "config.json").exists() or (root / "mplug_config.json").exists():
        return [f"init.select={select!r} picks a checkpoint of a training workdir; "
                f"init.checkpoint={path} is not one (set init.select='latest')"]
    if select == "best" and not (root / "best" / "config.json").exists():
        return [f"init.select='best': {path} has no best/ (kept when its run sets config.best)"]
    if select.startswith("epoch:") and not (root / "epochs.json").exists():
        return [f"init.select={select!r}: {path} has no epochs.json (how its steps map to "
                "epochs); pick a step with init.step instead"]
    return []


def training_problems(config) -> list[str]:
    """Step count and batch divisibility (needs the device count: JAX starts here)."""
    out = []
    steps, epochs = config.get("total_steps", 0), config.get("total_epochs", 0)
    if _number(steps) and _number(epochs) and (steps > 0) == (epochs > 0):
        out.append(f"set exactly one of total_steps / total_epochs to a value > 0, got "
                   f"{steps} / {epochs}")
    inp, optim = config.get("input"), config.get("optim")
    batch = inp.get("batch_size") if inp is not None else None
    if not isinstance(batch, int) or batch < 1 or "mesh" not in config:
        return out
    import jax
    from mplug_jax import sharding
    if config.mesh.get("sharding") not in sharding.RULES:
        out.append(f"unknown mesh.sharding {config.mesh.get('sharding')!r}; valid: "
                   f"{sorted(sharding.RULES)}")
    try:
        sizes = sharding.mesh_sizes(config.mesh.shape, jax.device_count())
    except ValueError as err:
        return out + [f"mesh.shape: {err}"]
    accum = optim.get("accum_steps", 1) if optim is not None else 1
    shards = sizes["data"] * sizes["fsdp"]
    if isinstance(accum, int) and accum >= 1 and batch % (shards * accum):
        out.append(f"input.batch_size {batch} must be divisible by the {shards} batch shards "
                   f"(mesh {sizes} on {jax.device_count()} devices) times optim.accum_steps "
                   f"{accum}")
    negatives = (config.get("task") or {}).get("negatives")
    if negatives == "per_device" and isinstance(accum, int) and accum >= 1 \
            and batch // (shards * accum) < 2:
        out.append(f"task.negatives='per_device' draws negatives from each batch shard's rows: "
                   f"input.batch_size {batch} / ({shards} batch shards x optim.accum_steps "
                   f"{accum}) leaves fewer than 2 per shard")
    if batch % jax.process_count():
        out.append(f"input.batch_size {batch} is not divisible by the {jax.process_count()} "
                   "processes")
    return out


def _exists(path: str) -> bool:
    return "://" in path or epath.Path(path).exists()


def missing_inputs(config, fresh: bool = True) -> list[str]:
    """'field: path, path' for every configured input path that does not exist."""
    found: dict[str, list[str]] = {}
    for path, name, value, _ in _leaves(config):
        top = path.split(".", 1)[0]
        if top == "init":
            if not fresh or name not in _INIT_PATHS:
                continue
        elif path == "resume":
            if not fresh:
                continue
        elif not (_PATH.fullmatch(name) or ".roots." in f".{path}"):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        gone = [v for v in values if isinstance(v, str) and v and not _exists(v)]
        if gone:
            found[path] = gone
    return [f"{k}: {', '.join(v)}" for k, v in found.items()]


def unwritable(folder, what: str) -> str | None:
    """Why `folder` (created if missing) cannot be written, or None. URLs are not checked."""
    text = str(folder)
    if "://" in text:
        return None
    path = os.path.abspath(text)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{what} {text} cannot be created: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"{what} {text} is not writable ({probe} does not allow writing)"
                if probe == path else f"{what} {text} cannot be created ({probe} does not "
                                      "allow writing)")
    return None


def has_checkpoint(workdir) -> bool:
    """Whether `workdir` holds a checkpoint step folder (so `init` / `resume` are not read)."""
    if workdir is None:
        return False
    ckpt = epath.Path(str(workdir)) / "ckpt"
    try:
        return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    except OSError:
        return False


def check(config, *, workdir=None, training: bool = True, files: bool = True) -> None:
    """Raise one `ConfigError` naming every problem of `config` (see the module docstring).

    Args:
      config: a run config (ConfigDict).
      workdir: the run's workdir: it must be writable (or creatable); a checkpoint there means
        `init` / `resume` are not read.
      training: also check the step count and the batch split over devices.
      files: also check that the configured input paths exist.
    """
    from mplug_jax import tasks
    problems = []
    name = config.task.get("name") if "task" in config else None
    if tasks.canonical(name) not in tasks.available():
        problems.append(f"unknown task {name!r} (config.task.name); valid: {tasks.available()}")
    problems += range_problems(config)
    problems += selection_problems(config)
    problems += negatives_problems(config)
    if training:
        problems += training_problems(config)
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
    bad_workdir = unwritable(workdir, "workdir") if workdir is not None else None
    if bad_workdir:
        raise ConfigError(bad_workdir)
    if files:
        fresh = not has_checkpoint(workdir)
        missing = missing_inputs(config, fresh=fresh)
        if missing:
            raise ConfigError("missing input files or folders (relative paths are from the "
                              "working directory): " + "; ".join(missing))
        selected = selected_init_missing(config) if fresh else []
        if selected:
            raise ConfigError("; ".join(selected))
