"""Optimizer: optax AdamW with regex learning-rate groups, a weight-decay mask and schedules.

Mirrors the official `create_two_optimizer` (torch AdamW, betas 0.9/0.999, eps 1e-8): the visual
encoder gets its own learning rate (`lr_groups.vision`, a multiplier of the base lr) and
biases / LayerNorm parameters get no weight decay. Unlike the official grouping (which only
exempts names containing "bias" or "LayerNorm.weight", so CLIP's ln_1/ln_2 are decayed), every
LayerNorm here is exempt, as the issue asks. Schedules (`optim.schedule`, per group, over
optimizer updates):
  'cosine'        ours: linear warm-up from 0 to the group's peak over `warmup_steps` updates,
                  then a per-update cosine to `end_lr` (shared by all groups, like timm's lr_min);
  'constant'      linear warm-up from 0, then the peak;
  'epoch_cosine'  the official mPLUG fine-tuning scripts' schedule (`epoch_cosine_schedule`):
                  every group starts at `warmup_lr`, climbs (or descends) to its own peak in
                  `warmup_stairs` stairs of `stair_microbatches` micro-batches during epoch 0,
                  then holds one cosine value per epoch.
Optional global-norm clipping. `frozen` (optional regex): matching parameters get no update at
all (no weight decay either), e.g. the heads a fine-tuning task never reads. Gradient
accumulation is not an optimizer wrapper here: the train step itself scans over micro-batches
(`trainer.make_train_step`), so every step is one optimizer update.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]
BASE_GROUP = "base"
FROZEN_GROUP = "frozen"
SCHEDULES = ("cosine", "constant", "epoch_cosine")


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


def epoch_cosine_schedule(peak: float, *, warmup_lr: float, end_lr: float, warmup_stairs: int,
                          stair_microbatches: int, accum_steps: int, steps_per_epoch: int,
                          num_epochs: float) -> Schedule:
    """The official mPLUG fine-tuning schedule of one lr group, as a function of the update.

    Official loop (vqa/caption/retrieval/grounding_mplug.py with timm's CosineLRScheduler,
    t_initial = epochs, warmup_t = warmup_stairs, warmup_prefix): every group starts at
    `warmup_lr`; in epoch 0, after the optimizer step of micro-batch i (i = 0, 100, 200, ...,
    100 * warmup_stairs) the scheduler moves to stair t = i // 100, i.e. to
    warmup_lr + t * (peak - warmup_lr) / warmup_stairs, and stair `warmup_stairs` is the peak,
    held for the rest of epoch 0. Epoch e >= 1 holds
    end_lr + (peak - end_lr) * (1 + cos(pi * e / num_epochs)) / 2 (the last epoch stays above
    end_lr). The scheduler call comes after micro-batch i's optimizer step (if any), so an
    update runs at the stair of the last call before its last micro-batch: with accumulation
    A, update u (last micro-batch (u + 1) * A - 1) runs at stair
    min(((u + 1) * A - 2) // stair_microbatches, warmup_stairs). A = 1: updates 0..100 at
    warmup_lr (update 100 = micro-batch 100 precedes its call), 101..200 at stair 1, ...;
    A = 4: stairs 0, 1, 2, 3 at updates 0..24, 25..49, 50..74, 75..99, the peak from 100.
    A warm-up longer than epoch 0 is cut at the end of epoch 0, as in the official loop.

    Args:
      peak: the group's learning rate (official lr1 / lr2).
      warmup_lr, end_lr: official `warmup_lr` / `min_lr` (shared by every group).
      warmup_stairs: official `warmup_epochs` (number of stairs; 0 = start at the peak).
      stair_microbatches: micro-batches per stair (official step_size 100).
      accum_steps: micro-batches per optimizer update.
      steps_per_epoch: optimizer updates per epoch.
      num_epochs: official `epochs` (the cosine's period).
    Returns:
      update (int, traced or concrete; also an int array) -> learning rate (float32).
    """
    stairs, size, accum = int(warmup_stairs), int(stair_microbatches), int(accum_steps)
    spe = int(steps_per_epoch)
    rise = (peak - warmup_lr) / max(stairs, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        stair = jnp.clip(((step + 1) * accum - 2) // size, 0, stairs)
        epoch = step // spe
        warm = warmup_lr + stair.astype(jnp.float32) * rise
        cos = end_lr + 0.5 * (peak - end_lr) * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))
        return jnp.where((epoch == 0) & (stair < stairs), warm, cos).astype(jnp.float32)

    return schedule


def _epoch_cosine_args(optim_cfg, total_steps: int, steps_per_epoch: int | None) -> dict:
    """Checked keyword arguments of `epoch_cosine_schedule` (all but the peak)."""
    missing = [k for k in ("warmup_lr", "warmup_stairs", "stair_microbatches")
               if k not in optim_cfg]
    if missing:
        raise ValueError(f"optim.schedule='epoch_cosine' needs optim.{', optim.'.join(missing)} "
                         f"(configs/common.py finetune_optim sets them)")
    if steps_per_epoch is None or int(steps_per_epoch) < 1:
        raise ValueError("optim.schedule='epoch_cosine' needs the optimizer updates per epoch "
                         f"(steps_per_epoch >= 1), got {steps_per_epoch}")
    if int(optim_cfg.warmup_stairs) < 0 or int(optim_cfg.stair_microbatches) < 1:
        raise ValueError("optim.warmup_stairs must be >= 0 and optim.stair_microbatches >= 1, "
                         f"got {optim_cfg.warmup_stairs} / {optim_cfg.stair_microbatches}")
    return dict(warmup_lr=float(optim_cfg.warmup_lr), end_lr=float(optim_cfg.end_lr),
                warmup_stairs=int(optim_cfg.warmup_stairs),
                stair_microbatches=int(optim_cfg.stair_microbatches),
                accum_steps=max(int(optim_cfg.get("accum_steps", 1)), 1),
                steps_per_epoch=int(steps_per_epoch),
                num_epochs=total_steps / int(steps_per_epoch))


def make_schedules(optim_cfg, total_steps: int, steps_per_epoch: int | None = None
                   ) -> dict[str, Schedule]:
    """Learning-rate schedule per group, keyed by group name ('base' + `lr_groups`).

    Args:
      optim_cfg: the `optim` config block (lr, lr_groups, schedule, end_lr; 'cosine' /
        'constant': warmup_steps; 'epoch_cosine': warmup_lr, warmup_stairs,
        stair_microbatches, accum_steps).
      total_steps: number of optimizer updates (= train steps).
      steps_per_epoch: optimizer updates per epoch; required by 'epoch_cosine', whose cosine
        period is total_steps / steps_per_epoch epochs.
    """
    if optim_cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule optim.schedule={optim_cfg.schedule!r}; valid: "
                         f"{', '.join(SCHEDULES)}")
    peaks = {BASE_GROUP: optim_cfg.lr}
    for name, g in optim_cfg.lr_groups.items():
        peaks[name] = optim_cfg.lr * g.mult
    if optim_cfg.schedule == "epoch_cosine":
        kw = _epoch_cosine_args(optim_cfg, total_steps, steps_per_epoch)
        return {name: epoch_cosine_schedule(peak, **kw) for name, peak in peaks.items()}
    warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
    out = {}
    for name, peak in peaks.items():
        if optim_cfg.schedule == "cosine":
            out[name] = optax.warmup_cosine_decay_schedule(
                0.0, peak, warmup, max(total_steps, warmup + 1), optim_cfg.end_lr)
        else:
            out[name] = optax.join_schedules(
                [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                [warmup])
    return out


def make_optimizer(optim_cfg, params, total_steps: int, steps_per_epoch: int | None = None
                   ) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """AdamW chain for `params` (a plain or abstract param tree; only paths are used).

    Args:
      optim_cfg: config block with lr, lr_groups{name: {pattern, mult}}, wd, no_wd, b1, b2,
        eps, warmup_steps, schedule, end_lr, clip_norm (0 = off), optionally frozen (regex of
        parameters never updated; '' = none).
      params: the param pytree the optimizer will update.
      total_steps: train steps of the run (each one optimizer update on one global batch).
      steps_per_epoch: optimizer updates per epoch (required by schedule 'epoch_cosine').
    Returns:
      (transformation, {group: schedule over optimizer updates}).
    """
    schedules = make_schedules(optim_cfg, max(total_steps, 1), steps_per_epoch)
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
