"""Read torch-saved files and pickles without running code from them (no torch needed).

A pickle names Python callables (`GLOBAL module name`) that the standard unpickler imports
and calls, so a file can run any code when it is read. `load` uses an unpickler that knows a
short list of safe constructors - containers, torch tensors (rebuilt as numpy arrays from the
file's raw storages), numpy arrays - and refuses every other name with `UnsafeObjectError`
naming the file and the refused object, before anything is called.

Formats: the zip archives of `torch.save` (torch >= 1.6) and of TorchScript (`torch.jit.save`,
e.g. OpenAI CLIP `.pt`; its TorchScript code is never compiled or run, module objects become
`ScriptObject`s holding their attributes), the legacy `torch.save` format (plain data only),
and plain pickle files.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class PickleReadError(ValueError):
    """A pickled file cannot be read safely: unreadable, or it holds a refused object."""


class UnsafeObjectError(PickleReadError):
    """A pickled file holds an object the safe reader refuses (reading it could run code)."""


class ScriptObject:
    """A TorchScript module or object: its pickled attributes in `attrs`, nothing else."""

    def __init__(self, *args):
        self.attrs: dict = {}

    def __setstate__(self, state):
        self.attrs = dict(state) if isinstance(state, dict) else {"state": state}


def _bfloat16():
    import ml_dtypes  # a JAX dependency
    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        dtype = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(_bfloat16() if dtype == "bfloat16" else dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 -> a numpy array (a copy: storages may be shared)."""
    flat, offset = storage, int(offset)
    if not (isinstance(flat, np.ndarray) and flat.ndim == 1 and flat.dtype != object
            and flat.flags.c_contiguous):
        raise ValueError("a tensor whose storage is not one of the file's raw storages")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
    if (len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0
            or (0 not in size and last >= flat.size)):
        # as_strided does not check bounds: a lying file must not read outside its storage.
        raise ValueError(f"tensor of size {size} / stride {stride} at offset {offset} does not "
                         f"fit its storage of {flat.size} elements")
    if not size:
        return np.array(flat[offset])
    if 0 in size:
        return np.zeros(size, flat.dtype)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], size, tuple(s * flat.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, *_):
    return data


_NUMPY_NAMES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                            "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype")}
_SAFE = {("collections", "OrderedDict"): collections.OrderedDict,
         ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
         ("builtins", "complex"): complex,
         ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
         ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
         # TorchScript's typed containers: identity functions in torch.jit._pickle too.
         ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str=None: value,
         **{("torch.jit._pickle", f"build_{kind}list"): list
            for kind in ("int", "double", "bool", "tensor")}}


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream, path: str, storage=None):
        super().__init__(stream)
        self._path, self._storage = path, storage

    def find_class(self, module, name):
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _NUMPY_NAMES:
            import importlib
            return getattr(importlib.import_module(module), name)
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        raise UnsafeObjectError(
            f"refused to read {self._path}: it holds a `{module}.{name}` object; only lists, "
            "tuples, dicts, strings, numbers, tensors and numpy arrays are read (other "
            "objects could run code from the file)")

    def persistent_load(self, pid):
        if self._storage is None or not (isinstance(pid, tuple) and pid and pid[0] == "storage"
                                          and isinstance(pid[1], _StorageType)):
            raise PickleReadError(f"cannot read {self._path}: it holds tensors in the legacy "
                                  "torch format; install torch (pip install 'mplug-jax[torch]')"
                                  " or re-save it with a current torch or as .safetensors")
        return self._storage(pid[1].dtype, str(pid[2]))


def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise PickleReadError(f"cannot read {path}: a zip file but not a torch archive "
                              "(no <name>/data.pkl)")
    prefix = pkl[0][:-len("data.pkl")]
    big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
    cache: dict[str, np.ndarray] = {}

    def storage(dtype: np.dtype, key: str) -> np.ndarray:
        if key not in cache:
            raw = zf.read(f"{prefix}data/{key}")
            cache[key] = np.frombuffer(raw, dtype.newbyteorder(">") if big else dtype)
        return cache[key]

    return _Unpickler(io.BytesIO(zf.read(pkl[0])), path, storage).load()


def is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript zip archive (`torch.jit.save`: it has a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/")[1:2] == ["code"] for n in zf.namelist())


def load(path: str) -> Any:
    """The object in a torch-saved file or pickle, read without running code from it.

    Tensors come back as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`), TorchScript objects
    as `ScriptObject`.

    Raises:
      FileNotFoundError: no such file.
      UnsafeObjectError: the file holds an object outside the safe list (named in the message).
      PickleReadError: the file is not a readable pickle / torch archive.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return _load_zip(path, zf)
        with open(path, "rb") as f:
            unpickler = _Unpickler(f, path)
            first = unpickler.load()
            if not (type(first) is int and first == _LEGACY_MAGIC):
                return first  # a plain pickle
            # Legacy torch.save: magic number, protocol version, sys info, then the object.
            unpickler.load()
            unpickler.load()
            return unpickler.load()
    except PickleReadError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise PickleReadError(f"cannot read {path}: truncated, or not a pickle or torch "
                              f"archive ({type(err).__name__}: {err})") from err


def script_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{dotted name: array} of every tensor attribute in a tree of `ScriptObject`s (a
    TorchScript module's parameters and buffers; tensor attributes that are neither, such as
    OpenAI CLIP's attention masks, are included too)."""
    out: dict[str, np.ndarray] = {}
    attrs = obj.attrs if isinstance(obj, ScriptObject) else obj
    for name, value in attrs.items():
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
        elif isinstance(value, (ScriptObject, dict)):
            out.update(script_state_dict(value, f"{prefix}{name}."))
    return out
