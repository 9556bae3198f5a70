"""`mplug-jax export` on a pretraining workdir: official layout, re-importable, both param sets."""
import json

import numpy as np
import pytest

from mplug_jax import cli, trainer
from mplug_jax import params as P
from mplug_jax.interop import convert
from test_trainer import loop_config


def test_export_pretraining_workdir_round_trips(tmp_path):
    cfg = loop_config()
    cfg.total_steps, cfg.ckpt_every_steps = 2, 1
    trainer.run(cfg, str(tmp_path / "run"))
    out = str(tmp_path / "exp.safetensors")
    assert cli.main(["export", "--ckpt", str(tmp_path / "run"), "--out", out, "--step", "2"]) == 0
    assert cli.main(["export", "--ckpt", str(tmp_path / "run"), "--momentum",
                     "--out", str(tmp_path / "m.safetensors")]) == 0
    base = str(tmp_path / "exp")
    conv = convert.load_official(out, base + ".config_bert.json", base + ".config.yaml",
                                 allow_missing=None)
    assert json.load(open(base + ".config_bert.json"))["hidden_size"] == 32
    model, params, momentum = __import__("mplug_jax.checkpoint", fromlist=["x"]).load_for_export(
        str(tmp_path / "run"))
    want, got = P.flatten(params), P.flatten(conv.params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    mom = convert.load_official(str(tmp_path / "m.safetensors"), base + ".config_bert.json",
                                base + ".config.yaml")
    k = "vision/pos_embed"
    np.testing.assert_array_equal(np.asarray(P.flatten(mom.params)[k]),
                                  np.asarray(P.flatten(momentum)[k]))
    with pytest.raises(FileNotFoundError, match="available"):
        __import__("mplug_jax.checkpoint", fromlist=["x"]).load_for_export(
            str(tmp_path / "run"), step=7)
