"""Official checkpoint import/export, the parity checker, and clear errors for bad checkpoints."""
import json
import shutil

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from conftest import fixture_dirs
from mplug_jax import cli
from mplug_jax import params as P
from mplug_jax.interop import convert, official_config, official_io, official_keys
from mplug_jax.interop.errors import CheckpointError
from mplug_jax.parity import run_parity
from mplug_jax.models.mplug import MPLUG

FIXTURES = fixture_dirs()
needs_fixture = pytest.mark.skipif(not FIXTURES, reason="../shared/fixtures absent: official "
                                                        "parity fixtures not available")


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda p: p.name)
def test_parity_on_official_fixture(fx, capsys):
    rows = run_parity(str(fx))
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    assert {"image_embeds", "fusion_text", "decoder_logits", "loss"} <= {r.name for r in rows}
    assert cli.main(["parity", "--fixture", str(fx)]) == 0
    assert "parity PASSED" in capsys.readouterr().out


@needs_fixture
def test_parity_checker_fails_on_a_perturbed_weight(tmp_path):
    fx = tmp_path / "fx"
    shutil.copytree(FIXTURES[0], fx)
    state = load_file(str(fx / "model.safetensors"))
    key = "text_encoder.encoder.layer.0.output.LayerNorm.bias"
    state[key] = state[key] + np.float32(1e-3)
    save_file(state, str(fx / "model.safetensors"))
    rows = run_parity(str(fx))
    assert not all(r.ok for r in rows)
    assert cli.main(["parity", "--fixture", str(fx)]) == 1


@needs_fixture
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_import_export_round_trip_is_bit_identical(tmp_path, suffix):
    if suffix == ".pth":
        pytest.importorskip("torch", reason="torch extra not installed")
    fx = FIXTURES[0]
    src = str(fx / "model.safetensors")
    if suffix == ".pth":
        import torch
        src = str(tmp_path / "official.pth")
        torch.save({"model": {k: torch.from_numpy(v) for k, v in
                              load_file(str(fx / "model.safetensors")).items()}}, src)
    args = ["--config-bert", str(fx / "config_bert.json"), "--config-yaml",
            str(fx / "config.yaml")]
    assert cli.main(["convert", "--checkpoint", src, "--out", str(tmp_path / "conv")] + args) == 0
    out = str(tmp_path / f"back{suffix}")
    assert cli.main(["export", "--ckpt", str(tmp_path / "conv"), "--out", out]) == 0
    want = official_io.load_state_dict(src)
    got = official_io.load_state_dict(out)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    exported_cfg = json.load(open(str(tmp_path / "back.config_bert.json")))
    assert exported_cfg["stride_layer"] == json.load(open(fx / "config_bert.json"))["stride_layer"]


def _large_style_model(**kw):
    cfg = dict(hidden_size=64, num_heads=2, mlp_dim=128, text_layers=1, fusion_layers=3,
               fusion_stride=1, decoder_layers=1, image_size=32, patch_size=16,
               vision_width=96, vision_layers=1, vision_heads=2, embed_dim=16)
    cfg.update(kw)
    return MPLUG.from_config(cfg)


def test_large_style_with_momentum_round_trip_and_resized_posemb():
    """visn_fc + visn_layer_norm, `*_m` momentum copies, stride 1, and a different resolution."""
    model = _large_style_model()
    params = P.init_params(model, jax.random.PRNGKey(0))
    momentum = jax.tree.map(lambda x: x * 0.5, params)
    state = convert.export_official(params, model, momentum)
    assert "visn_fc.weight" in state and "visn_layer_norm_m.bias" in state
    assert state["visn_fc.weight"].shape == (64, 96)
    kw = convert.model_kwargs(model)
    shapes = {k: v.shape for k, v in P.flatten(P.abstract_params(model)).items()}
    imp = official_keys.import_state_dict(state, kw, 0, shapes, allow_missing=None)
    flat = P.flatten(params)
    assert imp.params.keys() == flat.keys()
    for k, v in imp.params.items():
        np.testing.assert_array_equal(v, flat[k])
    # Official momentum copies exist for the encoders, decoder, visn_fc and the ITC projections;
    # itm_head and temp have none.
    assert {"visn_fc/kernel", "vision_proj/kernel", "decoder/lm_bias"} <= imp.momentum.keys()
    assert "itm_head/kernel" not in imp.momentum and "temp" not in imp.momentum
    for k, v in imp.momentum.items():
        np.testing.assert_array_equal(v, np.asarray(flat[k]) * 0.5)
    bigger = dict(kw, image_size=48)
    imp = official_keys.import_state_dict(state, bigger, 0, None, allow_missing=None)
    assert imp.params["vision/pos_embed"].shape == (1 + 9, 96) and imp.notes


def _tiny_official(tmp_path):
    model = _large_style_model()
    state = convert.export_official(P.init_params(model, jax.random.PRNGKey(0)), model)
    bert, yml = official_config.official_config_files(convert.model_kwargs(model))
    (tmp_path / "config_bert.json").write_text(json.dumps(bert))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(yml))
    return state


def _load(tmp_path, state, name="ckpt.safetensors", **kw):
    path = str(tmp_path / name)
    save_file(state, path)
    return convert.load_official(path, str(tmp_path / "config_bert.json"),
                                 str(tmp_path / "config.yaml"), **kw)


def test_checkpoint_from_unimodal_config_loads(tmp_path):
    conv = _load(tmp_path, _tiny_official(tmp_path))
    assert conv.model.has_visn_fc and conv.model.pattern == "acc" and not conv.missing


def test_queues_and_temperature_are_imported(tmp_path):
    state = _tiny_official(tmp_path)
    rng = np.random.default_rng(0)
    state["image_queue"] = rng.normal(size=(16, 64)).astype(np.float32)  # official [E, Q]
    state["text_queue"] = rng.normal(size=(16, 64)).astype(np.float32)
    state["idx_queue"] = np.arange(64)[None].astype(np.int64)
    state["queue_ptr"] = np.array([8])
    state["temp"] = np.array(0.05, np.float32)
    conv = _load(tmp_path, state)
    q = conv.queues()
    np.testing.assert_array_equal(q["image_queue"], state["image_queue"].T)
    assert q["text_queue"].shape == (64, 16) and int(q["queue_ptr"]) == 8
    assert float(P.flatten(conv.params)["temp"]) == pytest.approx(0.05)
    back = convert.export_official(conv.params, conv.model, extras=conv.extras)
    np.testing.assert_array_equal(back["image_queue"], state["image_queue"])


def test_vocab_mismatch_names_the_key(tmp_path):
    state = _tiny_official(tmp_path)
    state["text_encoder.embeddings.word_embeddings.weight"] = np.zeros((30523, 64), np.float32)
    with pytest.raises(
            CheckpointError,
            match=r"text_encoder.embeddings.word_embeddings.weight: shape \(30523, 64\)"):
        _load(tmp_path, state)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _tiny_official(tmp_path)
    del state["text_encoder.encoder.layer.0.output.dense.bias"]
    with pytest.raises(CheckpointError, match="layer.0.output.dense.bias"):
        _load(tmp_path, state)
    state = _tiny_official(tmp_path)
    state["some_new_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="unexpected keys.*\n.*some_new_head"):
        _load(tmp_path, state)
    state = _tiny_official(tmp_path)
    del state["itm_head.bias"], state["itm_head.weight"]
    with pytest.raises(CheckpointError, match="itm_head"):
        _load(tmp_path, state, allow_missing=None)
    assert "itm_head/bias" in _load(tmp_path, state).missing  # allowed by default, reported


def test_untied_decoder_is_rejected(tmp_path):
    state = _tiny_official(tmp_path)
    state["text_decoder.cls.predictions.decoder.weight"] = state[
        "text_decoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="differs from the decoder word embed"):
        _load(tmp_path, state)


def test_truncated_empty_and_missing_files(tmp_path):
    state = _tiny_official(tmp_path)
    path = tmp_path / "full.safetensors"
    save_file(state, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        official_io.load_state_dict(str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        official_io.load_state_dict(str(tmp_path / "empty.pth"))
    with pytest.raises(FileNotFoundError):
        official_io.load_state_dict(str(tmp_path / "nope.pth"))
    pytest.importorskip("torch", reason="torch extra not installed")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        official_io.load_state_dict(str(tmp_path / "junk.pth"))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _tiny_official(tmp_path)
    rc = cli.main(["convert", "--checkpoint", str(tmp_path / "empty.safetensors"),
                   "--config-bert", str(tmp_path / "config_bert.json"), "--out",
                   str(tmp_path / "o")])
    assert rc == 2 and "error:" in capsys.readouterr().err
