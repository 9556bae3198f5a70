"""MPLUG module behaviour: fusion layouts, layouts of params, numerics, sharding, bad inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from mplug_jax import params as P
from mplug_jax import sharding
from mplug_jax.models.fusion import fusion_pattern
from mplug_jax.models.mplug import MPLUG
from mplug_jax.models.vit import resample_posemb


def tiny(**kw) -> MPLUG:
    return MPLUG.from_config(model_config("tiny"), **kw)


def inputs(model, b=2, length=6, seed=0):
    r = np.random.default_rng(seed)
    image = r.normal(size=(b, model.image_size, model.image_size, 3)).astype(np.float32)
    ids = r.integers(1000, 2000, size=(b, length)).astype(np.int32)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[0, -2:] = 0
    return image, ids, mask, ids[:, :5], mask[:, :5]


@pytest.mark.parametrize("layout,n,s,want", [
    ("skip", 6, 3, "aaacaa"),     # official base: only relative layer 3 connected
    ("skip", 6, 6, "aaaaaa"),     # official large: stride 6 -> no connected layer
    ("skip", 6, 1, "accccc"),
    ("skip_alg1", 6, 2, "aacaac"),  # paper Algorithm 1: i % (S+1) == 0, i from 1
    ("connected", 3, 1, "mmm"),
    ("coattn", 2, 1, "ss"),
    ("asym", 2, 1, "aa"),
    ("acsm", 4, 1, "acsm"),
])
def test_fusion_patterns(layout, n, s, want):
    assert fusion_pattern(layout, n, s) == want


def test_bad_fusion_layouts():
    with pytest.raises(ValueError, match="pattern"):
        fusion_pattern("axz", 3, 1)
    with pytest.raises(ValueError, match="stride"):
        fusion_pattern("skip", 3, 0)


@pytest.mark.parametrize("layout", ["skip", "connected", "coattn", "asym"])
def test_every_fusion_network_runs(layout):
    model = tiny(fusion_layout=layout)
    x = inputs(model)
    params = P.init_params(model, jax.random.PRNGKey(0))
    out = jax.jit(model.apply)({"params": params}, *x)
    img = out["image_embeds"]
    assert out["fusion_image"].shape == img.shape
    assert out["fusion_text"].shape == (2, 6, model.hidden_size)
    assert out["decoder_logits"].shape == (2, 5, 30522)
    assert out["decoder_logits"].dtype == jnp.float32
    if layout == "asym":  # the image passes through asymmetric co-attention untouched
        np.testing.assert_array_equal(out["fusion_image"], img)
    else:
        assert not np.allclose(out["fusion_image"], img)


def test_connected_layer_adds_image_residual():
    """Official quirk: 'c' = 'm' (plain merged attention) + the incoming image states."""
    c, m = tiny(fusion_layout="c", fusion_layers=1), tiny(fusion_layout="m", fusion_layers=1)
    params = P.init_params(c, jax.random.PRNGKey(1))
    x = inputs(c)
    oc, om = jax.jit(c.apply)({"params": params}, *x), jax.jit(m.apply)({"params": params}, *x)
    np.testing.assert_allclose(oc["fusion_image"], om["fusion_image"] + oc["image_embeds"],
                               atol=1e-5)
    np.testing.assert_allclose(oc["fusion_text"], om["fusion_text"], atol=1e-6)


def test_scan_layout_matches_loop_layout():
    loop, scan = tiny(), tiny(scan_layers=True)
    params = P.init_params(loop, jax.random.PRNGKey(2))
    flat = {k: np.asarray(v) for k, v in P.flatten(params).items()}
    scan_params = P.merge_into(P.init_params(scan, jax.random.PRNGKey(0)), P.loop_to_scan(flat))
    assert P.scan_to_loop(P.loop_to_scan(flat)).keys() == flat.keys()
    x = inputs(loop)
    a = jax.jit(loop.apply)({"params": params}, *x)
    b = jax.jit(scan.apply)({"params": scan_params}, *x)
    for k in ("fusion_text", "decoder_logits", "mlm_logits"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-5)


def test_remat_gives_same_values_and_grads():
    plain, remat = tiny(), tiny(remat_policy="full")
    params = P.init_params(plain, jax.random.PRNGKey(3))
    x = inputs(plain)

    def loss(m, p):
        return m.apply({"params": p}, *x)["decoder_logits"].mean()
    g1 = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    f32, bf16 = tiny(), tiny(dtype="bfloat16")
    params = P.init_params(bf16, jax.random.PRNGKey(4))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(P.flatten(params)))
    x = inputs(f32)
    a = jax.jit(f32.apply)({"params": params}, *x)
    b = jax.jit(bf16.apply)({"params": params}, *x)
    assert b["fusion_text"].dtype == jnp.bfloat16
    assert b["decoder_logits"].dtype == jnp.float32 and b["img_feat"].dtype == jnp.float32
    np.testing.assert_allclose(b["decoder_logits"], a["decoder_logits"], atol=0.1)


@pytest.mark.parametrize("preset,shape", [("dp", (8, 1, 1)), ("fsdp", (2, 4, 1)),
                                          ("fsdp_tp", (2, 2, 2))])
def test_sharded_forward_on_8_devices_equals_1_device(preset, shape):
    model = tiny()
    params = P.init_params(model, jax.random.PRNGKey(5))
    x = inputs(model, b=8)
    want = jax.jit(model.apply)({"params": params}, *x)
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    shardings = sharding.logical_shardings(params, mesh, sharding.rules(preset))
    sharded = jax.device_put(params, shardings)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded)) or preset == "dp"
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = jax.jit(model.apply)({"params": sharded}, *[jax.device_put(a, batch) for a in x])
    for k in ("image_embeds", "fusion_text", "decoder_logits", "itm_logits"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-5)


def test_clear_errors_for_bad_inputs_and_configs():
    model = tiny()
    params = P.init_params(model, jax.random.PRNGKey(6))
    image, ids, mask, d, dm = inputs(model)
    apply = jax.jit(model.apply, static_argnames="method")
    with pytest.raises(ValueError, match="channels last, RGB"):
        apply({"params": params}, image[..., :1], method="encode_image")
    with pytest.raises(ValueError, match="expects 64x64"):
        apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32), method="encode_image")
    long_ids = np.ones((1, 600), np.int32)
    with pytest.raises(ValueError, match="more than max_len=512"):
        apply({"params": params}, long_ids, long_ids, method="encode_text")
    with pytest.raises(ValueError, match="must both be int"):
        apply({"params": params}, ids, mask[:, :3], method="encode_text")
    with pytest.raises(ValueError, match="unknown model config keys"):
        MPLUG.from_config(model_config("tiny"), hiden_size=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MPLUG.from_config(model_config("tiny"), num_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        MPLUG.from_config(model_config("tiny"), remat_policy="sometimes")
    with pytest.raises(ValueError, match="vision_posemb_init_std -1"):
        MPLUG.from_config(model_config("tiny"), vision_posemb_init_std=-1.0)


def test_posemb_init_std():
    """0 keeps CLIP's width ** -0.5 for the position table; a positive value sets its std; the
    class token and the patch embedding do not move."""
    def vision(**kw):
        model = MPLUG.from_config(model_config("tiny"), vision_layers=1, **kw)
        return nn.unbox(P.init_params(model, jax.random.PRNGKey(1)))["vision"]
    clip, wide = vision(), vision(vision_posemb_init_std=3.0)
    assert float(np.std(clip["pos_embed"])) == pytest.approx(64 ** -0.5, rel=0.05)
    assert float(np.std(wide["pos_embed"])) == pytest.approx(3.0, rel=0.05)
    np.testing.assert_array_equal(clip["cls_token"], wide["cls_token"])
    np.testing.assert_array_equal(clip["patch_embed"]["kernel"], wide["patch_embed"]["kernel"])


def test_posemb_resample_matches_torch_bilinear():
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    pos = np.random.default_rng(0).normal(size=(1 + 14 * 14, 8)).astype(np.float32)
    for new in (24, 7):
        got = resample_posemb(pos, new)
        grid = torch.tensor(pos[1:]).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
        want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bilinear",
                                               align_corners=False)
        want = want.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
        np.testing.assert_allclose(got[1:], want, atol=1e-5)
        np.testing.assert_array_equal(got[0], pos[0])
