"""`config.rng_impl`: every PRNG implementation trains, bad names and mismatched resumes are
one-line errors. (The default's bit-identical resume: test_trainer.py.)"""
import json

import jax
import numpy as np
import pytest

from mplug_jax import cli, rng, trainer
from mplug_jax.data.pipeline import make_global_batch
from test_trainer import loop_config


def _batch(config):
    from mplug_jax import tasks
    it, _ = tasks.get_class(config.task.name).train_input(config)
    return next(it)


# The default (threefry) trains in every other test (bit-identical resume: test_trainer.py).
@pytest.mark.parametrize("impl", sorted(set(rng.IMPLS) - {rng.DEFAULT}))
def test_each_impl_runs_a_train_step(impl):
    config = loop_config()
    config.rng_impl = impl
    config.total_steps = 2
    host = _batch(config)
    s = trainer.setup(config, 16)
    assert s.rng_impl == impl
    state = trainer.init_state(s, config.seed)
    assert state.rng.shape == rng.key_data_shape(impl) and state.rng.dtype == np.uint32
    step = trainer.compile_step(s, config, trainer.global_batch_shapes(host))
    batch = make_global_batch(host, s.mesh)
    losses = []
    for _ in range(2):
        state, m = step(state, batch)
        losses.append(float(m["train/loss"]))
    assert int(state.step) == 2 and np.isfinite(losses).all()
    # Same batch, new step key: new MLM masks / hard negatives (and one update) change the loss.
    assert losses[0] != losses[1]


def test_rbg_keys_differ_from_threefry_keys():
    a = jax.random.key_data(jax.random.fold_in(rng.seed_key(0, "threefry"), 1))
    b = jax.random.key_data(jax.random.fold_in(rng.seed_key(0, "unsafe_rbg"), 1))
    assert a.shape == (2,) and b.shape == (4,)
    # The default equals JAX's legacy raw keys: runs from before the field resume unchanged.
    legacy = jax.random.fold_in(jax.random.PRNGKey(0), 1)
    np.testing.assert_array_equal(a, legacy)
    assert loop_config().rng_impl == rng.DEFAULT == "threefry"


def test_unknown_impl_is_a_one_line_error(capsys):
    config = loop_config()
    config.rng_impl = "mersenne"
    with pytest.raises(ValueError, match=r"^unknown rng_impl 'mersenne'; valid: threefry, rbg, "
                                         r"unsafe_rbg$"):
        trainer.setup(config, 16)
    rc = cli.main(["plan", "--config=configs/pretrain.py:tiny,mode=smoke",
                   "--config.rng_impl=mersenne"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("error: unknown rng_impl 'mersenne'; valid: threefry, rbg, "
                               "unsafe_rbg\n")


def test_resume_with_another_impl_is_a_clear_error(tmp_path):
    config = loop_config()
    run = tmp_path / "run"
    (run / "ckpt" / "3").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dict(config.to_dict(), rng_impl="rbg")))
    with pytest.raises(ValueError, match=f"{run} was trained with rng_impl='rbg'; resume it "
                                         "with --config.rng_impl=rbg"):
        trainer.run(config, str(run))
    assert json.loads((run / "config.json").read_text())["rng_impl"] == "rbg"  # untouched
