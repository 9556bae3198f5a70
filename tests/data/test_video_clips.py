"""mPLUG-2 clip transforms: the official test path reproduced bit-exactly on the golden fixture's
raw frames (sampling + nearest resize + normalisation), and temporally consistent training
augmentation."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mplug_jax.data.ops import video

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures-mplug2"


def _fixture_dirs():
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "frames.npz").is_file())


@pytest.mark.parametrize("fixture", _fixture_dirs() or [None], ids=lambda p: getattr(p, "name", "none"))
def test_official_test_path_reproduces_fixture_inputs(fixture):
    if fixture is None:
        pytest.skip(f"no mPLUG-2 fixtures under {FIXTURES}")
    frames, inputs = np.load(fixture / "frames.npz"), np.load(fixture / "inputs.npz")
    want = inputs["video"]  # B x 3 x T x R x R
    b, _, t, r, _ = want.shape
    for i in range(b):
        raw = frames[f"clip{i}_raw"]
        idx = video.frame_indices(len(raw), t)
        np.testing.assert_array_equal(idx, frames[f"clip{i}_sampled_indices"])
        got = video.eval_clip(list(raw[idx]), r)
        np.testing.assert_array_equal(got.transpose(3, 0, 1, 2), want[i])


def test_resize_nearest_by_hand():
    clip = np.arange(2 * 3 * 5 * 1, dtype=np.uint8).reshape(2, 3, 5, 1)
    out = video.resize_nearest(clip, 4)
    # rows: floor(i * 3/4) = 0, 0, 1, 2; columns: floor(j * 5/4) = 0, 1, 2, 3
    np.testing.assert_array_equal(out, clip[:, [0, 0, 1, 2]][:, :, [0, 1, 2, 3]])
    with pytest.raises(ValueError, match="positive"):
        video.resize_nearest(clip, 0)


def test_train_clip_is_temporally_consistent():
    """Every frame of a clip gets the same crop, flip and RandAugment draw: a clip of identical
    frames stays identical, and a frame equals the same transform applied alone."""
    rng = np.random.default_rng(0)
    base = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    shifted = np.roll(base, 7, axis=1)
    for seed in range(8):
        out = video.train_clip([base, base, shifted], 24, np.random.default_rng(seed))
        assert out.shape == (3, 24, 24, 3) and out.dtype == np.float32
        np.testing.assert_array_equal(out[0], out[1])
        assert not np.array_equal(out[0], out[2])
    a = video.train_clip([base], 24, np.random.default_rng(3))
    b = video.train_clip([base], 24, np.random.default_rng(4))
    assert not np.array_equal(a, b)  # the draw changes with the stream


def test_clip_errors():
    with pytest.raises(ValueError, match="at least one frame"):
        video.eval_clip([], 8)
    with pytest.raises(ValueError, match="one size"):
        video.eval_clip([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], 8)
    frames = [Image.new("L", (6, 4), 128)] * 2  # grey PIL frames become RGB
    assert video.eval_clip(frames, 8).shape == (2, 8, 8, 3)
