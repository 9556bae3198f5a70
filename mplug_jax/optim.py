"""Optimizer: optax AdamW with regex learning-rate groups, a weight-decay mask and schedules.

Mirrors the official `create_two_optimizer` (torch AdamW, betas 0.9/0.999, eps 1e-8): the visual
encoder gets its own learning rate (`lr_groups.vision`, a multiplier of the base lr) and
biases / LayerNorm parameters get no weight decay. Unlike the official grouping (which only
exempts names containing "bias" or "LayerNorm.weight", so CLIP's ln_1/ln_2 are decayed), every
LayerNorm here is exempt, as the issue asks. Schedule: linear warm-up from 0 to the group's peak,
then cosine to `end_lr` (shared by all groups, like timm's `lr_min`). Optional global-norm
clipping. `frozen` (optional regex): matching parameters get no update at all (no weight decay
either), e.g. the heads a fine-tuning task never reads. Gradient accumulation is not an
optimizer wrapper here: the train step itself scans over micro-batches
(`trainer.make_train_step`), so every step is one optimizer update.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

Schedule = Callable[[Any], Any]
BASE_GROUP = "base"
FROZEN_GROUP = "frozen"


def path_str(path) -> str:
    """'a/b/c' for a jax key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def group_labels(params, groups: dict[str, str]) -> Any:
    """Per-leaf lr-group name: the first group whose regex matches the path, else 'base'.

    Args:
      params: param pytree (nested dicts).
      groups: {name: regex searched in the 'a/b/c' path}.
    """
    compiled = [(name, re.compile(pat)) for name, pat in groups.items()]

    def label(path, _):
        p = path_str(path)
        return next((name for name, rx in compiled if rx.search(p)), BASE_GROUP)

    return jax.tree.map_with_path(label, params)


def decay_mask(params, no_wd: str) -> Any:
    """True where weight decay applies: paths not matching the `no_wd` regex."""
    rx = re.compile(no_wd)
    return jax.tree.map_with_path(lambda path, _: rx.search(path_str(path)) is None, params)


def make_schedules(optim_cfg, total_steps: int) -> dict[str, Schedule]:
    """Learning-rate schedule per group, keyed by group name ('base' + `lr_groups`).

    Args:
      optim_cfg: the `optim` config block (lr, lr_groups, warmup_steps, end_lr, schedule).
      total_steps: number of optimizer updates (= train steps).
    """
    peaks = {BASE_GROUP: optim_cfg.lr}
    for name, g in optim_cfg.lr_groups.items():
        peaks[name] = optim_cfg.lr * g.mult
    warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
    out = {}
    for name, peak in peaks.items():
        if optim_cfg.schedule == "cosine":
            out[name] = optax.warmup_cosine_decay_schedule(
                0.0, peak, warmup, max(total_steps, warmup + 1), optim_cfg.end_lr)
        elif optim_cfg.schedule == "constant":
            out[name] = optax.join_schedules(
                [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                [warmup])
        else:
            raise ValueError(f"unknown schedule {optim_cfg.schedule!r}; valid: cosine, constant")
    return out


def make_optimizer(optim_cfg, params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """AdamW chain for `params` (a plain or abstract param tree; only paths are used).

    Args:
      optim_cfg: config block with lr, lr_groups{name: {pattern, mult}}, wd, no_wd, b1, b2,
        eps, warmup_steps, schedule, end_lr, clip_norm (0 = off), optionally frozen (regex of
        parameters never updated; '' = none).
      params: the param pytree the optimizer will update.
      total_steps: train steps of the run (each one optimizer update on one global batch).
    Returns:
      (transformation, {group: schedule over optimizer updates}).
    """
    schedules = make_schedules(optim_cfg, max(total_steps, 1))
    groups = {n: g.pattern for n, g in optim_cfg.lr_groups.items()}
    transforms = {name: optax.scale_by_learning_rate(s) for name, s in schedules.items()}
    if optim_cfg.get("frozen"):
        if FROZEN_GROUP in groups:
            raise ValueError(f"optim.lr_groups may not use the reserved name {FROZEN_GROUP!r}")
        groups = {FROZEN_GROUP: optim_cfg.frozen, **groups}  # frozen wins over lr groups
        transforms[FROZEN_GROUP] = optax.set_to_zero()
    labels = group_labels(params, groups)
    chain = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    chain += [
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        optax.add_decayed_weights(optim_cfg.wd, mask=decay_mask(params, optim_cfg.no_wd)),
        optax.multi_transform(transforms, labels),
    ]
    return optax.chain(*chain), schedules


def learning_rates(schedules: dict[str, Schedule], step) -> dict:
    """{'lr' (base group), 'lr_<group>': value} at train step `step`."""
    return {("lr" if n == BASE_GROUP else f"lr_{n}"): s(step) for n, s in schedules.items()}
