"""`task.negatives='per_device'` (mplug_jax/negatives.py): each batch shard's ITC / ITM loss is
the global-pool loss of its own rows, the losses and gradients are averaged over shards, the
queue gets every shard's momentum features in row order; one shard == 'global' exactly; bad
values are refused; a train step runs with FSDP-sharded params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug_jax import config_checks, trainer
from mplug_jax import sharding as shd
from mplug_jax.data.pipeline import make_global_batch
from mplug_jax.errors import ConfigError
from mplug_jax.tasks import retrieval
from helpers import SMALL_MODEL, built_task
from test_retrieval import small_config

B, Q, L = 12, 24, 8  # 4 shards x 3 rows


def config(negatives: str, batch: int = B):
    c = small_config()
    c.task.negatives = negatives
    c.input.batch_size = batch
    c.task.itc.queue_size = Q
    return c


def make_extra(task, params) -> dict:
    """A half-filled queue (item ids that repeat the batch's) and momentum params apart from
    the online ones."""
    r = np.random.default_rng(1)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    e = SMALL_MODEL["embed_dim"]
    params_m = {k: jax.tree.map(lambda x: x + 0.01, v) for k, v in params.items()
                if task.momentum_filter()(k)}
    return {"params_m": params_m, "image_queue": unit(r.normal(size=(Q, e))),
            "text_queue": unit(r.normal(size=(Q, e))),
            "idx_queue": np.where(np.arange(Q) < 12, np.arange(Q) % 9, -100).astype(np.int32),
            "queue_ptr": np.int32(12)}


def make_batch(b: int = B) -> dict:
    """Image ids repeat inside shards and across them."""
    r = np.random.default_rng(0)
    ids = r.integers(1000, 2000, (b, L)).astype(np.int32)
    ids[:, 0] = 101
    return {"image": r.normal(size=(b, 32, 32, 3)).astype(np.float32), "text_ids": ids,
            "text_mask": (np.arange(L)[None] < r.integers(3, L + 1, (b, 1))).astype(np.int32),
            "image_index": np.array([0, 0, 1, 2, 3, 3, 1, 4, 5, 6, 7, 8][:b], np.int32),
            "idx": np.arange(b, dtype=np.int32)}


KEYS = ("loss", "loss_itc", "loss_itm", "itm_acc", "same_image_pairs")


def test_per_device_is_the_mean_of_each_shards_global_loss():
    """Mesh data=2 x fsdp=2: loss, metrics and gradients == the mean over shards of the
    'global' loss on that shard's rows alone (its negatives drawn as shard s draws them),
    and the queue gets the shards' momentum features one after another."""
    task, params = built_task(config("per_device"))
    glob, _ = built_task(config("global"))
    extra, batch = make_extra(task, params), make_batch()
    rng, step = jax.random.PRNGKey(3), jnp.asarray(5)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
    per_device = jax.value_and_grad(task.loss, has_aux=True)
    with jax.set_mesh(mesh):
        (loss, (m, new)), g = jax.jit(per_device)(params, extra, batch, rng, step)

    def shard_loss(params, rows, s):
        idx = rows["image_index"]
        total, metrics, upd, _ = glob.itc_itm_loss(
            params, extra, rng, step, "encode_image", rows["image"], rows["text_ids"],
            rows["text_mask"], idx, pool_index=s)
        return total, ({**metrics, "same_image_pairs": retrieval.same_item_share(idx)}, upd)

    ref = jax.jit(jax.value_and_grad(shard_loss, has_aux=True))
    b, refs = B // 4, []
    for s in range(4):
        refs.append(ref(params, jax.tree.map(lambda x: x[s * b:(s + 1) * b], batch), s))
    for k in KEYS:
        want = np.mean([float(r[0][1][0][k]) for r in refs])
        np.testing.assert_allclose(float(m[k]), want, rtol=2e-6, err_msg=k)
    assert float(m["itm_acc"]) not in (0.0, 1.0)  # the ITM term does discriminate
    jax.tree.map(lambda a, *r: np.testing.assert_allclose(a, np.mean(r, 0), rtol=2e-4,
                                                          atol=1e-7),
                 g, *[r[1] for r in refs])
    ptr = int(extra["queue_ptr"])
    for name in ("image_queue", "text_queue", "idx_queue"):
        got = np.asarray(new[name])[ptr:ptr + B]
        want = np.concatenate([np.asarray(r[0][1][1][name])[ptr:ptr + b] for r in refs])
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(new["image_queue"])[:ptr], extra["image_queue"][:ptr])
    assert int(new["queue_ptr"]) == (ptr + B) % Q


def test_per_device_on_one_shard_is_global_exactly():
    task, params = built_task(config("per_device", batch=4))
    glob, _ = built_task(config("global", batch=4))
    extra, batch = make_extra(task, params), make_batch(4)
    one = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    args = (params, extra, batch, jax.random.PRNGKey(7), jnp.asarray(2))
    with jax.set_mesh(one):
        got = jax.jit(task.loss)(*args)
        want = jax.jit(glob.loss)(*args)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_values_are_refused_in_one_line():
    c = config("sideways")
    with pytest.raises(ValueError, match=r"^task.negatives must be one of 'global', "
                       r"'per_device', got 'sideways'$"):
        built_task(c)
    with pytest.raises(ConfigError, match="task.negatives must be one of"):
        config_checks.check(c, training=False, files=False)
    c = config("per_device", batch=8)
    c.mesh.shape = dict(data=8, fsdp=1, tensor=1)
    with pytest.raises(ConfigError, match=r"task.negatives='per_device' .* fewer than 2 per "
                       "shard"):
        config_checks.check(c, training=True, files=False)


def test_one_train_step_with_fsdp_params():
    """The trainer's step with per_device negatives on 2 FSDP shards (params, optimizer state
    and queues sharded): finite, pools of the shards' rows, the queue advanced by the global
    batch."""
    c = config("per_device", batch=4)
    c.task.itc.queue_size = 8
    c.mesh.update(shape=dict(data=1, fsdp=2, tensor=1), sharding="fsdp")
    mesh = shd.make_mesh(c.mesh.shape, devices=jax.devices()[:2])
    s = trainer.setup(c, steps_per_epoch=10, mesh=mesh)
    batch = make_batch(4)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    step = trainer.compile_step(s, c, abstract)
    state, m = step(trainer.init_state(s, 0), make_global_batch(batch, mesh))
    assert np.isfinite(float(m["train/loss"])) and float(m["train/l2_grads"]) > 0
    assert int(state.extra["queue_ptr"]) == 4
    # Image ids [0, 0 | 1, 2]: shard pools share 1 and 0 of their pairs (global: 2 of 12).
    assert float(m["train/same_image_pairs"]) == pytest.approx(0.5)
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]
    assert any("fsdp" in spec for spec in specs)
