"""Attention-probability dropout per `attention_impl`, and the shared `ModuleOptions`."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from mplug_jax.models import layers
from mplug_jax.models.bert import BertLayer
from mplug_jax.models.mplug import MPLUG

B, L, D, HEADS = 2, 5, 16, 2


def _x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(B, L, D)), jnp.float32)


def _mask():
    keep = np.ones((B, L), np.int32)
    keep[0, -2:] = 0
    return layers.padding_mask(jnp.asarray(keep))


def _attention(impl: str, dropout_rate: float = 0.0, deterministic: bool = True):
    opts = layers.ModuleOptions(dropout_rate=dropout_rate, deterministic=deterministic,
                                attention_impl=impl)
    return layers.Attention(num_heads=HEADS, kind="self", opts=opts)


@pytest.fixture(scope="module")
def params():
    return _attention("xla").init(jax.random.PRNGKey(0), _x(), mask=_mask())


def _apply(module, params, seed=1):
    return module.apply(params, _x(), mask=_mask(), rngs={"dropout": jax.random.PRNGKey(seed)})


def test_cudnn_with_active_dropout_raises_at_trace_time(params):
    with pytest.raises(ValueError, match=r"attention_impl='xla'.*dropout_rate=0"):
        _apply(_attention("cudnn", 0.1, deterministic=False), params)
    with pytest.raises(ValueError, match="attention_impl='cudnn' has no attention dropout"):
        jax.eval_shape(lambda p: _apply(_attention("cudnn", 0.1, deterministic=False), p),
                       params)


def test_auto_with_active_dropout_falls_back_to_xla(params):
    auto = _apply(_attention("auto", 0.3, deterministic=False), params)
    xla = _apply(_attention("xla", 0.3, deterministic=False), params)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
    # ... and the dropout really is applied (differs from the deterministic output).
    plain = _apply(_attention("xla"), params)
    assert not np.allclose(np.asarray(auto), np.asarray(plain))


@pytest.mark.parametrize("dropout_rate,deterministic", [(0.1, True), (0.0, False)])
def test_auto_without_active_dropout_uses_the_fused_api(params, dropout_rate, deterministic):
    """On CPU 'auto' (implementation=None) runs jax.nn.dot_product_attention's XLA kernel; it
    matches the einsum path."""
    auto = _apply(_attention("auto", dropout_rate, deterministic), params)
    xla = _apply(_attention("xla"), params)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(xla), atol=1e-5, rtol=1e-5)


def test_bert_layer_cross_attention_auto_dropout_matches_xla():
    x, kv = _x(), _x()[:, :3] * 2
    kv_mask = layers.padding_mask(jnp.ones((B, 3), jnp.int32))

    def layer(impl):
        opts = layers.ModuleOptions(dropout_rate=0.2, deterministic=False, attention_impl=impl)
        return BertLayer(num_heads=HEADS, mlp_dim=32, cross=True, opts=opts)

    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(3)}
    p = layer("xla").init(rngs, x, _mask(), kv, kv_mask)
    out = {impl: layer(impl).apply(p, x, _mask(), kv, kv_mask,
                                   rngs={"dropout": jax.random.PRNGKey(4)})[0]
           for impl in ("xla", "auto")}
    np.testing.assert_array_equal(np.asarray(out["auto"]), np.asarray(out["xla"]))


def test_mplug_cudnn_training_with_dropout_raises():
    model = MPLUG.from_config(model_config("tiny"), attention_impl="cudnn", dropout_rate=0.1,
                              deterministic=False)
    r = np.random.default_rng(0)
    image = r.normal(size=(1, model.image_size, model.image_size, 3)).astype(np.float32)
    ids, mask = np.full((1, 4), 1000, np.int32), np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="no attention dropout"):
        jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0),
                                           "dropout": jax.random.PRNGKey(1)},
                                          image, ids, mask, ids, mask))


def test_mplug_builds_one_options_object_from_its_config():
    model = MPLUG.from_config(model_config("tiny"), dropout_rate=0.1, dtype="bfloat16",
                              attention_impl="auto")
    assert model.opts == layers.ModuleOptions(
        dropout_rate=0.1, deterministic=True, attention_impl="auto", init_std=model.init_std,
        dtype=jnp.dtype(jnp.bfloat16), param_dtype=jnp.dtype(jnp.float32))


def test_options_and_modules_are_keyword_only():
    with pytest.raises(TypeError):
        layers.ModuleOptions(0.1)
    with pytest.raises(TypeError):
        layers.Attention(HEADS, "self")
    with pytest.raises(TypeError):
        BertLayer(HEADS, 32)
    with pytest.raises(ValueError, match="attention_impl"):
        layers.ModuleOptions(attention_impl="flash")
    with pytest.raises(dataclasses.FrozenInstanceError):
        layers.DEFAULT_OPTS.dropout_rate = 0.5
