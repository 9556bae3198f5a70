"""`mplug-jax export` on a pretraining workdir: official layout, re-importable, both param sets."""
import json

import numpy as np
import pytest

from mplug_jax import cli, workdir
from mplug_jax import params as P
from mplug_jax.interop import convert


def test_export_pretraining_workdir_round_trips(tmp_path, pretrain_workdir):
    run = str(pretrain_workdir)
    out = str(tmp_path / "exp.safetensors")
    assert cli.main(["export", "--ckpt", run, "--out", out, "--step", "2"]) == 0
    assert cli.main(["export", "--ckpt", run, "--momentum",
                     "--out", str(tmp_path / "m.safetensors")]) == 0
    base = str(tmp_path / "exp")
    conv = convert.load_official(out, base + ".config_bert.json", base + ".config.yaml",
                                 allow_missing=None)
    assert json.load(open(base + ".config_bert.json"))["hidden_size"] == 32
    _, params, momentum = workdir.restore_params(run)
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
        workdir.restore_params(run, step=7)
