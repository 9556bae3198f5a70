"""mPLUG-2: parity with the official fixtures (../shared/fixtures-mplug2), checkpoint import /
export, and the local temporal modules' identity start."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED
from mplug_jax import cli
from mplug_jax.interop import official_io
from mplug_jax.mplug2 import convert as mplug2_convert
from mplug_jax.interop.errors import CheckpointError
from mplug_jax.parity import format_table
from mplug_jax.mplug2.parity import run_mplug2_parity
from mplug_jax.mplug2.model import MPLUG2

ROOT = SHARED / "fixtures-mplug2"
FIXTURES = sorted(p for p in ROOT.iterdir() if (p / "expected.npz").is_file()) \
    if ROOT.is_dir() else []
needs_fixture = pytest.mark.skipif(not FIXTURES, reason=f"{ROOT} absent: no official mPLUG-2 "
                                                        "parity fixture to compare with")


def _files(fx):
    return str(fx / "config_bert.json"), str(fx / "config.yaml")


@pytest.fixture(scope="module")
def fixture_dir():
    return FIXTURES[0]


@pytest.fixture(scope="module")
def state(fixture_dir):
    return official_io.load_state_dict(str(fixture_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def conv(fixture_dir, state):
    return mplug2_convert.load_official(state, *_files(fixture_dir))


@needs_fixture
@pytest.mark.parametrize("fx", FIXTURES, ids=lambda p: p.name)
def test_cli_parity_passes_on_every_mplug2_fixture(fx, capsys):
    # Through the CLI, so the dispatch of mplug_jax/parity/__init__.py (v1 vs mPLUG-2 fixtures) is covered.
    code = cli.main(["parity", "--fixture", str(fx)])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out
    n = int(out.rsplit("parity PASSED: ", 1)[1].split("/")[0])
    meta = json.loads((fx / "meta.json").read_text())
    # 6 tokenizer / preprocessing rows, every expected array, 14 rows per (run, task) search
    runs = meta["generation"]["runs"]
    assert n == 6 + len(meta["shapes"]["expected"]) + 14 * sum(
        t in r for r in runs.values() for t in ("vqa", "caption"))


@needs_fixture
def test_corrupting_one_array_fails_exactly_its_rows(fixture_dir, conv, tmp_path):
    fx = tmp_path / "fx"
    fx.mkdir()
    for name in os.listdir(fixture_dir):
        if name not in ("expected.npz", "generation.npz"):
            os.symlink(fixture_dir / name, fx / name)
    expected = dict(np.load(fixture_dir / "expected.npz"))
    expected["universal_latents"] = expected["universal_latents"].copy()
    expected["universal_latents"].flat[7] += 1e-3
    np.savez(fx / "expected.npz", **expected)
    gen = dict(np.load(fixture_dir / "generation.npz"))
    token = gen["vqa_eosbias_trace_token"] = gen["vqa_eosbias_trace_token"].copy()
    token[0, 1, 3] += 1
    np.savez(fx / "generation.npz", **gen)
    rows = run_mplug2_parity(str(fx), conv=conv)
    assert {r.name for r in rows if not r.ok} == {"universal_latents",
                                                  "gen:eosbias:vqa:trace_token"}, \
        format_table(rows)


def _assert_bit_identical(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


@needs_fixture
def test_export_round_trip_is_bit_identical(fixture_dir, conv, state, tmp_path):
    _assert_bit_identical(mplug2_convert.export_official(conv), state)
    # Through the CLI: convert -> our checkpoint dir -> export -> the same state dict, and
    # config files that map back to the same model.
    bert, yml = _files(fixture_dir)
    assert cli.main(["convert", "--checkpoint", str(fixture_dir / "model.safetensors"),
                     "--config-bert", bert, "--config-yaml", yml,
                     "--out", str(tmp_path / "ours")]) == 0
    out = str(tmp_path / "back.safetensors")
    assert cli.main(["export", "--ckpt", str(tmp_path / "ours"), "--out", out]) == 0
    _assert_bit_identical(official_io.load_state_dict(out), state)
    again = mplug2_convert.load_official(out, str(tmp_path / "back.config_bert.json"),
                                         str(tmp_path / "back.config.yaml"))
    assert again.model == conv.model and again.start_layer == conv.start_layer


@needs_fixture
def test_checkpoint_errors_name_the_keys(fixture_dir, state):
    no_lt = {k: v for k, v in state.items() if ".lmhra" not in k}
    with pytest.raises(CheckpointError, match=r"(?s)local temporal.*resblocks\.0\.lmhra1\."
                                              r".*allow_missing_temporal"):
        mplug2_convert.load_official(no_lt, *_files(fixture_dir))
    other = dict(state)
    del other["text_encoder.encoder.layer.1.latents"]
    with pytest.raises(CheckpointError, match="latents"):
        mplug2_convert.load_official(other, *_files(fixture_dir))
    extra = {**state, "text_encoder.encoder.layer.0.bogus.weight": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected.*\n.*bogus"):
        mplug2_convert.load_official(extra, *_files(fixture_dir))


@needs_fixture
def test_video_model_from_an_image_checkpoint_equals_the_image_model(fixture_dir, state, conv):
    image_ckpt = {k: v for k, v in state.items() if ".lmhra" not in k}
    video = mplug2_convert.load_official(image_ckpt, *_files(fixture_dir),
                                         allow_missing_temporal=True)
    assert any("identity" in n for n in video.notes)
    frames = jnp.asarray(np.load(fixture_dir / "inputs.npz")["video"]).transpose(0, 2, 3, 4, 1)
    b, t = frames.shape[:2]
    m = video.model
    patches = (m.image_size // m.patch_size) ** 2

    def f(mod):
        vid = mod.encode_video(frames)
        img = jnp.stack([mod.encode_image(frames[:, i]) for i in range(t)], 1)
        return vid, img, mod.vision(frames, temporal=False)
    # Only the vision params: one compile for both checkpoints.
    encode = jax.jit(lambda p: m.apply({"params": {"vision": p["vision"]}}, method=f))

    vid, img, spatial = encode(video.params)
    # Every patch token of frame i equals the image model's token on frame i alone (float32
    # rounding: the two programs fuse differently; 2.4e-6 seen with XLA:CPU's older emitters) ...
    np.testing.assert_allclose(vid[:, 1:].reshape(b, t, patches, -1), img[:, :, 1:], atol=5e-6)
    # ... and the whole sequence (mean class token) equals the spatial-only encoder.
    np.testing.assert_allclose(vid, spatial, atol=5e-6)
    # The fixture's trained (non-zero) temporal modules do change the output.
    vid_lt, _, spatial_lt = encode(conv.params)
    assert np.abs(np.asarray(vid_lt) - np.asarray(spatial_lt)).max() > 1e-2


def test_presets_validate_and_bad_configs_raise():
    from configs.mplug2.models import model_config
    # Release and paper-base: no connected fusion layer, vision width = H (no visn_fc);
    # tiny covers the connected layer (stride 1).
    patterns = {"mplug2_tiny": "ac", "mplug2_base": "aaa", "mplug2_large": "aaaaaa"}
    for name, pattern in patterns.items():
        m = MPLUG2.from_config(model_config(name))
        assert m.pattern == pattern and not m.has_visn_fc
    with pytest.raises(ValueError, match="universal_layers"):
        MPLUG2.from_config(model_config("mplug2_tiny"), universal_layers=9)
    with pytest.raises(ValueError, match="unknown mPLUG-2 config keys"):
        MPLUG2.from_config(model_config("mplug2_tiny"), fusion_layout="skip")
    with pytest.raises(ValueError, match="mplug2_huge"):
        model_config("mplug2_huge")


def test_converter_round_trips_other_shapes(tmp_path):
    """Large-style vision (visn_fc), one universal layer, connected fusion layers and unused
    fusion modules: our params -> official keys + config files -> our params, unchanged."""
    import yaml
    from configs.mplug2.models import model_config
    from mplug_jax import params as P
    from mplug_jax.mplug2 import model as M
    model = MPLUG2.from_config(model_config("mplug2_tiny"), vision_width=32, universal_layers=1,
                               fusion_layers=3, fusion_stride=1)
    assert model.has_visn_fc and model.pattern == "acc"
    flat = {k: np.asarray(v) for k, v in
            P.flatten(M.init_params(model, jax.random.PRNGKey(1))).items()}
    fields = {f: getattr(model, f) for f in model_config("mplug2_tiny")}
    state = mplug2_convert.export_state_dict(flat, fields, start_layer=2)
    assert "visn_fc.weight" in state and "text_encoder.encoder.layer.2.latents" in state
    bert, yml = mplug2_convert.official_config_files(model, start_layer=2)
    (tmp_path / "bert.json").write_text(json.dumps(bert))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(yml))
    conv = mplug2_convert.load_official(state, str(tmp_path / "bert.json"),
                                        str(tmp_path / "task.yaml"))
    assert conv.model == model and conv.start_layer == 2 and not conv.missing
    got = {k: np.asarray(v) for k, v in P.flatten(conv.params).items()}
    assert set(got) == set(flat)
    for k, v in flat.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
