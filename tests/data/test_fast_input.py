"""The fast input path: PIL-native RandAugment and uint8 transforms pixel-identical to the
reference implementation on real photos, uint8 batches normalised on the device to the same
floats, and the reduced-scale JPEG decoding option (different pixels, bounded)."""
import io

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from mplug_jax.data import pipeline
from mplug_jax.data.ops import augment_fast
from mplug_jax.data.ops import randaugment
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.inputs import vqa as vqa_input
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.models import vit


def _jpeg(name: str, size: tuple[int, int], quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.BICUBIC).save(
        buf, "JPEG", quality=quality)
    return buf.getvalue()


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
JPEGS = {name: _jpeg(name, (640, 480)) for name in PHOTOS}


class _Coin:
    """Stands in for the generator in `op_args`: a fixed draw picks the sign."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("name", randaugment.OPS)
def test_each_fast_op_equals_the_reference_op(name):
    small = [np.asarray(transforms.decode_image(JPEGS[p]).resize((97, 83))) for p in PHOTOS]
    small.append(np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8))
    small.append(np.full((9, 12, 3), 77, np.uint8))  # flat: the LUT ops' identity cases
    for m in (0, 1, 3, 5, 7, 7.5, 10):  # 7.5: non-integer shifts take PIL's bilinear path
        for coin in (0.2, 0.8):
            args = randaugment.op_args(name, m, _Coin(coin))
            for x in small:
                want = randaugment.FUNCS[name](x, *args)
                got = np.asarray(augment_fast.FUNCS[name](Image.fromarray(x), *args))
                np.testing.assert_array_equal(got, want, err_msg=f"{name} m={m} {args}")


@pytest.mark.parametrize("size,crop_scale", [(384, (0.5, 1.0)), (256, (0.2, 1.0))])
def test_train_transform_is_pixel_identical_to_the_reference(size, crop_scale):
    for seed in range(24):
        img = transforms.decode_image(JPEGS[PHOTOS[seed % len(PHOTOS)]])
        want = transforms.train_transform_reference(img, size, np.random.default_rng(seed),
                                                    crop_scale=crop_scale)
        got = transforms.train_transform(img, size, np.random.default_rng(seed),
                                         crop_scale=crop_scale)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
        # What the pipeline ships with image_dtype='uint8', normalised later, is the same.
        u8 = pipeline.process_image(JPEGS[PHOTOS[seed % len(PHOTOS)]], size,
                                    np.random.default_rng(seed), image_dtype="uint8",
                                    augment={"crop_scale": crop_scale, "randaug_n": 2,
                                             "randaug_m": 7, "hflip": True})
        assert u8.dtype == np.uint8
        np.testing.assert_array_equal(transforms.normalize(u8), want)


def test_fast_rand_augment_draws_like_the_reference():
    img = transforms.decode_image(JPEGS["coffee"]).resize((64, 48))
    for seed in range(40):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        want = randaugment.rand_augment(np.asarray(img), r1, n=3, m=9)
        got = augment_fast.rand_augment(img, r2, n=3, m=9)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert r1.random() == r2.random()  # the generators advanced alike
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        augment_fast.rand_augment(img, np.random.default_rng(0), ops=("Solarize",))
    with pytest.raises(ValueError, match="needs an RGB image"):
        augment_fast.rand_augment(img.convert("L"), np.random.default_rng(0))


def test_uint8_images_are_normalised_on_the_device_bit_identically():
    every = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3) % 256
    every = np.concatenate([every, every[:, ::-1]]).astype(np.uint8)
    got = jax.jit(vit.normalize_uint8)(every)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got), transforms.normalize(every))
    enc = vit.VisionEncoder(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)
    params = enc.init(jax.random.PRNGKey(0), transforms.normalize(every))
    np.testing.assert_array_equal(np.asarray(enc.apply(params, every)),
                                  np.asarray(enc.apply(params, transforms.normalize(every))))
    with pytest.raises(ValueError, match="float .CLIP-normalised. or uint8"):
        enc.apply(params, every.astype(np.int32))


def _stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.abs(diff).mean()), float(10 * np.log10(255.0 ** 2 / np.mean(diff ** 2)))


def test_reduced_decode_stays_within_resampling_noise():
    aug = {"crop_scale": (0.5, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True}
    size = 96
    for i, name in enumerate(PHOTOS):
        big = _jpeg(name, (480, 360))  # every crop side >= 2 * 96: decoded at 1/2 or less
        full = transforms.decode_train_image(big, size, np.random.default_rng(i), **aug)
        red = transforms.decode_train_image(big, size, np.random.default_rng(i),
                                            reduced_decode=True, **aug)
        assert red.shape == full.shape and red.dtype == np.uint8
        assert not np.array_equal(red, full)  # it did decode at a reduced scale
        mad, psnr = _stats(red, full)
        # Same crop, flip and ops: only resampling differs. The gap between two filters
        # (bilinear vs bicubic) of the same crop, without augmentation:
        rng = np.random.default_rng(i)
        img = transforms.decode_image(big)
        top, left, h, w = transforms.resized_crop_params(*img.size, rng, aug["crop_scale"])
        crop = img.crop((left, top, left + w, top + h))
        bicubic = np.asarray(crop.resize((size, size), Image.BICUBIC))
        filt_mad, filt_psnr = _stats(np.asarray(crop.resize((size, size), Image.BILINEAR)),
                                     bicubic)
        plain = dict(aug, randaug_n=0, hflip=False)
        red_mad, red_psnr = _stats(transforms.decode_train_image(
            big, size, np.random.default_rng(i), reduced_decode=True, **plain), bicubic)
        assert red_mad < 1.5 * filt_mad and red_psnr > filt_psnr - 3, (name, red_mad, filt_mad)
        assert mad < 3.0 and psnr > 30, (name, mad, psnr)
    # Crops too small to reduce (or non-JPEG input) take the exact path.
    small = JPEGS["astronaut"]
    for seed in range(4):
        np.testing.assert_array_equal(
            transforms.decode_train_image(small, 384, np.random.default_rng(seed),
                                          reduced_decode=True, **aug),
            transforms.decode_train_image(small, 384, np.random.default_rng(seed), **aug))
    png = io.BytesIO()
    Image.open(io.BytesIO(_jpeg("coffee", (480, 360)))).save(png, "PNG")
    np.testing.assert_array_equal(
        transforms.decode_train_image(png.getvalue(), size, np.random.default_rng(0),
                                      reduced_decode=True, **aug),
        transforms.decode_train_image(png.getvalue(), size, np.random.default_rng(0), **aug))


def test_presets_ship_uint8_and_decode_at_full_scale():
    from configs import pretrain, vqa
    for config in (pretrain.get_config("base"), vqa.get_config("base")):
        assert config.input.image_dtype == "uint8" and config.input.reduced_decode is False


def test_pipelines_ship_uint8_images_that_normalise_to_the_float_batches():
    recs = [{"image": JPEGS[p], "caption": f"a photo of a {p}", "question": f"is it a {p}?",
             "answers": ["yes"], "weights": [1.0]} for p in PHOTOS]
    aug = {"crop_scale": (0.2, 1.0), "randaug_n": 2, "randaug_m": 7, "hflip": True}
    batches = {dt: next(iter(pretrain_input.dataset(recs, image_size=48, batch_size=4,
                                                       augment=aug, image_dtype=dt)))
               for dt in pipeline.IMAGE_DTYPES}
    assert batches["uint8"]["image"].dtype == np.uint8
    np.testing.assert_array_equal(transforms.normalize(batches["uint8"]["image"]),
                                  batches["float32"]["image"])
    np.testing.assert_array_equal(batches["uint8"]["idx"], batches["float32"]["idx"])
    with pytest.raises(ValueError, match="image_dtype must be one of"):
        pretrain_input.dataset(recs, image_size=48, batch_size=4, image_dtype="float16")
    # reduced_decode: 640x480 JPEGs, 48 px crops of at least 96 px: decoded at 1/2 or less.
    reduced = next(iter(pretrain_input.dataset(recs, image_size=48, batch_size=4,
                                                  augment=aug, image_dtype="uint8",
                                                  reduced_decode=True)))
    assert reduced["image"].shape == batches["uint8"]["image"].shape
    assert not np.array_equal(reduced["image"], batches["uint8"]["image"])
    assert np.abs(reduced["image"].astype(int) - batches["uint8"]["image"]).mean() < 3.0

    def vqa_batch(**opts):
        cfg = ml_collections.ConfigDict({
            "augment": {"enabled": True, **aug}, "max_question_tokens": 8,
            "max_answer_tokens": 4, "max_skip_rate": 0.0, **opts})
        return next(iter(vqa_input.dataset(recs, cfg, image_size=48, max_answers=2,
                                           batch_size=4, train=True)))

    u8, f32 = vqa_batch(image_dtype="uint8"), vqa_batch()
    assert u8["image"].dtype == np.uint8 and f32["image"].dtype == np.float32
    np.testing.assert_array_equal(transforms.normalize(u8["image"]), f32["image"])
    reduced = vqa_batch(image_dtype="uint8", reduced_decode=True)
    assert reduced["image"].shape == u8["image"].shape
    with pytest.raises(ValueError, match="image_dtype must be one of"):
        vqa_batch(image_dtype="int8")
