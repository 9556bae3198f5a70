"""Pretraining losses against NumPy references of the ALBEF / BERT formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mplug_jax import losses
from mplug_jax.train_state import enqueue, momentum_update


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _itc_reference(img, txt, img_m, txt_m, iq, tq, temp, alpha):
    """ALBEF `forward` ITC block, transcribed with NumPy (queues stored [Q, E] here)."""
    img_all, txt_all = np.concatenate([img_m, iq]), np.concatenate([txt_m, tq])
    tgt = np.zeros((len(img), len(img_all)))
    np.fill_diagonal(tgt, 1)
    sm = lambda x: np.exp(_log_softmax(x))  # noqa: E731
    t_i2t = alpha * sm(img_m @ txt_all.T / temp) + (1 - alpha) * tgt
    t_t2i = alpha * sm(txt_m @ img_all.T / temp) + (1 - alpha) * tgt
    l_i2t = -(np.asarray(_log_softmax(img @ txt_all.T / temp)) * t_i2t).sum(1).mean()
    l_t2i = -(np.asarray(_log_softmax(txt @ img_all.T / temp)) * t_t2i).sum(1).mean()
    return (l_i2t + l_t2i) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_loss_matches_albef_formula(alpha):
    r = np.random.default_rng(0)
    b, q, e = 6, 12, 8
    f = [_unit(r.normal(size=(n, e))) for n in (b, b, b, b, q, q)]
    temp = 0.07
    loss, sims = losses.itc_loss(*map(jnp.asarray, f), jnp.float32(temp), alpha)
    want = _itc_reference(*f, temp, alpha)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sims["sim_i2t"]), f[0] @ f[3].T / temp, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sims["sim_t2i"]), f[1] @ f[2].T / temp, rtol=1e-5)


def test_itc_no_gradient_into_momentum_features_or_queue():
    r = np.random.default_rng(1)
    f = [jnp.asarray(_unit(r.normal(size=(n, 4)))) for n in (3, 3, 3, 3, 6, 6)]
    grads = jax.grad(lambda *a: losses.itc_loss(*a, jnp.float32(0.1), 0.4)[0],
                     argnums=(0, 1, 2, 3, 4, 5))(*f)
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    for g in grads[2:]:
        assert float(jnp.abs(g).sum()) == 0


def test_temperature_clamp():
    assert float(losses.clamp_temp(jnp.float32(1e-5))) == pytest.approx(0.001)
    assert float(losses.clamp_temp(jnp.float32(3.0))) == pytest.approx(0.5)
    assert float(losses.clamp_temp(jnp.float32(0.07))) == pytest.approx(0.07)


def test_hard_negatives_exclude_positive_and_follow_similarity():
    b = 8
    r = np.random.default_rng(2)
    sim = r.normal(size=(b, b)).astype(np.float32)
    sim[np.arange(b), np.arange(b)] = 100.0  # the positive is the most similar: still excluded
    for seed in range(20):
        t, i = losses.sample_hard_negatives(jax.random.PRNGKey(seed), sim, sim.T)
        assert (np.asarray(t) != np.arange(b)).all() and (np.asarray(i) != np.arange(b)).all()
    # One dominant off-diagonal entry per row is drawn (almost) always.
    hard = np.zeros((b, b), np.float32)
    target = (np.arange(b) + 3) % b
    hard[np.arange(b), target] = 30.0
    t, _ = losses.sample_hard_negatives(jax.random.PRNGKey(0), hard, hard)
    np.testing.assert_array_equal(np.asarray(t), target)


def test_mask_tokens_rules_and_rates():
    b, length, vocab = 64, 40, 1000
    r = np.random.default_rng(3)
    ids = r.integers(1000, 30000, size=(b, length)).astype(np.int32)
    ids[:, 0] = losses.CLS_ID
    lengths = r.integers(5, length, size=b)
    ids[np.arange(b), lengths - 1] = losses.SEP_ID
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, losses.PAD_ID)
    out, picked = losses.mask_tokens(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask),
                                     vocab, 0.15)
    out, picked = np.asarray(out), np.asarray(picked)
    special = np.isin(ids, [losses.CLS_ID, losses.SEP_ID, losses.PAD_ID])
    assert not picked[special].any()
    np.testing.assert_array_equal(out[~picked], ids[~picked])
    eligible = (~special).sum()
    assert abs(picked.sum() / eligible - 0.15) < 0.03
    n = picked.sum()
    frac_mask = (out[picked] == losses.MASK_ID).sum() / n
    frac_same = (out[picked] == ids[picked]).sum() / n  # ids >= 1000 never collide w/ random ids
    assert abs(frac_mask - 0.8) < 0.06 and abs(frac_same - 0.1) < 0.05
    assert (out[picked & (out != losses.MASK_ID) & (out != ids)] < vocab).all()


def test_mlm_loss_with_distillation():
    r = np.random.default_rng(4)
    logits = r.normal(size=(2, 5, 7)).astype(np.float32)
    logits_m = r.normal(size=(2, 5, 7)).astype(np.float32)
    tgt = r.integers(0, 7, size=(2, 5)).astype(np.int32)
    picked = np.zeros((2, 5), bool)
    picked[0, 1] = picked[1, 3] = picked[1, 4] = True
    lp = _log_softmax(logits)
    ce = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0][picked].mean()
    soft = np.exp(_log_softmax(logits_m))
    kd = -(lp * soft).sum(-1)[picked].mean()
    loss0, acc = losses.mlm_loss(logits, tgt, picked)
    np.testing.assert_allclose(float(loss0), ce, rtol=1e-5)
    loss, _ = losses.mlm_loss(logits, tgt, picked, logits_m, 0.4)
    np.testing.assert_allclose(float(loss), 0.6 * ce + 0.4 * kd, rtol=1e-5)
    want_acc = (logits.argmax(-1) == tgt)[picked].mean()
    assert float(acc) == pytest.approx(want_acc)


def test_picked_positions():
    picked = np.array([[0, 1, 0, 1], [1, 0, 0, 0]], bool)
    idx, valid, dropped = losses.picked_positions(jnp.asarray(picked), 5)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], [1, 3, 4])
    assert np.asarray(valid).tolist() == [True, True, True, False, False]
    assert int(dropped) == 0
    # Over capacity: the first K picks are kept, the rest counted as dropped.
    idx, valid, dropped = losses.picked_positions(jnp.asarray(picked), 2)
    np.testing.assert_array_equal(np.asarray(idx), [1, 3])
    assert np.asarray(valid).all() and int(dropped) == 1


def test_split_prefix_reassembles_caption():
    cls, sep = losses.CLS_ID, losses.SEP_ID
    ids = np.array([[cls, 11, 12, 13, 14, 0, 0, 0],
                    [cls, 21, 22, sep, 0, 0, 0, 0],
                    [cls, 31, 0, 0, 0, 0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    seen = set()
    for seed in range(30):
        p_ids, p_mask, d_ids, d_mask = map(np.asarray, losses.split_prefix(
            jax.random.PRNGKey(seed), jnp.asarray(ids), jnp.asarray(mask)))
        for row in range(3):
            words = [t for t in ids[row] if t not in (0, sep)]
            prefix = list(p_ids[row][p_mask[row] > 0])
            dec = list(d_ids[row][d_mask[row] > 0])
            assert prefix[0] == cls and dec[0] == cls and dec[-1] == sep
            assert prefix + dec[1:-1] == words  # prefix + target = caption
            assert (d_ids[row][d_mask[row] == 0] == 0).all()
            if row == 0:
                seen.add(len(prefix))
        # 1-word caption: empty-prefix captioning ([CLS] | [CLS] 31 [SEP]).
        assert list(d_ids[2][:3]) == [cls, 31, sep]
    assert seen == {1, 2, 3, 4}  # every split point of [CLS] 11 12 13 14 is drawn


def test_momentum_update_and_enqueue():
    pm = {"w": jnp.ones(3)}
    p = {"w": jnp.zeros(3)}
    np.testing.assert_allclose(np.asarray(momentum_update(pm, p, 0.995)["w"]), 0.995)
    q = jnp.zeros((6, 2))
    ptr = jnp.zeros((), jnp.int32)
    for k in range(4):
        q, ptr = enqueue(q, ptr, jnp.full((2, 2), k + 1.0))
    np.testing.assert_array_equal(np.asarray(q[:, 0]), [4, 4, 2, 2, 3, 3])  # wrapped around
    assert int(ptr) == 2
    with pytest.raises(ValueError, match="multiple of the global batch"):
        enqueue(jnp.zeros((5, 2)), ptr, jnp.ones((2, 2)))


def test_hard_negatives_never_draw_known_matches():
    import jax
    import jax.numpy as jnp

    from mplug_jax import losses
    b = 6
    sim = jnp.zeros((b, b)).at[0, 1].set(50.0).at[1, 0].set(50.0)  # 0 and 1 look alike
    matches = jnp.zeros((b, b), bool).at[0, 1].set(True).at[1, 0].set(True)
    for seed in range(20):
        neg_txt, neg_img = losses.sample_hard_negatives(jax.random.PRNGKey(seed), sim, sim.T,
                                                        matches)
        assert int(neg_txt[0]) not in (0, 1) and int(neg_img[1]) not in (0, 1)
    # without the match mask the look-alike is drawn almost always
    neg_txt, _ = losses.sample_hard_negatives(jax.random.PRNGKey(0), sim, sim.T)
    assert int(neg_txt[0]) == 1
    # a row where everything matches still gets a valid (non-diagonal) index
    all_match = jnp.ones((b, b), bool)
    neg_txt, _ = losses.sample_hard_negatives(jax.random.PRNGKey(1), sim, sim.T, all_match)
    assert all(0 <= int(n) < b and int(n) != i for i, n in enumerate(neg_txt))
