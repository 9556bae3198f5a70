"""Pretraining task and config details: refusals of base/large, target gathering with full-length
captions, the dropped-target counter, workdirs on non-local paths."""
import fsspec
import jax
import ml_collections
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import test_train_step as ts_tests
from configs import pretrain as pretrain_config
from mplug_jax import checkpoint as ckpt_lib
from mplug_jax import losses, metrics, tasks, workdir
from mplug_jax import params as P
from mplug_jax.tasks.pretrain import Task


@pytest.mark.parametrize("variant", ["base", "large"])
def test_base_and_large_default_to_the_paper_recipe_and_refuse_shortcuts(variant):
    c = pretrain_config.get_config(variant)
    assert (c.model.dtype, c.model.param_dtype, c.model.remat_policy) == (
        "bfloat16", "float32", "full")
    assert c.mesh.sharding == "fsdp" and c.mesh.shape.fsdp == -1
    with pytest.raises(ValueError, match=r"--config.input.allow_synthetic=True"):
        Task.train_input(c)
    task = tasks.build(c)
    with pytest.raises(ValueError, match=r"--config.init.allow_scratch=True"):
        task.init_from_pretrained(None)
    # tiny trains from scratch on the shapes by default
    t = pretrain_config.get_config("tiny")
    assert t.input.allow_synthetic and t.init.allow_scratch and t.model.dtype == "float32"


def _full_length_batch(b: int, length: int, seed: int) -> dict:
    """Captions that fill every position: [CLS] w ... w [SEP], no padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(losses.SEP_ID + 1, ts_tests.V, (b, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = losses.CLS_ID, losses.SEP_ID
    batch = ts_tests.make_batch(0)
    batch.update(text_ids=ids, text_mask=np.ones((b, length), np.int32))
    return batch


def _dropped(config, batch, seeds, mlm_capacity=None) -> list[int]:
    task = tasks.build(config, steps_per_epoch=10)
    if mlm_capacity is not None:
        task.mlm_capacity = lambda b, length: mlm_capacity
    rng = jax.random.PRNGKey(0)
    params = task.init_params(rng)
    import flax.linen as nn
    params = nn.meta.unbox(params)
    extra = nn.meta.unbox(task.init_extra(task.init_params(rng), rng))
    loss = jax.jit(lambda k, b: task.loss(params, extra, b, k, np.int32(0))[1][0][
        "dropped_targets_total"])
    return [int(loss(jax.random.PRNGKey(s), batch)) for s in seeds]


def test_full_length_captions_lose_no_target():
    """Default capacities (6 sigma over the full-length expectation) keep every MLM and
    prefix-LM target of captions that fill max_tokens; a too-small capacity drops and counts
    them."""
    c = ts_tests.small_config()
    c.task.gather_length = 0  # full-length texts: size for input.max_tokens
    b, length = ts_tests.B, c.input.max_tokens
    batch = _full_length_batch(b, length, 0)
    assert _dropped(c, batch, range(6)) == [0] * 6
    picks = 0.15 * b * (length - 2)
    got = _dropped(c, batch, range(3), mlm_capacity=2)
    assert all(d > 0 for d in got) and np.mean(got) == pytest.approx(picks - 2, rel=0.5)


def test_tiny_gather_length_covers_the_builtin_captions():
    """tiny sizes its gathers for 16-token texts: no built-in shapes caption is longer."""
    from mplug_jax.data.synthetic.shapes import SyntheticShapes
    from mplug_jax.data.ops.tokenizer import get_tokenizer
    c = pretrain_config.get_config("tiny")
    assert c.task.gather_length == 16 and c.input.dataset == "synthetic"
    src = SyntheticShapes("train", 2000, image_size=c.model.image_size, seed=c.seed)
    caps = [cap for i in range(len(src)) for cap in np.atleast_1d(src[i]["caption"])]
    ids, _ = get_tokenizer().encode(list(caps), max_length=64)
    assert (np.asarray(ids) > 0).sum(-1).max() <= c.task.gather_length


def test_capacity_bounds():
    c = ts_tests.small_config()
    c.task.gather_length = 32  # the paper's 30 words + [CLS] + [SEP]
    task = tasks.build(c)
    b, length = 32, 32  # the paper's 30-word captions, base max_tokens
    assert task.mlm_capacity(b, length) >= 0.15 * b * (length - 2)
    assert task.lm_capacity(b, length) > b * (length + 2) / 2
    assert task.lm_capacity(b, length) <= b * (length - 1)
    c.task.gather_sigmas = 0.0  # every position
    assert tasks.build(c).mlm_capacity(b, length) == b * length


def test_dropped_target_counter_warns_once_per_increase():
    watch = metrics.CounterWatch("train/dropped_", tasks.get_class("pretrain").capacity_hint)
    assert list(watch.check({"train/dropped_targets_total": 0.0})) == []
    msgs = list(watch.check({"train/dropped_targets_total": 3.0, "train/loss": 1.0}))
    assert len(msgs) == 1 and "= 3 (+3)" in msgs[0] and "gather_sigmas" in msgs[0]
    assert list(watch.check({"train/dropped_targets_total": 3.0})) == []
    assert "(+2)" in next(watch.check({"train/dropped_targets_total": 5.0}))


def test_progress_line_is_compact():
    line = metrics.progress_line(100, 600, {"train/loss": 3.21456, "samples_per_s": 52.13,
                                            "step_time_s": 0.614, "eta_min": 5.1,
                                            "train/l2_grads": 1.0})
    assert line == "step 100/600 (17%) | loss 3.215 | 52.1 samples/s | 0.614 s/step | ETA 5m06s"


class FakeBucket(MemoryFileSystem):
    """An in-memory filesystem answering for gs:// (what etils.epath asks fsspec for)."""
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def fake_bucket():
    """gs:// served from memory (offline) for the duration of a test."""
    from etils.epath import backend
    from fsspec.registry import _registry
    before = {p: _registry.get(p) for p in FakeBucket.protocol}
    for p in FakeBucket.protocol:
        fsspec.register_implementation(p, FakeBucket, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeBucket.store.clear()
    yield
    FakeBucket.store.clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
    for p, impl in before.items():
        if impl is None:
            _registry.pop(p, None)
        else:
            _registry[p] = impl


def test_bucket_workdir_stays_a_bucket(fake_bucket, capsys):
    """A gs:// workdir (the TPU launch script's) is not turned into a local folder: config and
    metrics are written to the bucket and the checkpoint directory handed to orbax is on it."""
    wd = workdir.resolve("gs://bucket/run")
    assert str(wd) == "gs://bucket/run"
    cfg = ml_collections.ConfigDict({"task": {"name": "pretrain"}, "seed": 3})
    workdir.write_config(wd, cfg)
    assert workdir.read_config("gs://bucket/run").seed == 3
    w = metrics.MetricWriter(wd)
    w.write(1, {"train/loss": 2.0}, console=False)
    w.write(2, {"train/loss": 1.5}, console=False)
    w.close()
    out = capsys.readouterr().out  # no GCS client here: TensorBoard events go local, said so
    if not metrics._importable("google.cloud.storage"):
        assert "writing TensorBoard events for gs://bucket/run/tb to" in out
    assert [r["train/loss"] for r in metrics.read_jsonl(wd / "metrics.jsonl")] == [2.0, 1.5]
    # orbax itself needs google-cloud-storage for buckets (absent offline): the path it gets
    assert str(ckpt_lib.resolve(wd / "ckpt")) == "gs://bucket/run/ckpt"
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        workdir.read_config("gs://bucket/elsewhere")
    assert str(workdir.resolve("rel/dir")).startswith("/")  # local paths made absolute


def test_init_from_our_workdir_resizes_the_position_embedding(pretrain_workdir):
    """`init.checkpoint` = a pretraining workdir: params and the momentum copy come from its
    latest checkpoint; fine-tuning at a higher resolution resamples the positional embedding."""
    from mplug_jax import trainer
    from mplug_jax.models.vit import resample_posemb
    from test_trainer import loop_config
    _, src, src_m = workdir.restore_params(pretrain_workdir)
    cfg = loop_config()
    cfg.model.image_size = 48  # 3x3 patches instead of 2x2
    cfg.init.update(checkpoint=str(pretrain_workdir), allow_scratch=False)
    s = trainer.setup(cfg, steps_per_epoch=1, mesh=None)
    state = jax.device_get(s.task.init_from_pretrained(trainer.init_state(s, cfg.seed)))
    def flat(tree):
        return {k: np.asarray(v) for k, v in P.flatten(tree).items()}

    got, want = flat(state.params), flat(jax.device_get(src))
    assert got.keys() == want.keys()
    for k in want:
        if k == "vision/pos_embed":
            assert got[k].shape == (10, 32)
            np.testing.assert_allclose(got[k], resample_posemb(want[k], 3), rtol=1e-6)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    got_m, want_m = flat(state.extra["params_m"]), flat(jax.device_get(src_m))
    np.testing.assert_array_equal(got_m["text/embeddings/word/embedding"],
                                  want_m["text/embeddings/word/embedding"])
    assert not np.array_equal(got_m["text_proj/kernel"], got["text_proj/kernel"])
