"""The jitted pretraining step: 1 vs 8 devices per sharding preset, non-finite skip, ablations."""
import functools

import jax
import numpy as np
import pytest

import test_sharding_strategies as strategies
from mplug_jax import tasks, trainer
from mplug_jax import sharding as shd
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.pipeline import make_global_batch

B, V = strategies.B, 128


def small_config(**loss_weights):
    """The strategy tests' config over a 128-token vocabulary with 2 fusion layers."""
    c = strategies.small_config()
    c.model.update(vocab_size=V, fusion_layers=2)
    c.task.loss_weights.update(loss_weights)
    return c


def make_batch(seed: int) -> dict:
    return strategies.make_batch(seed, B, max_id=V)


def build(config, mesh):
    s = trainer.setup(config, steps_per_epoch=10, mesh=mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(0))
    return s, trainer.compile_step(s, config, abstract)


def run_steps(s, step, mesh, batches):
    state = trainer.init_state(s, 0)
    outs = []
    for b in batches:
        state, m = step(state, make_global_batch(b, mesh))
        outs.append(jax.device_get(m))
    return state, outs


@functools.cache
def one_device():
    """(setup, compiled step, mesh) on a single device, shared by the tests below."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return (*build(small_config(), mesh), mesh)


@functools.cache
def reference_run():
    """Two steps on one device (shared by the sharding tests)."""
    state, outs = run_steps(*one_device(), [make_batch(0), make_batch(1)])
    return jax.device_get(state), outs


def test_step_updates_queue_momentum_and_skips_nonfinite():
    s, step, mesh = one_device()
    state = trainer.init_state(s, 0)
    # Momentum params apart from the online ones (right after init they are equal, and any
    # momentum, or no update at all, would give the same result).
    pm = state.extra["params_m"]
    pm = {**pm, "text_proj": jax.tree.map(lambda x: x + 0.5, pm["text_proj"])}
    state = state.replace(extra={**state.extra, "params_m": pm})
    before = jax.device_get(state)
    state, m = step(state, make_global_batch(make_batch(0), mesh))
    after = jax.device_get(state)
    # Momentum params: m * p_m + (1 - m) * p with the pre-update params (ALBEF order).
    mom = s.task.itc.momentum
    assert mom == 0.99  # the tiny preset's value, not ALBEF's 0.995
    w0, wm0 = before.params["text_proj"]["kernel"], before.extra["params_m"]["text_proj"]["kernel"]
    got = after.extra["params_m"]["text_proj"]["kernel"]
    np.testing.assert_allclose(got, mom * wm0 + (1 - mom) * w0, rtol=1e-6)
    assert np.abs(got - wm0).max() > 1e-3 and np.abs(got - (0.995 * wm0 + 0.005 * w0)).max() > 1e-4
    assert int(after.extra["queue_ptr"]) == B
    assert not np.allclose(after.extra["image_queue"][:B], before.extra["image_queue"][:B])
    np.testing.assert_array_equal(after.extra["image_queue"][B:], before.extra["image_queue"][B:])
    norms = np.linalg.norm(after.extra["text_queue"][:B], axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # momentum features are unit vectors
    assert int(m["train/nonfinite_total"]) == 0
    # A NaN in the batch: nothing but the counters and the step moves.
    bad = make_batch(1)
    bad["image"][0, 0, 0, 0] = np.nan
    state, m = step(state, make_global_batch(bad, mesh))
    skipped = jax.device_get(state)
    assert int(m["train/nonfinite_total"]) == 1 and int(m["train/nonfinite_streak"]) == 1
    assert int(skipped.step) == 2
    for x, y in zip(jax.tree.leaves((after.params, after.opt_state, after.extra)),
                    jax.tree.leaves((skipped.params, skipped.opt_state, skipped.extra))):
        np.testing.assert_array_equal(x, y)
    state, m = step(state, make_global_batch(make_batch(2), mesh))
    assert int(m["train/nonfinite_total"]) == 1 and int(m["train/nonfinite_streak"]) == 0


def test_uint8_images_step_exactly_like_their_normalised_floats():
    """input.image_dtype='uint8': the step normalises on the device to the same floats."""
    s, step, mesh = one_device()
    raw = make_batch(3)
    raw["image"] = np.random.default_rng(3).integers(0, 256, raw["image"].shape, np.uint8)
    floats = {**raw, "image": transforms.normalize(raw["image"])}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), raw)
    step_u8 = trainer.compile_step(s, small_config(), abstract)
    (st_f, (m_f,)), (st_u, (m_u,)) = (run_steps(s, fn, mesh, [b])
                                      for fn, b in ((step, floats), (step_u8, raw)))
    assert m_u["train/loss"] == m_f["train/loss"] and np.isfinite(m_u["train/loss"])
    for x, y in zip(jax.tree.leaves(jax.device_get(st_f)), jax.tree.leaves(jax.device_get(st_u))):
        np.testing.assert_array_equal(x, y)


def _count_dots(config) -> tuple[int, set]:
    task = tasks.build(config, steps_per_epoch=10)
    rng = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(task.init_params, rng)
    import flax.linen as nn
    params = nn.meta.unbox(boxed)
    extra = nn.meta.unbox(jax.eval_shape(task.init_extra, boxed, rng))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(0))
    jaxpr = jax.make_jaxpr(lambda p, e, b: task.loss(p, e, b, rng, np.int32(0)))(
        params, extra, batch)
    keys = jax.eval_shape(lambda p, e, b: task.loss(p, e, b, rng, np.int32(0)), params, extra,
                          batch)[1][0].keys()
    return str(jaxpr).count("dot_general"), set(keys), set(extra)


def test_zero_loss_weight_removes_loss_and_compute():
    full, keys, extra = _count_dots(small_config())
    assert {"loss_itc", "loss_itm", "loss_mlm", "loss_prefix_lm"} <= keys
    assert {"params_m", "image_queue", "text_queue", "queue_ptr", "dropped_targets"} == extra
    for name in ("itc", "itm", "mlm", "prefix_lm"):
        n, keys, extra = _count_dots(small_config(**{name: 0.0}))
        assert f"loss_{name}" not in keys and n < full, name
    # Without ITC (and with MLM distillation still on) no queues are kept.
    _, _, extra = _count_dots(small_config(itc=0.0))
    assert extra == {"params_m", "dropped_targets"}
    _, _, extra = _count_dots(small_config(itc=0.0, mlm=0.0))
    assert extra == {"dropped_targets"}
    no_queue = small_config()
    no_queue.task.itc.queue_size = 0  # in-batch negatives only
    _, keys, extra = _count_dots(no_queue)
    assert "loss_itc" in keys and extra == {"params_m", "dropped_targets"}


def _momentum_keys(config) -> set:
    task = tasks.build(config, steps_per_epoch=10)
    rng = jax.random.PRNGKey(0)
    extra = jax.eval_shape(task.init_extra, jax.eval_shape(task.init_params, rng), rng)
    return set(extra["params_m"])


def test_momentum_copy_holds_only_what_momentum_forwards_read():
    keys = _momentum_keys(small_config())
    assert {"vision", "text", "fusion", "vision_proj", "text_proj", "mlm_transform",
            "mlm_ln", "mlm_bias"} == keys  # no decoder, ITM head or temperature
    c = small_config()
    c.task.prefix_lm.distill = True  # prefix-LM distillation needs the momentum decoder
    assert _momentum_keys(c) == keys | {"decoder"}
    n_full, _, _ = _count_dots(small_config())
    n_distill, keys_d, _ = _count_dots(c)
    assert n_distill > n_full and "loss_prefix_lm" in keys_d


def test_config_errors():
    c = small_config()
    c.task.itc.queue_size = 3 * B + 1
    with pytest.raises(ValueError, match="must be a multiple of the batch one loss call sees"):
        tasks.build(c)
    c = small_config()
    c.optim.accum_steps = 3  # 16 rows do not split into 3 micro-batches
    with pytest.raises(ValueError, match="optim.accum_steps 3"):
        trainer.setup(c, 10, mesh=shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                devices=jax.devices()[:1]))
    c.optim.accum_steps = 0
    with pytest.raises(ValueError, match="accum_steps must be >= 1"):
        trainer.setup(c, 10)
    with pytest.raises(ValueError, match="at least one loss weight"):
        tasks.build(small_config(itc=0.0, itm=0.0, mlm=0.0, prefix_lm=0.0))
    with pytest.raises(ValueError, match="unknown sharding preset"):
        shd.rules("zero3")
    assert shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}).size == 2
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.make_mesh({"data": 16, "fsdp": 1, "tensor": 1})


def test_gradient_accumulation_matches_manual_microbatches():
    """accum_steps=2: one momentum update, gradients averaged over the strided micro-batches
    (rows 0, 2, 4.. then 1, 3, 5..), both micro-batches enqueued in order, one Adam update; the
    same with the batch split over 2 devices (each device's rows feed both micro-batches)."""
    import optax
    config = small_config()
    config.optim.accum_steps = 2
    mesh1 = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    s, step = build(config, mesh1)
    batch = make_batch(0)
    start = trainer.init_state(s, 0)
    pm = start.extra["params_m"]  # momentum params apart from the online ones
    start = start.replace(extra={**start.extra, "params_m": {
        **pm, "text_proj": jax.jit(lambda t: jax.tree.map(lambda x: x + 0.5, t))(
            pm["text_proj"])}})
    state0 = jax.device_get(start)
    state1, m = step(start, make_global_batch(batch, mesh1))
    state1 = jax.device_get(state1)

    task = s.task
    rng = jax.random.fold_in(state0.rng, 0)
    extra = task.begin_step(state0.params, state0.extra)
    grads, losses_ = [], []
    loss_and_grad = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
    for j in range(2):
        micro = {k: v[j::2] for k, v in batch.items()}
        (loss, (_, extra)), g = loss_and_grad(
            state0.params, extra, micro, jax.random.fold_in(rng, j), np.int32(0))
        grads.append(g)
        losses_.append(loss)
    # One jit for the reference update (op by op, each of its ~300 ops compiles on its own).
    @jax.jit
    def reference_update(grads, opt_state, params):
        g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
        updates, _ = s.tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates)

    want = reference_update(grads, state0.opt_state, state0.params)
    np.testing.assert_allclose(float(m["train/loss"]), np.mean(losses_), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Momentum: once per step, from the pre-update params.
    mom = task.itc.momentum
    np.testing.assert_allclose(state1.extra["params_m"]["text_proj"]["kernel"],
                               mom * state0.extra["params_m"]["text_proj"]["kernel"]
                               + (1 - mom) * state0.params["text_proj"]["kernel"], rtol=1e-6)
    assert int(state1.extra["queue_ptr"]) == B  # two micro-batches of B / 2
    for a, b in zip(jax.tree.leaves(state1.extra), jax.tree.leaves(extra)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    mesh2 = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    s8, step8 = build(config, mesh2)
    start8 = jax.device_put(state0, s8.shardings)
    state8, m8 = step8(start8, make_global_batch(batch, mesh2))
    np.testing.assert_allclose(float(m8["train/loss"]), float(m["train/loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state8.params)),
                    jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_distillation_ramp_follows_steps_per_epoch():
    """alpha ramps linearly from 0 to distill_alpha over alpha_warmup_epochs x steps/epoch;
    the trainer derives steps/epoch from the records per epoch and the global batch."""
    c = small_config()
    c.task.itc.update(distill_alpha=0.4, alpha_warmup_epochs=2.0)
    task = tasks.build(c, steps_per_epoch=5)
    assert task.alpha_warmup_steps == 10
    got = [float(task.alpha(np.int32(t))) for t in (0, 5, 10, 40)]
    np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.4], rtol=1e-6)
    c.task.itc.alpha_warmup_epochs = 0.0
    assert float(tasks.build(c, steps_per_epoch=5).alpha(np.int32(0))) == pytest.approx(0.4)
    c.total_steps, c.total_epochs = 0, 3.0
    s = trainer.setup(c, steps_per_epoch=7, mesh=shd.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    assert s.total_steps == 21 and s.task.steps_per_epoch == 7


def test_temperature_pushed_past_a_bound_recovers():
    """The temperature is clamped after every update, so a value beyond temp_max comes back
    into range and keeps a gradient (clipping only in the forward pass left it stuck)."""
    s, step, mesh = one_device()
    state = trainer.init_state(s, 0)
    hi = s.task.itc.temp_max
    state = state.replace(params={**state.params, "temp": state.params["temp"] * 0 + 3 * hi})
    temps = []
    for i in range(3):
        state, m = step(state, make_global_batch(make_batch(i), mesh))
        temps.append(float(jax.device_get(state.params["temp"])))
    assert temps[0] <= hi and temps[-1] < hi, temps  # clamped, then moved by its gradient
    assert temps[2] != temps[1]


def test_key_stream_gives_distinct_keys_without_limit():
    from mplug_jax.tasks.base import KeyStream
    keys = [np.asarray(jax.random.key_data(k)) for k, _ in zip(
        KeyStream(jax.random.PRNGKey(0)), range(20))]
    assert len({k.tobytes() for k in keys}) == 20
    again = next(KeyStream(jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(again)), keys[0])
