"""The OpenCV backend of the training image ops (`input.augment.backend='cv2'`): the same
draws as the PIL backend, the official affine RandAugment conventions, colour ops identical to
the reference, a resize within resampling noise of PIL's bicubic, and clear errors."""
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mplug_jax.data import pipeline
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.inputs import vqa as vqa_input
from mplug_jax.data.ops import augment_cv2
from mplug_jax.data.ops import augment_fast
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import randaugment
from mplug_jax.data.ops import video
from test_fast_input import JPEGS, PHOTOS, _jpeg  # the same 640x480 JPEGs of real photos

AUG = {"crop_scale": (0.5, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True}


def _photo(name: str, size=(97, 83)) -> np.ndarray:
    return np.asarray(transforms.decode_image(JPEGS[name]).resize(size))


def _bilinear_warp(x: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """The official warp written out: out[y, x] samples src at inverse(forward) @ (x, y, 1)
    (OpenCV's convention: pixel centres at whole coordinates), bilinear, gray outside."""
    h, w = x.shape[:2]
    inv = np.linalg.inv(np.vstack([forward.astype(np.float64), [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    padded = np.full((h + 4, w + 4, 3), 128.0)
    padded[2:-2, 2:-2] = x

    def at(yy, xx):
        return padded[np.clip(yy + 2, 0, h + 3), np.clip(xx + 2, 0, w + 3)]

    out = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
           + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    return out


@pytest.mark.parametrize("name,forward", [
    ("ShearX", lambda f, w, h: [[1, f, 0], [0, 1, 0]]),
    ("ShearY", lambda f, w, h: [[1, 0, 0], [f, 1, 0]]),
    ("TranslateX", lambda d, w, h: [[1, 0, -d], [0, 1, 0]]),
    ("TranslateY", lambda d, w, h: [[1, 0, 0], [0, 1, -d]]),
    ("Rotate", lambda deg, w, h: _rotation(deg, w, h)),
])
def test_affine_ops_follow_the_official_matrices(name, forward):
    x = _photo("astronaut")
    h, w = x.shape[:2]
    for value in (0.21, -0.21) if name.startswith("Shear") else (
            (7.0, -7.0, 3.5) if name.startswith("Translate") else (21.0, -21.0)):
        got = augment_cv2.FUNCS[name](x, value).astype(np.float64)
        want = _bilinear_warp(x, np.asarray(forward(value, w, h)))
        # OpenCV interpolates with 1/32-pixel fixed-point weights: within a level or two,
        # except for border pixels where it blends with the gray fill differently.
        inner = (slice(3, -3), slice(3, -3))
        diff = np.abs(got - want)[inner]
        assert np.median(diff) <= 1.0 and np.mean(diff > 3) < 0.01, (name, value)
    # Whole-pixel shifts move pixels exactly, as the PIL backend's paste does.
    if name.startswith("Translate"):
        np.testing.assert_array_equal(
            augment_cv2.FUNCS[name](x, 7.0),
            np.asarray(augment_fast.FUNCS[name](Image.fromarray(x), 7.0)))


def _rotation(degrees: float, w: int, h: int) -> list[list[float]]:
    """Counter-clockwise (y down) rotation about (w / 2, h / 2), written out."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    cx, cy = w / 2, h / 2
    return [[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy]]


@pytest.mark.parametrize("name", ["Identity", "AutoContrast", "Equalize", "Brightness",
                                  "Sharpness"])
def test_colour_ops_equal_the_reference(name):
    images = [_photo(p) for p in PHOTOS]
    images.append(np.full((9, 12, 3), 77, np.uint8))
    for m in (0, 3, 7, 10):
        args = randaugment.op_args(name, m, np.random.default_rng(m))
        for x in images:
            np.testing.assert_array_equal(augment_cv2.FUNCS[name](x, *args),
                                          randaugment.FUNCS[name](x, *args), err_msg=name)


@pytest.mark.parametrize("size,crop_scale", [(384, (0.5, 1.0)), (256, (0.2, 1.0))])
def test_resize_stays_within_resampling_noise(size, crop_scale):
    """cv2's crop resize vs PIL's bicubic (the official) on the same crops, against the gap
    between PIL's own bilinear and bicubic filters."""
    gaps, noise = [], []
    for seed in range(16):
        img = transforms.decode_image(JPEGS[PHOTOS[seed % len(PHOTOS)]])
        top, left, h, w = transforms.resized_crop_params(*img.size,
                                                         np.random.default_rng(seed),
                                                         crop_scale)
        box = (left, top, left + w, top + h)
        bicubic = np.asarray(img.crop(box).resize((size, size), Image.BICUBIC), np.float64)
        bilinear = np.asarray(img.crop(box).resize((size, size), Image.BILINEAR), np.float64)
        got = augment_cv2.resize_box(np.asarray(img), box, size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        gaps.append(np.abs(got - bicubic).mean())
        noise.append(np.abs(bilinear - bicubic).mean())
    assert np.mean(gaps) < np.mean(noise), (np.mean(gaps), np.mean(noise))
    assert max(gaps) < 2.0


@pytest.mark.parametrize("size,crop_scale", [(384, (0.5, 1.0)), (256, (0.2, 1.0))])
def test_cv2_pipeline_draws_like_pil_and_stays_close(size, crop_scale):
    aug = dict(AUG, crop_scale=crop_scale)
    gaps = []
    for seed in range(24):
        jpeg = JPEGS[PHOTOS[seed % len(PHOTOS)]]
        r_pil, r_cv2 = np.random.default_rng(seed), np.random.default_rng(seed)
        pil = transforms.decode_train_image(jpeg, size, r_pil, **aug)
        cv2 = transforms.decode_train_image(jpeg, size, r_cv2, backend="cv2", **aug)
        assert r_pil.bit_generator.state == r_cv2.bit_generator.state, seed  # same draws
        assert cv2.shape == pil.shape and cv2.dtype == np.uint8
        gaps.append(np.abs(cv2.astype(int) - pil).mean())
    # Same crop, flip and ops: only resampling (and the half-pixel of the affine ops) differ.
    assert np.median(gaps) < 1.5 and max(gaps) < 12, gaps
    # Without RandAugment and flip the two differ by the resize alone.
    plain = dict(aug, randaug_n=0, hflip=False)
    a = transforms.decode_train_image(JPEGS["coffee"], size, np.random.default_rng(0), **plain)
    b = transforms.decode_train_image(JPEGS["coffee"], size, np.random.default_rng(0),
                                      backend="cv2", **plain)
    assert 0 < np.abs(a.astype(int) - b).mean() < 1.5


def test_official_backend_is_pil_resize_then_the_opencv_ops():
    for seed in range(12):
        jpeg = JPEGS[PHOTOS[seed % len(PHOTOS)]]
        plain = dict(AUG, randaug_n=0)
        np.testing.assert_array_equal(  # no RandAugment: PIL's resize and flip, exactly
            transforms.decode_train_image(jpeg, 128, np.random.default_rng(seed),
                                          backend="official", **plain),
            transforms.decode_train_image(jpeg, 128, np.random.default_rng(seed), **plain))
        rng = np.random.default_rng(seed)
        resized = transforms.decode_train_image(jpeg, 128, rng, **plain)  # crop + flip drawn
        np.testing.assert_array_equal(
            transforms.decode_train_image(jpeg, 128, np.random.default_rng(seed),
                                          backend="official", **AUG),
            augment_cv2.rand_augment(resized, rng, n=AUG["randaug_n"], m=AUG["randaug_m"]))


def test_reduced_decode_and_video_clips_take_the_backend():
    aug = dict(AUG, randaug_n=0, hflip=False)
    gaps, noise = [], []
    for i, name in enumerate(PHOTOS):
        big = _jpeg(name, (480, 360))  # every crop side >= 2 * 96: decoded at 1/2 or less
        full = transforms.decode_train_image(big, 96, np.random.default_rng(i), **aug)
        red = transforms.decode_train_image(big, 96, np.random.default_rng(i), backend="cv2",
                                            reduced_decode=True, **aug)
        assert red.shape == full.shape and red.dtype == np.uint8
        gaps.append(np.abs(red.astype(int) - full).mean())
        img = transforms.decode_image(big)
        top, left, h, w = transforms.resized_crop_params(*img.size, np.random.default_rng(i),
                                                         aug["crop_scale"])
        crop = img.crop((left, top, left + w, top + h))
        noise.append(np.abs(np.asarray(crop.resize((96, 96), Image.BILINEAR)).astype(int)
                            - np.asarray(crop.resize((96, 96), Image.BICUBIC))).mean())
    # DCT downscale + a bilinear warp of the fractional box vs the exact PIL path: about the
    # gap between PIL's bilinear and bicubic filters on the same crops.
    assert np.mean(gaps) < 1.5 * np.mean(noise) and max(gaps) < 4.0, (gaps, noise)
    frames = np.stack([_photo("rocket", (64, 48))] * 3)
    clip = video.train_clip(frames, 32, np.random.default_rng(0), backend="cv2")
    assert clip.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(clip[0], clip[2])  # temporally consistent


def test_pipelines_accept_the_backend_and_check_it_before_reading():
    recs = [{"image": JPEGS[p], "caption": f"a photo of a {p}", "question": f"is it a {p}?",
             "answers": ["yes"], "weights": [1.0]} for p in PHOTOS]
    batches = {b: next(iter(pretrain_input.dataset(
        recs, image_size=48, batch_size=4, augment=dict(AUG, backend=b), image_dtype="uint8")))
        for b in transforms.BACKENDS}
    assert batches["cv2"]["image"].shape == batches["pil"]["image"].shape == (4, 48, 48, 3)
    np.testing.assert_array_equal(batches["cv2"]["idx"], batches["pil"]["idx"])
    assert np.abs(batches["cv2"]["image"].astype(int) - batches["pil"]["image"]).mean() < 3

    def vqa(backend):
        cfg = ml_collections.ConfigDict({
            "augment": {"enabled": True, **AUG, "backend": backend}, "max_question_tokens": 8,
            "max_answer_tokens": 4, "max_skip_rate": 0.0, "image_dtype": "uint8"})
        return vqa_input.dataset(recs, cfg, image_size=48, max_answers=2, batch_size=4,
                                 train=True)

    assert next(iter(vqa("cv2")))["image"].shape == (4, 48, 48, 3)
    # A bad name fails when the pipeline is built, not as skipped records.
    with pytest.raises(ValueError, match=r"input.augment.backend must be one of"):
        vqa("opencv")
    with pytest.raises(ValueError, match=r"input.augment.backend must be one of"):
        pipeline.augment_options({"enabled": True, "backend": "PIL"}, pipeline.DEFAULT_AUGMENT)


def test_missing_opencv_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    augment_cv2._cv2.cache_clear()
    try:
        for backend in ("cv2", "official"):
            with pytest.raises(ImportError,
                               match=rf"backend='{backend}' needs OpenCV.*opencv-python-headless"):
                pipeline.augment_options({"enabled": True, "backend": backend})
        # The PIL backend needs nothing more.
        assert pipeline.augment_options({"enabled": True, "backend": "pil"}) == {
            "backend": "pil"}
    finally:
        augment_cv2._cv2.cache_clear()


def test_presets_use_the_official_ops():
    """mPLUG presets: PIL's resize and the official OpenCV RandAugment; the mPLUG-2 video
    presets keep the PIL ops (their release's library not checked)."""
    from configs import caption, nlvr2, pretrain, retrieval, snli_ve, vqa
    from configs.mplug2 import pretrain as pretrain2, retrieval as retrieval2
    from configs.mplug2 import video_caption, video_qa
    for mod, variant in ((caption, "base"), (nlvr2, "base"), (pretrain, "base"),
                         (retrieval, "coco_base"), (snli_ve, "base"), (vqa, "base")):
        config = mod.get_config(variant)
        assert config.input.augment.backend == "official", mod.__name__
        assert pipeline.augment_options(config.input.augment, pipeline.DEFAULT_AUGMENT)[
            "backend"] == "official"
    for mod in (pretrain2, retrieval2, video_caption, video_qa):
        assert mod.get_config("base").input.augment.backend == "pil", mod.__name__
