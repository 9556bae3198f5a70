import itertools

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mplug_jax.data import pipeline
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.synthetic import shapes as synthetic
from mplug_jax.data.ops import text
from mplug_jax.data.ops import tokenizer
from mplug_jax.data.ops import image as transforms

AUG = {"crop_scale": (0.2, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True}


@pytest.fixture(scope="module")
def source():
    ds = synthetic.SyntheticShapes("train", 40, image_size=32)
    return [ds[i] for i in range(len(ds))]  # materialised: a plain list is a valid source


def _take(ds_or_it, n):
    return list(itertools.islice(iter(ds_or_it), n))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_text(source):
    ds = pretrain_input.dataset(source, image_size=24, batch_size=4, max_tokens=12,
                                   train=False, num_epochs=1)
    batches = list(ds)
    assert len(batches) == 10
    b = batches[0]
    assert set(b) == {"image", "text_ids", "text_mask", "idx"}
    assert b["image"].dtype == np.float32 and b["image"].shape == (4, 24, 24, 3)
    assert b["text_ids"].dtype == np.int32 and b["text_ids"].shape == (4, 12)
    assert b["text_mask"].dtype == np.int32 and b["idx"].dtype == np.int32
    assert b["idx"].tolist() == [0, 1, 2, 3]  # eval keeps source order
    want_ids, want_mask = tokenizer.get_tokenizer().encode(
        [text.pre_caption(source[i]["caption"]) for i in range(4)], max_length=12, pad_to=12)
    np.testing.assert_array_equal(b["text_ids"], want_ids)
    np.testing.assert_array_equal(b["text_mask"], want_mask)
    assert (b["text_ids"][:, 0] == tokenizer.CLS_ID).all()
    assert not (b["text_ids"] == tokenizer.SEP_ID).any()  # no trailing [SEP]
    from PIL import Image
    np.testing.assert_allclose(
        b["image"][2], transforms.eval_transform(Image.fromarray(source[2]["image"]), 24))


def test_shuffle_epochs_and_determinism(source):
    kw = dict(image_size=16, batch_size=8, augment=AUG, seed=3)
    a = _take(pretrain_input.dataset(source, **kw), 10)
    _assert_same(a, _take(pretrain_input.dataset(source, **kw), 10))
    idx = np.concatenate([b["idx"] for b in a])
    epochs = idx.reshape(2, 40)  # 5 batches per epoch, each index once per epoch
    assert all(sorted(e) == list(range(40)) for e in epochs)
    assert epochs[0].tolist() != list(range(40)) and epochs[0].tolist() != epochs[1].tolist()
    other = _take(pretrain_input.dataset(source, **{**kw, "seed": 4}), 1)
    assert other[0]["idx"].tolist() != a[0]["idx"].tolist()
    # Augmentation differs between epochs for the same record.
    first = {int(i): a[k // 8]["image"][k % 8] for k, i in enumerate(idx[:40])}
    second = {int(i): a[5 + k // 8]["image"][k % 8] for k, i in enumerate(idx[40:])}
    assert sum(np.array_equal(first[i], second[i]) for i in range(40)) < 4


def test_shards_are_disjoint_and_equal(source):
    kw = dict(image_size=16, batch_size=5, seed=1, num_epochs=1, augment=None)
    shards = [np.concatenate([b["idx"] for b in pretrain_input.dataset(
        source[:39], shard_index=s, shard_count=3, **kw)]) for s in range(3)]
    assert [len(s) for s in shards] == [10, 10, 10]  # 39 // 3 = 13 -> 2 full batches each
    assert len(set(np.concatenate(shards).tolist())) == 30
    with pytest.raises(ValueError, match="shard_index"):
        pretrain_input.dataset(source, image_size=8, batch_size=2, shard_index=3,
                                  shard_count=3)


def test_caption_list_choice_is_deterministic_per_epoch():
    img = np.zeros((8, 8, 3), np.uint8)
    caps = ["red", "green", "blue", "yellow"]
    src = [{"image": img, "caption": caps} for _ in range(8)]
    kw = dict(image_size=8, batch_size=8, max_tokens=4, augment=None, seed=0)
    a = _take(pretrain_input.dataset(src, **kw), 4)
    _assert_same(a, _take(pretrain_input.dataset(src, **kw), 4))
    words = np.stack([b["text_ids"][np.argsort(b["idx"]), 1] for b in a])  # [epoch, record]
    assert len(set(words.ravel().tolist())) > 1
    assert not all((w == words[0]).all() for w in words[1:])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_resume_is_bit_identical(source, workers):
    kw = dict(image_size=16, batch_size=4, augment=AUG, seed=7, workers=workers)
    it = iter(pretrain_input.dataset(source, **kw))
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 12)  # crosses the epoch boundary (10 batches per epoch)
    fresh = iter(pretrain_input.dataset(source, **kw))
    fresh.set_state(state)
    _assert_same(want, _take(fresh, 12))
    if workers:
        it.close()
        fresh.close()


def test_read_threads_auto_explicit_and_refused():
    import ml_collections
    cfg = ml_collections.ConfigDict({"read_threads": 0})
    assert pipeline.read_threads(cfg, 0) == 4
    assert pipeline.read_threads(cfg, 3) == 1  # one per worker process
    cfg.read_threads = 2
    assert pipeline.read_threads(cfg, 3) == 2
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="input.read_threads must be an integer >= 0"):
            pipeline.read_threads({"read_threads": bad}, 0)


def test_orbax_checkpoint_of_iterator_and_state(source, tmp_path):
    kw = dict(image_size=16, batch_size=4, augment=AUG, seed=5)
    it = iter(pretrain_input.dataset(source, **kw))
    _take(it, 4)
    params = {"w": np.arange(6.0).reshape(2, 3)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(
            state=ocp.args.StandardSave(params),
            data_iter=pipeline.iterator_checkpoint_args(it)))
        mngr.wait_until_finished()
    want = _take(it, 5)
    fresh = iter(pretrain_input.dataset(source, **kw))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(4, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(params),
            data_iter=pipeline.iterator_checkpoint_args(fresh, restore=True)))
    np.testing.assert_array_equal(restored.state["w"], params["w"])
    _assert_same(want, _take(fresh, 5))


def test_bad_records_are_skipped_counted_and_batches_full(caplog):
    img = np.full((8, 8, 3), 200, np.uint8)
    src = [{"image": img, "caption": f"good {i}"} for i in range(20)]
    src[3] = {"image": b"not an image", "caption": "x"}
    src[7] = {"image": img, "caption": ""}
    src[11] = {"caption": "no image"}
    kw = dict(image_size=8, batch_size=4, augment=None, train=False, num_epochs=1,
              max_skip_rate=0.5, skip_check_after=1)
    it = iter(pretrain_input.dataset(src, **kw))
    with caplog.at_level("WARNING", logger="mplug_jax.data.pipeline"):
        batches = list(it)
    assert [len(b["idx"]) for b in batches] == [4, 4, 4, 4]  # 17 good -> 4 full batches
    seen = np.concatenate([b["idx"] for b in batches]).tolist()
    assert seen == [i for i in range(20) if i not in (3, 7, 11)][:16]
    stats = pipeline.skip_stats(it)
    assert stats.skipped["bad_image"] == 1 and stats.skipped["bad_caption"] == 1
    assert stats.skipped["bad_record"] == 1 and stats.total_skipped == 3
    assert stats.seen == 19  # record 19 is left over by drop_remainder, never seen
    assert sum("skipping record" in r.message for r in caplog.records) == 3
    with pytest.raises(pipeline.DataError, match="skip rate"):
        list(pretrain_input.dataset(src, **{**kw, "max_skip_rate": 0.1}))


def test_make_global_batch(mesh8):
    batch = {"image": np.ones((8, 4, 4, 3), np.float32), "idx": np.arange(8, dtype=np.int32)}
    out = pipeline.make_global_batch(batch, mesh8)
    assert out["image"].shape == (8, 4, 4, 3) and isinstance(out["idx"], jax.Array)
    assert out["idx"].sharding.spec[0] == ("data", "fsdp")
    assert len({s.device for s in out["idx"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(out["idx"]), batch["idx"])
