"""Optimizer: lr groups, weight-decay mask, schedule, AdamW step against a torch-style formula."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import pretrain as pretrain_config
from mplug_jax import optim

PARAMS = {
    "vision": {"blocks_0": {"ln_1": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
                            "fc1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}},
    "text": {"embeddings": {"LayerNorm_0": {"scale": jnp.ones(2)},
                            "word": {"embedding": jnp.ones((3, 2))}}},
    "mlm_bias": jnp.ones(3),
    "temp": jnp.float32(0.07),
}


def _cfg(**kw):
    c = pretrain_config.get_config("base").optim  # official groups: vision lr 0.1x
    c.update(kw)
    return c


def test_groups_and_decay_mask():
    cfg = _cfg()
    labels = optim.group_labels(PARAMS, {n: g.pattern for n, g in cfg.lr_groups.items()})
    assert labels["vision"]["blocks_0"]["fc1"]["kernel"] == "vision"
    assert labels["text"]["embeddings"]["word"]["embedding"] == "base"
    assert labels["temp"] == "base"
    mask = optim.decay_mask(PARAMS, cfg.no_wd)
    flat = {optim.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat == {
        "vision/blocks_0/ln_1/scale": False, "vision/blocks_0/ln_1/bias": False,
        "vision/blocks_0/fc1/kernel": True, "vision/blocks_0/fc1/bias": False,
        "text/embeddings/LayerNorm_0/scale": False, "text/embeddings/word/embedding": True,
        "mlm_bias": False, "temp": False}  # the temperature is clamped, never decayed


def test_schedule_warmup_cosine_end():
    cfg = _cfg(lr=1e-4, warmup_steps=10, end_lr=1e-6)
    s = optim.make_schedules(cfg, 110)
    assert float(s["base"](0)) == 0.0
    assert float(s["base"](5)) == pytest.approx(5e-5)
    assert float(s["base"](10)) == pytest.approx(1e-4)
    assert float(s["vision"](10)) == pytest.approx(1e-5)
    assert float(s["base"](60)) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6), rel=1e-4)
    assert float(s["base"](110)) == pytest.approx(1e-6)
    assert float(s["vision"](110)) == pytest.approx(1e-6)  # shared min lr, like timm's lr_min


def test_adamw_step_matches_torch_formula():
    """One update = torch AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""
    cfg = _cfg(lr=0.1, warmup_steps=0, wd=0.5, schedule="constant")
    tx, sched = optim.make_optimizer(cfg, PARAMS, 100)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), PARAMS)
    upd, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, upd)
    mask = optim.decay_mask(PARAMS, cfg.no_wd)
    labels = optim.group_labels(PARAMS, {"vision": "^vision/"})

    def want(p, g, decay, group):
        lr = 0.1 * (0.1 if group == "vision" else 1.0)
        m_hat, v_hat = g, g * g  # bias-corrected first step
        return p - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + (0.5 * p if decay else 0.0))

    expect = jax.tree.map(want, PARAMS, grads, mask, labels)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expect)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    lrs = optim.learning_rates(sched, 5)
    assert float(lrs["lr"]) == pytest.approx(0.1) and float(lrs["lr_vision"]) == pytest.approx(0.01)


def test_clipping():
    """Adam is scale-invariant on one step; on two steps of very different norms it is not, so
    the second update tells whether the first gradient was clipped to norm 1."""
    p = {"w": jnp.zeros(4)}
    cfg = _cfg(lr=1.0, warmup_steps=0, wd=0.0, schedule="constant", clip_norm=1.0,
               lr_groups={})
    tx, _ = optim.make_optimizer(cfg, p, 10)
    st = tx.init(p)
    g1, g2 = np.array([300.0, 0.0, 400.0, 0.0]), np.array([0.1, 0.0, 0.0, 0.0])
    _, st = tx.update({"w": jnp.asarray(g1)}, st, p)
    u2, _ = tx.update({"w": jnp.asarray(g2)}, st, p)

    def adam_second_update(a, b):
        m = 0.1 * 0.9 * a + 0.1 * b
        v = 0.001 * 0.999 * a * a + 0.001 * b * b
        return -(m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)

    want = adam_second_update(g1 / 500.0, g2)  # g1 clipped to norm 1; g2 (norm 0.1) kept
    np.testing.assert_allclose(np.asarray(u2["w"]), want, rtol=1e-4)
    assert not np.allclose(want, adam_second_update(g1, g2), rtol=1e-2)
