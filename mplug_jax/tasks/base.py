"""What the trainer asks of a task, and the defaults most tasks share.

The trainer (`mplug_jax.trainer`) calls, in this order: `Task.train_input(config)` (a
classmethod: process-local batches and the number of records, which fixes the epoch length),
`Task(config, steps_per_epoch)`, `init_params` / `init_extra` (abstractly first, for the
shardings), `init_from_pretrained` on a fresh state, then per step `prepare_batch` (outside jit),
`begin_step`, `loss` (under
`jax.value_and_grad`, possibly once per micro-batch) and, after the optimizer update,
`after_update`. Evaluators get `predict_fns()`. Everything a task returns is a pytree of arrays.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mplug_jax import losses, pretrained
from mplug_jax import params as P
from mplug_jax.models.mplug import MPLUG
from mplug_jax.train_state import enqueue, momentum_update


class KeyStream:
    """As many PRNG keys as asked for: the i-th `next()` is `fold_in(key, i)`.

    Replaces a fixed pool of split keys, which runs out (or is silently reused) when a loss
    grows another dropout site.
    """

    def __init__(self, key: jax.Array):
        self._key, self._count = key, 0

    def __iter__(self):
        return self

    def __next__(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count - 1)


def ramp(value: float, step: jax.Array, warmup_steps: int) -> jax.Array:
    """float32[] `value` ramped linearly from 0 over the first `warmup_steps` train steps
    (the distillation weight alpha of ALBEF / mPLUG); constant when warmup_steps <= 0."""
    a = jnp.asarray(value, jnp.float32)
    if warmup_steps <= 0:
        return a
    return a * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


def decoder_hidden(model: MPLUG, *args) -> jax.Array:
    """`MPLUG.decode` without the LM head: float[B, L, D] (so the V-way head can run on the
    target positions only); `model.apply(..., method=decoder_hidden)`."""
    return model.decoder.hidden(*args)


def decoder_head(model: MPLUG, h: jax.Array) -> jax.Array:
    """The decoder's V-way LM head on hidden states float[..., D] -> float32[..., V]."""
    return model.decoder.lm_logits(h)


def fused_states(apply: Callable, params: Any, img: jax.Array, ids: jax.Array,
                 mask: jax.Array, key: Callable[[], jax.Array | None] = lambda: None):
    """Decoder states [fused image; fused text] (VQA questions, zero-shot caption prompts).

    Args:
      apply: `(params, method, *args, rng=None)` -> the model method's output (`Task._apply`).
      img: float[B, N, D] image embeddings; ids / mask: int32[B, L] text and its mask.
      key: the dropout key of each call (text encoder, then fusion); None = eval.
    Returns:
      (float[B, N + L, D] states, int32[B, N + L] mask).
    """
    txt = apply(params, "encode_text", ids, mask, rng=key())
    f_img, f_txt = apply(params, "fuse", img, txt, mask, rng=key())
    return (jnp.concatenate([f_img, f_txt], 1),
            jnp.concatenate([jnp.ones(f_img.shape[:2], jnp.int32), mask.astype(jnp.int32)], 1))


def momentum_copy(params: dict, keep: Callable[[str], bool]) -> dict:
    """The momentum copy `extra['params_m']`: the top-level entries of `params` that `keep`
    accepts, as new arrays with the same logical-axis boxes."""
    return {k: jax.tree.map(lambda x: x, v) for k, v in params.items() if keep(k)}


def feature_queues(rng: jax.Array, size: int, dim: int) -> dict:
    """ITC feature queues as ALBEF's `normalize(randn(E, Q))`: 'image_queue' / 'text_queue'
    float32[size, dim] random unit rows, boxed with the logical axes ('queue', None) so the
    `fsdp` presets shard them like parameters, and the write pointer 'queue_ptr'."""
    k_img, k_txt = jax.random.split(rng)

    def unit(k):
        x = jax.random.normal(k, (size, dim), jnp.float32)
        return nn.LogicallyPartitioned(x / jnp.linalg.norm(x, axis=-1, keepdims=True),
                                       ("queue", None))

    return {"image_queue": unit(k_img), "text_queue": unit(k_txt),
            "queue_ptr": jnp.zeros((), jnp.int32)}


def enqueue_features(extra: dict, img_feat_m: jax.Array, txt_feat_m: jax.Array) -> dict:
    """The queues of `feature_queues` after writing this batch's momentum features
    float32[B, E] at 'queue_ptr' (pointer advanced); {} when `extra` holds no queue."""
    if "queue_ptr" not in extra:
        return {}
    ptr = extra["queue_ptr"]
    image_queue, new_ptr = enqueue(extra["image_queue"], ptr, img_feat_m)
    text_queue, _ = enqueue(extra["text_queue"], ptr, txt_feat_m)
    return {"image_queue": image_queue, "text_queue": text_queue, "queue_ptr": new_ptr}


def hard_negative_pairs(key: jax.Array, img: jax.Array, txt: jax.Array, mask: jax.Array,
                        sim_i2t: jax.Array, sim_t2i: jax.Array, matches: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The 3B ITM pairs [B positives; (hard image, text j); (image i, hard text)], the hard
    negatives drawn from the similarities float32[B, >=B] (`losses.sample_hard_negatives`,
    never where `matches` bool[B, B] is true).

    Args:
      img: float[B, N, D] image states; txt: float[B, L, D] text states; mask: int[B, L].
    Returns:
      (float[3B, N, D] images, float[3B, L, D] texts, int[3B, L] text masks).
    """
    neg_txt, neg_img = losses.sample_hard_negatives(key, sim_i2t, sim_t2i, matches)
    return (jnp.concatenate([img, img[neg_img], img], 0),
            jnp.concatenate([txt, txt, txt[neg_txt]], 0),
            jnp.concatenate([mask, mask, mask[neg_txt]], 0))


def itm_pairs_loss(apply: Callable, params: Any, img_all: jax.Array, txt_all: jax.Array,
                   mask_all: jax.Array, pools: int = 1,
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """ITM of `pools` blocks of `hard_negative_pairs` laid end to end (float[P * 3b, ...]):
    the pairs fused (dropout keyed by `rng`) and classified from the fused text [CLS], label 1
    for each block's first third.

    Args:
      apply: `(params, method, *args, rng=None)` (`Task._apply`).
    Returns:
      (float32[] ITM loss, float32[] ITM accuracy).
    """
    b = txt_all.shape[0] // (3 * pools)
    _, fused = apply(params, "fuse", img_all, txt_all, mask_all, rng=rng)
    logits = apply(params, "itm_logits", fused[:, 0])
    labels = jnp.tile(jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)]),
                      pools)
    return losses.itm_loss(logits, labels)


def itm_with_hard_negatives(apply: Callable, params: Any, key: jax.Array, img: jax.Array,
                            txt: jax.Array, mask: jax.Array, sim_i2t: jax.Array,
                            sim_t2i: jax.Array, matches: jax.Array,
                            rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """ITM over the B positive pairs, (hard image, text j) and (image i, hard text) of one pool
    (`hard_negative_pairs` then `itm_pairs_loss`): (float32[] ITM loss, float32[] accuracy)."""
    pairs = hard_negative_pairs(key, img, txt, mask, sim_i2t, sim_t2i, matches)
    return itm_pairs_loss(apply, params, *pairs, rng=rng)


def clamp_temperature(params: dict, itc) -> dict:
    """`params` with the ITC temperature clamped into [itc.temp_min, itc.temp_max] (ALBEF
    clamps it in place after every update)."""
    return {**params, "temp": jnp.clip(params["temp"], itc.temp_min, itc.temp_max)}


def refuse_synthetic(config, what: str, how: str) -> None:
    """Refuse the built-in shapes data unless `input.allow_synthetic`: `what` names the config,
    `how` says which real data to set instead."""
    inp = config.input
    if inp.dataset == "synthetic" and not inp.get("allow_synthetic", False):
        raise ValueError(f"the {config.get('variant', '')} {what} config refuses the built-in "
                         f"synthetic shapes data: {how}, or pass "
                         "--config.input.allow_synthetic=True to train on the shapes anyway")


class Task:
    """Base class of the tasks in `mplug_jax.tasks` (see module docstring for the call order).

    Subclasses set `model` in `__init__` (usually with `set_model`, which builds `model_cls`)
    and implement
    `train_input`, `dummy_batch`, `init_params`, `loss` and `predict_fns`; the rest has working
    defaults. A task that keeps a momentum copy (`extra['params_m']`) sets `momentum`.
    """

    name = "base"
    model_cls: Any = MPLUG  # built by `set_model` from `config.model` (`from_config`, `clone`)
    model: Any = None
    # How to stop `train/dropped_*` counters from growing (the trainer's warning says it).
    capacity_hint = "raise the task's target capacity"

    train_model: Any = None  # `model` with dropout on (when config.model.dropout_rate > 0)
    momentum: float = 0.995  # EMA coefficient of `extra['params_m']`

    def __init__(self, config, steps_per_epoch: int = 1):
        self.config = config
        self.steps_per_epoch = max(int(steps_per_epoch), 1)

    def set_model(self, model_cfg) -> None:
        """`model` (eval: no dropout) and `train_model` (dropout as configured) from
        `config.model`; both share one parameter tree."""
        self.model = self.model_cls.from_config(model_cfg)
        self.train_model = self.model.clone(deterministic=model_cfg.get("dropout_rate", 0) == 0)

    def dropout_keys(self, rng: jax.Array) -> Callable[[], jax.Array | None]:
        """A function giving per call the next dropout key of `rng` (`KeyStream`), or None
        (eval mode: `_apply` runs `model`) when `config.model.dropout_rate` is 0."""
        drop = KeyStream(rng)
        use_drop = self.config.model.get("dropout_rate", 0) > 0
        return lambda: next(drop) if use_drop else None

    def _apply(self, params, method, *args, rng: jax.Array | None = None):
        """A method of the model on `params`: eval mode, or with dropout keyed by `rng`."""
        if rng is None:
            return self.model.apply({"params": params}, *args, method=method)
        return self.train_model.apply({"params": params}, *args, method=method,
                                      rngs={"dropout": rng})

    # ---- input ----------------------------------------------------------------------------

    @classmethod
    def train_input(cls, config) -> tuple[Any, int]:
        """(iterator of process-local numpy batches, records per epoch).

        The iterator must be checkpointable (`get_state` / `set_state`, as grain's)."""
        raise NotImplementedError

    def dummy_batch(self, batch_size: int) -> dict:
        """Zero batch with the shapes and dtypes of a train batch (init and compilation)."""
        raise NotImplementedError

    # ---- state ----------------------------------------------------------------------------

    def init_params(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) params."""
        raise NotImplementedError

    def init_extra(self, params: Any, rng: jax.Array) -> dict:
        """State the optimizer does not update (momentum params, queues); boxed like params."""
        return {}

    def require_init(self, what: str) -> None:
        """Refuse to start from random weights unless `init.allow_scratch`: `what` says which
        config and which `--config.init...` flags it needs."""
        init = self.config.get("init")
        if not pretrained.requested(init) and not (init and init.get("allow_scratch")):
            raise ValueError(f"the {self.config.get('variant', '')} {what}, or pass "
                             "--config.init.allow_scratch=True to train from random weights")

    def init_from_pretrained(self, state):
        """A fresh TrainState with its params (and a momentum copy, if the task keeps one)
        overwritten from `config.init` (`mplug_jax.pretrained`); unchanged when none is set.

        Subclasses adapt names with `pretrained_rename` / `pretrained_skip` /
        `adapt_pretrained`, or read other sources with `load_pretrained`."""
        init_cfg = self.config.get("init")
        if not pretrained.requested(init_cfg):
            return state
        loaded = self.load_pretrained(init_cfg)
        params, flat = self._put_pretrained(state.params, loaded.params)
        extra = dict(state.extra)
        if "params_m" in extra:
            extra["params_m"], _ = self._put_pretrained(
                extra["params_m"], loaded.momentum or loaded.params, self.momentum_filter(),
                "momentum")
        # Top-level entries nothing was loaded into (e.g. new heads) stay at their init.
        random = sorted({k.split("/", 1)[0] for k in P.flatten(state.params)}
                        - {k.split("/", 1)[0] for k in flat})
        if jax.process_index() == 0:
            print(f"initialised {len(flat)} arrays from " + ", ".join(loaded.sources)
                  + (f"; random: {', '.join(random)}" if random else ""), flush=True)
        return state.replace(params=params, extra=extra)

    def load_pretrained(self, init_cfg) -> pretrained.Loaded:
        """The flat arrays of the sources `init_cfg` names (default `pretrained.load`: CLIP,
        BERT or a whole mPLUG)."""
        return pretrained.load(init_cfg, self.model)

    def pretrained_params(self, params):
        """`params` (a sharded tree of this task's model) with the arrays of `config.init` put
        in, adapted as `init_from_pretrained` adapts them: what `mplug-jax evaluate` scores."""
        return self._put_pretrained(params, self.load_pretrained(self.config.init).params)[0]

    def _put_pretrained(self, tree, source, keep: Callable[[str], bool] | None = None,
                        what: str = "params"):
        """(`tree` with the selected / adapted arrays of `source` put in, those arrays)."""
        flat = self.adapt_pretrained(pretrained.select(source, self.pretrained_rename(),
                                                       self.pretrained_skip()))
        if keep is not None:
            flat = {k: v for k, v in flat.items() if keep(k)}
        return pretrained.put(tree, flat, self.model, what), flat

    def adapt_pretrained(self, flat: dict) -> dict:
        """The selected pretrained arrays {name: array} as this model takes them (default
        unchanged; NLVR2 copies the cross-attention into its second branch)."""
        return flat

    def pretrained_rename(self) -> dict[str, str]:
        """{regex: replacement} applied to pretrained names (default none)."""
        return {}

    def pretrained_skip(self) -> tuple[str, ...]:
        """Regexes of pretrained names not to load (default none)."""
        return ()

    def momentum_filter(self) -> Callable[[str], bool]:
        """Which flat param names the momentum copy holds (default all)."""
        return lambda name: True

    # ---- step -----------------------------------------------------------------------------

    def prepare_batch(self, params: Any, batch: dict) -> dict:
        """Called by the trainer on each global batch right before the jitted step, outside
        jit, with the current params (e.g. SCST: search + host-side rewards added as arrays
        sharded like the batch). Must be deterministic given params and batch (bit-identical
        resume) and keep the shapes of `train_input`'s batches. Default: the batch unchanged."""
        return batch

    def begin_step(self, params: Any, extra: dict) -> dict:
        """Once per optimizer step, before the loss: the EMA update of the momentum copy
        `extra['params_m']` (with `momentum`) when the task keeps one."""
        if "params_m" not in extra:
            return extra
        return {**extra, "params_m": momentum_update(
            extra["params_m"], {k: params[k] for k in extra["params_m"]}, self.momentum)}

    def loss(self, params: Any, extra: dict, batch: dict, rng: jax.Array, step: jax.Array):
        """-> (float32[] loss, (metrics {name: float32[]}, new extra))."""
        raise NotImplementedError

    def after_update(self, params: Any) -> Any:
        """Once per optimizer step, after the update (e.g. clamping a temperature)."""
        return params

    # ---- evaluation -----------------------------------------------------------------------

    def predict_fns(self) -> dict[str, Callable]:
        """{name: fn(params, *arrays)} for the evaluators of `config.evals`."""
        return {}
