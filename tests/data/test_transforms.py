import math

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from mplug_jax.data.ops import randaugment as ra
from mplug_jax.data.ops import image as transforms


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((64, 64), Image.BICUBIC))


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 1.0)])
def test_resized_crop_params_respect_scale_ratio_bounds(scale):
    rng = _rng(1)
    for _ in range(200):
        top, left, h, w = transforms.resized_crop_params(300, 200, rng, scale)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        # Rounding of w and h allows a little slack around the sampled area/ratio.
        assert scale[0] * 0.97 <= h * w / 60000 <= scale[1] * 1.03
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    a = transforms.resized_crop_params(300, 200, _rng(5), scale)
    assert a == transforms.resized_crop_params(300, 200, _rng(5), scale)


def test_resized_crop_fallback_is_centre_crop_with_clamped_ratio():
    # A 1000x10 strip: no sample fits, so torchvision's fallback applies.
    assert transforms.resized_crop_params(1000, 10, _rng(), (0.9, 1.0)) == (0, 493, 10, 13)
    assert transforms.resized_crop_params(10, 1000, _rng(), (0.9, 1.0)) == (493, 0, 13, 10)


def test_train_transform_shapes_determinism_and_flip(photo):
    img = Image.fromarray(photo)
    kw = dict(crop_scale=(0.2, 1.0), randaug_n=2, randaug_m=7)
    a = transforms.train_transform(img, 32, _rng(3), **kw)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, transforms.train_transform(img, 32, _rng(3), **kw))
    assert not np.array_equal(a, transforms.train_transform(img, 32, _rng(4), **kw))
    # crop scale (1, 1) on a square image = the full image: output is the plain resize or
    # its mirror image, each about half of the time.
    full = transforms.eval_transform(img, 32)
    flips = []
    for seed in range(40):
        x = transforms.train_transform(img, 32, _rng(seed), crop_scale=(1.0, 1.0),
                                       randaug_n=0)
        same, mirrored = np.allclose(x, full, atol=1e-5), np.allclose(x, full[:, ::-1],
                                                                      atol=1e-5)
        assert same != mirrored
        flips.append(mirrored)
    assert 10 <= sum(flips) <= 30
    no_flip = [transforms.train_transform(img, 32, _rng(s), crop_scale=(1.0, 1.0), randaug_n=0,
                                          hflip=False) for s in range(5)]
    assert all(np.allclose(x, full, atol=1e-5) for x in no_flip)


@pytest.mark.parametrize("name", ra.OPS)
def test_each_op_keeps_shape_dtype_and_is_deterministic(photo, name):
    photo = (photo // 2 + 40).astype(np.uint8)  # not full range, so AutoContrast acts too
    args = ra.op_args(name, 7, _rng(2))
    out = ra.FUNCS[name](photo, *args)
    assert out.shape == photo.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ra.FUNCS[name](photo, *ra.op_args(name, 7, _rng(2))))
    if name == "Identity":
        np.testing.assert_array_equal(out, photo)
    else:
        assert not np.array_equal(out, photo), name


def test_op_magnitudes_at_m7():
    assert ra.op_args("Brightness", 7, _rng()) == pytest.approx((1.36,))
    assert ra.op_args("Sharpness", 7, _rng()) == pytest.approx((1.36,))
    signs = set()
    for seed in range(20):
        (shear,), (shift,), (deg,) = (ra.op_args(n, 7, _rng(seed))
                                      for n in ("ShearX", "TranslateX", "Rotate"))
        assert abs(shear) == pytest.approx(0.21) and abs(shift) == pytest.approx(7.0)
        assert abs(deg) == pytest.approx(21.0)
        signs.add(math.copysign(1, shear))
    assert signs == {-1.0, 1.0}
    assert ra.op_args("Equalize", 7, _rng()) == ()


def test_colour_ops_do_what_they_say(photo):
    dull = (photo // 4 + 100).astype(np.uint8)  # values in [100, 163]
    ac = ra.auto_contrast(dull)
    # The official float LUT can land on 254.999... -> 254 at the top.
    assert all(ac[..., c].min() == 0 and ac[..., c].max() >= 254 for c in range(3))

    def distance_from_uniform(x):
        cdf = np.cumsum(np.bincount(x[..., 0].ravel(), minlength=256)) / x[..., 0].size
        return np.abs(cdf - np.arange(1, 257) / 256).max()

    eq = ra.equalize(dull)
    # Large single bins (the black background) bound how flat it can get.
    assert distance_from_uniform(eq) < min(0.15, distance_from_uniform(dull) / 3)
    flat = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(ra.auto_contrast(flat), flat)
    np.testing.assert_array_equal(ra.equalize(flat), flat)
    br = ra.brightness(photo, 1.36)
    assert br.astype(float).mean() > photo.mean() * 1.2 and br.max() == 255
    np.testing.assert_array_equal(ra.brightness(photo, 1.0), photo)
    np.testing.assert_array_equal(ra.sharpness(photo, 1.0), photo)

    def detail(x):
        g = x.astype(float).mean(-1)
        return np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()

    assert detail(ra.sharpness(photo, 1.8)) > detail(photo) > detail(ra.sharpness(photo, 0.2))


def test_geometric_ops_move_pixels_as_stated():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 10] = 255  # vertical line at x=10
    shifted = ra.translate_x(img, 5.0)
    np.testing.assert_array_equal(shifted[:, :-5], img[:, 5:])
    assert (shifted[:, -5:] == 128).all()  # official gray fill
    down = ra.translate_y(np.rot90(img).copy(), -3.0)  # horizontal line moves down by 3
    assert down[:, :, 0].argmax(axis=0)[5] == np.rot90(img)[:, :, 0].argmax(axis=0)[5] + 3
    sheared = ra.shear_x(img, 0.5)
    cols = sheared[:, :, 0].argmax(axis=1)
    assert abs(cols[20] - (10 + 0.5 * 20)) <= 1 and abs(cols[4] - (10 + 0.5 * 4)) <= 1
    rows = ra.shear_y(np.rot90(img).copy(), 0.5)[:, :, 0].argmax(axis=0)
    assert abs(rows[20] - (np.rot90(img)[:, 20, 0].argmax() + 10)) <= 1
    np.testing.assert_array_equal(ra.shear_x(img, 0.0), img)
    rot = ra.rotate(img, 90.0)  # counter-clockwise: the line becomes horizontal, near the bottom
    ref = np.rot90(img)
    assert (np.abs(rot.astype(int) - ref.astype(int)) > 0).mean() < 0.1


def test_rand_augment_sampling(photo):
    out = ra.rand_augment(photo, _rng(0))
    np.testing.assert_array_equal(out, ra.rand_augment(photo, _rng(0)))
    np.testing.assert_array_equal(ra.rand_augment(photo, _rng(0), n=0), photo)
    # One non-identity op, applied with probability 0.5.
    changed = [not np.array_equal(ra.rand_augment(photo, _rng(s), n=1, ops=("Rotate",)), photo)
               for s in range(60)]
    assert 18 <= sum(changed) <= 42
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        ra.rand_augment(photo, _rng(), ops=("Solarize",))
