"""No reader runs code from a data or checkpoint file.

Each test hands a pickle whose `__reduce__` calls `os.system("touch MARKER")` to one entry
point that reads `.pth` / `.pt` / `.bin` files and checks that the payload never ran and that
the error names the file. Legitimate files (torch.save zip and legacy formats, TorchScript
archives) still read, with or without torch.
"""
import json
import os
import pickle
import sys
import zipfile
from typing import List

import ml_collections
import numpy as np
import pytest

from mplug_jax import cli, safe_pickle
from mplug_jax.data.formats import grounding as grounding_format
from mplug_jax.data.ops.image import DataError
from mplug_jax.interop import official_io
from mplug_jax.interop.errors import CheckpointError


class _Payload:
    """Pickles as a call of os.system: unpickling it with the standard unpickler runs it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plain_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump([("a.jpg", 0, [1, 2, 3, 4], "a dog", []), _Payload(marker)], f)


def _torch_zip(path, marker):
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    torch.save({"model": {"w": torch.ones(2)}, "evil": _Payload(marker)}, str(path))


def _torchscript_like(path, marker):
    """A zip laid out as a TorchScript archive whose data.pkl holds the payload."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
        zf.writestr("archive/code/__torch__.py", "")
        zf.writestr("archive/version", "3\n")


MAKERS = {"plain": _plain_pickle, "torch_zip": _torch_zip, "torchscript": _torchscript_like}


@pytest.fixture(params=sorted(MAKERS))
def evil(request, tmp_path):
    """(path of a code-running .pth, marker path that the payload would create)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / f"evil_{request.param}.pth"
    MAKERS[request.param](path, marker)
    assert not marker.exists()
    return path, marker


def _check_refused(message, path, marker):
    assert not marker.exists(), "the file's code ran"
    assert str(path) in message
    assert "refused" in message and "system" in message


def test_prepare_cli_refuses_a_code_running_split_file(evil, tmp_path, capsys):
    path, marker = evil
    rc = cli.main(["prepare", "--format", "grounding", "--annotations", str(path),
                   "--image-root", str(tmp_path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc != 0
    _check_refused(out.out + out.err, path, marker)


def test_score_cli_refuses_a_code_running_split_file(evil, tmp_path, capsys):
    path, marker = evil
    results = tmp_path / "grounding_result.json"
    results.write_text(json.dumps([{"id": 0, "pred_box": [1, 2, 3, 4]}]))
    rc = cli.main(["score", "--task", "grounding", "--results", str(results),
                   "--annotations", str(path)])
    assert rc == 2
    _check_refused(capsys.readouterr().err, path, marker)


def test_grounding_train_source_refuses_a_code_running_split_file(evil, tmp_path):
    from mplug_jax.data.inputs import grounding as grounding_input
    path, marker = evil
    (tmp_path / "splits" / "unc").mkdir(parents=True)
    split = tmp_path / "splits" / "unc" / "unc_train.pth"
    os.rename(path, split)
    cfg = ml_collections.ConfigDict(dict(dataset="unc", data_root=str(tmp_path),
                                         split_root=str(tmp_path / "splits")))
    with pytest.raises(DataError) as err:
        grounding_input.source(cfg, "train")
    _check_refused(str(err.value), split, marker)


def test_convert_cli_refuses_a_code_running_checkpoint(evil, tmp_path, capsys):
    path, marker = evil
    config = tmp_path / "config_bert.json"
    config.write_text("{}")
    rc = cli.main(["convert", "--checkpoint", str(path), "--config-bert", str(config),
                   "--out", str(tmp_path / "conv")])
    assert rc == 2
    _check_refused(capsys.readouterr().err, path, marker)


@pytest.mark.parametrize("source", ["clip", "bert", "checkpoint"])
def test_pretrained_init_refuses_a_code_running_checkpoint(evil, tmp_path, source):
    from mplug_jax import pretrained
    from mplug_jax.models.mplug import MPLUG
    from test_trainer import loop_config
    path, marker = evil
    model = MPLUG.from_config(loop_config().model.to_dict())
    config = tmp_path / "config_bert.json"
    config.write_text("{}")
    init = ml_collections.ConfigDict({"clip": "", "bert": "", "checkpoint": "",
                                      "config_bert": str(config)})
    init[source] = str(path)
    with pytest.raises(CheckpointError) as err:
        pretrained.load(init, model)
    _check_refused(str(err.value), path, marker)


# ---- legitimate files still read ------------------------------------------------------------

SPLIT = [("COCO_train2014_000000000001.jpg", 0, [10.0, 20.0, 30.0, 40.0], "The dog", ["x"]),
         ("COCO_train2014_000000000002.jpg", 7, [1, 2, 3, 4], "a red cup", [])]


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_split_files_read_without_torch(tmp_path, monkeypatch, legacy):
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    path = tmp_path / "unc_val.pth"
    torch.save(SPLIT, str(path), _use_new_zipfile_serialization=not legacy)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError):
        import torch  # noqa: F401,F811
    assert grounding_format.load_split_file(str(path)) == SPLIT
    src = grounding_format.read(str(path), str(tmp_path))
    assert [r["phrase"] for r in src] == ["the dog", "a red cup"]
    assert src[1]["bbox"] == [1.0, 2.0, 3.0, 4.0]


def test_split_file_of_another_type_is_a_one_line_error(tmp_path):
    path = tmp_path / "odd.pth"
    with open(path, "wb") as f:
        pickle.dump({"not": "a list"}, f)
    with pytest.raises(DataError, match=f"{path} holds a dict, not a list of tuples"):
        grounding_format.load_split_file(str(path))
    path.write_bytes(b"\x80\x02junk")
    with pytest.raises(DataError, match=f"cannot read {path}: truncated"):
        grounding_format.load_split_file(str(path))


def _scripted_module(torch):
    """A scripted module (TorchScript reads the class source, so it is defined in a file)."""
    class Tiny(torch.nn.Module):
        sizes: List[int]  # typed containers pickle through torch.jit._pickle helpers

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.full((2,), 0.5, dtype=torch.float16))
            self.sizes = [1, 2]
            self.names = {"a": 1}

        def forward(self, x):
            return self.proj(x) * self.scale * len(self.sizes) * self.names["a"]

    return torch.jit.script(Tiny())


def test_torchscript_archive_reads_like_torch_jit_load(tmp_path):
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    path = str(tmp_path / "clip.pt")
    module = _scripted_module(torch)
    module.save(path)
    assert safe_pickle.is_torchscript(path)
    assert safe_pickle.load(path).attrs["sizes"] == [1, 2]
    want = {k: v.float().numpy() for k, v in torch.jit.load(path).state_dict().items()}
    got = official_io.load_state_dict(path)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], want[k])


def test_checkpoint_reads_without_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    path = str(tmp_path / "official.pth")
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"model": {"w_t": weight.t(), "half": torch.ones(3, dtype=torch.bfloat16),
                          "step": torch.tensor(5)}}, path)
    with_torch = official_io.load_state_dict(path)
    monkeypatch.setitem(sys.modules, "torch", None)
    without = official_io.load_state_dict(path)
    assert sorted(without) == ["half", "step", "w_t"]
    for k in without:
        assert without[k].dtype == with_torch[k].dtype
        np.testing.assert_array_equal(without[k], with_torch[k])
    np.testing.assert_array_equal(without["w_t"], weight.t().numpy())


@pytest.mark.parametrize("size, ok", [((4,), True), ((2, 2), True), ((5,), False),
                                      ((100,), False)])
def test_tensor_views_must_fit_their_storage(tmp_path, size, ok):
    """A file claiming a tensor larger than its storage must not read memory beyond it."""
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    import collections
    import io

    class Ref:
        pass

    class Tensor:
        def __reduce__(self):
            stride = (2, 1) if len(size) == 2 else (1,)
            return torch._utils._rebuild_tensor_v2, (Ref(), 0, size, stride, False,
                                                     collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Ref) \
                else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"w": Tensor()})
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data.getvalue())
        zf.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    if ok:
        np.testing.assert_array_equal(safe_pickle.load(str(path))["w"],
                                      np.arange(4, dtype=np.float32).reshape(size))
    else:
        with pytest.raises(safe_pickle.PickleReadError, match="does not fit its storage"):
            safe_pickle.load(str(path))
