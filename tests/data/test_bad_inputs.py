"""Bad inputs written as real files: converted where sensible, otherwise skipped and counted."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from mplug_jax.data import pipeline
from mplug_jax.data.inputs import pretrain as pretrain_input
from mplug_jax.data.ops import image as transforms
from mplug_jax.data.ops import text
from mplug_jax.data.ops.image import BadRecord


@pytest.fixture(scope="module")
def cat():
    return np.asarray(Image.fromarray(skdata.chelsea()).resize((48, 32), Image.BICUBIC))


def _jpeg(path, arr, **kw):
    Image.fromarray(arr).save(path, "JPEG", quality=90, **kw)
    return str(path)


def _bomb_png(path):
    """A valid tiny PNG whose header claims 30000 x 30000 pixels (CRC fixed up)."""
    Image.new("RGB", (4, 4)).save(path, "PNG")
    raw = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then chunk length + type
    raw[ihdr:ihdr + 8] = struct.pack(">II", 30000, 30000)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(raw))
    return str(path)


def _reason(obj, **kw):
    with pytest.raises(BadRecord) as e:
        transforms.decode_image(obj, **kw)
    return e.value.reason, str(e.value)


def test_unreadable_files_raise_with_reason_and_name(tmp_path, cat):
    good = _jpeg(tmp_path / "good.jpg", cat)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(cat).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    assert transforms.decode_image(good).size == (48, 32)
    cases = {"missing.jpg": "missing_file", "empty.jpg": "empty_file", "text.jpg": "bad_image",
             "cut.jpg": "truncated", "cut.png": "truncated"}
    for name, want in cases.items():
        reason, msg = _reason(str(tmp_path / name))
        assert reason == want and name in msg, (name, reason, msg)
    cut = (tmp_path / "cut.jpg").read_bytes()
    reason, msg = _reason(cut)
    assert reason == "truncated" and msg.startswith("<bytes>")
    # Callers that read the file themselves (the TFDS builders) pass its name along.
    reason, msg = _reason(cut, name=str(tmp_path / "cut.jpg"))
    assert reason == "truncated" and msg.startswith(str(tmp_path / "cut.jpg"))
    assert _reason(tmp_path)[0] == "missing_file"  # a directory
    assert _reason(12345)[0] == "bad_record"
    assert _reason(np.zeros((4, 4, 3), np.float32))[0] == "bad_image"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_odd_modes_are_converted_to_rgb(tmp_path, cat, mode):
    rgb = Image.fromarray(cat)
    if mode == "I;16":
        img = Image.fromarray(cat[..., 0].astype(np.uint16) * 257)
        assert img.mode == "I;16"
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([cat, np.full(cat.shape[:2], 90, np.uint8)]), "RGBA")
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = transforms.decode_image(str(path))
    assert out.mode == "RGB" and out.size == (48, 32)
    arr = np.asarray(out).astype(int)
    if mode == "I;16":  # 16-bit data is scaled by its maximum (to_rgb), not clipped at 255
        want = cat[..., 0].astype(float) * 257 / (int(cat[..., 0].max()) * 257) * 255
        assert np.abs(arr[..., 0] - want).max() <= 1
    elif mode in ("RGBA", "P", "CMYK"):
        assert np.abs(arr - cat).mean() < 12
    x = transforms.eval_transform(out, 16)
    assert x.shape == (16, 16, 3) and np.isfinite(x).all()


def test_huge_images_are_reduced_or_rejected(tmp_path):
    big = np.asarray(Image.fromarray(skdata.astronaut()).resize((1200, 900)))
    path = _jpeg(tmp_path / "big.jpg", big)
    img = transforms.decode_image(path, max_pixels=200_000)
    assert img.size[0] * img.size[1] <= 200_000 and img.size[0] >= 250  # 1/4 scale: 300x225
    tiny = transforms.decode_image(path, max_pixels=1_000)  # beyond draft's 1/8: reduce()
    assert tiny.size[0] * tiny.size[1] <= 1_000
    Image.fromarray(big).save(tmp_path / "big.png")
    assert _reason(str(tmp_path / "big.png"), max_pixels=200_000)[0] == "too_large"
    reason, msg = _reason(_bomb_png(tmp_path / "bomb.png"))
    assert reason == "too_large" and "bomb.png" in msg


def test_captions_converted_or_rejected():
    rng = np.random.default_rng(0)
    assert text.choose_caption(b"A Dog!", rng, 30) == "a dog"
    assert text.choose_caption([None, 3, "", "A cat."], rng, 30) == "a cat"
    for bad in ("", "  ?! ", None, 7, [], [None, ""], {"text": "x"}):
        with pytest.raises(BadRecord) as e:
            text.choose_caption(bad, rng, 30)
        assert e.value.reason == "bad_caption"


def test_pipeline_over_real_bad_files(tmp_path, cat, caplog):
    good = [_jpeg(tmp_path / f"ok{i}.jpg", np.roll(cat, i, axis=1)) for i in range(14)]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\x00garbage" * 20)
    Image.fromarray(cat).convert("L").save(tmp_path / "gray.png")  # converted, not skipped
    records = [{"image": p, "caption": "a cat on a sofa"} for p in good]
    records[2:2] = [{"image": str(tmp_path / "zero.jpg"), "caption": "zero"},
                    {"image": str(tmp_path / "nothere.jpg"), "caption": "missing"},
                    {"image": str(tmp_path / "gray.png"), "caption": "gray cat"},
                    {"image": good[0], "caption": 42},
                    {"image": str(tmp_path / "junk.jpg"), "caption": "junk"},
                    {"image": good[1]}]
    kw = dict(image_size=16, batch_size=5, augment={}, train=True, seed=0, num_epochs=1,
              max_skip_rate=0.5, skip_check_after=1)
    it = iter(pretrain_input.dataset(records, **kw))
    with caplog.at_level("WARNING", logger="mplug_jax.data.pipeline"):
        batches = list(it)
    assert len(batches) == 3 and all(b["image"].shape == (5, 16, 16, 3) for b in batches)
    idx = np.concatenate([b["idx"] for b in batches])
    assert 4 in idx  # the grayscale image is used
    assert not set(idx.tolist()) & {2, 3, 5, 6, 7}
    stats = pipeline.skip_stats(it)
    assert {k: v for k, v in stats.skipped.items() if v} == {
        "empty_file": 1, "missing_file": 1, "bad_caption": 1, "bad_image": 1, "bad_record": 1}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("zero.jpg", "nothere.jpg", "junk.jpg"):
        assert name in logged
    # Same pipeline, but strict: 5 skipped of 20 is far above 1 %.
    with pytest.raises(pipeline.DataError, match="max_skip_rate=0.01"):
        list(pretrain_input.dataset(records, **{**kw, "max_skip_rate": 0.01}))
