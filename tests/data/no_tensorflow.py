"""Preamble for subprocess tests: a fresh interpreter in which `import tensorflow` fails; and
`run_prepare_without_tensorflow`, the `mplug-jax prepare` entry points run in one."""
import pathlib
import subprocess
import sys
import textwrap

BLOCK_TENSORFLOW = """
import importlib.abc, importlib.machinery, sys

class NoTF(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Found, but importing it fails: code that merely probes for TF keeps working,
    # code that needs it breaks (even where TF is installed).
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ImportError("tensorflow is blocked in this test")

    def exec_module(self, module):
        raise ImportError("tensorflow is blocked in this test")

sys.meta_path.insert(0, NoTF())
"""

# What the prepare body starts with (a parser `p` with the prepare arguments) and ends with.
_PREPARE = """
import argparse
from mplug_jax.data import prepare
from mplug_jax.data.formats import builder as tfds_builder
p = argparse.ArgumentParser()
prepare.add_prepare_args(p)
"""
_NO_TF_LOADED = """
assert not any(m.startswith("tensorflow.") or m == "tensorflow" for m in sys.modules)
print("OK")
"""


def run_prepare_without_tensorflow(body: str) -> str:
    """Run `body` (Python, dedented here) in a fresh interpreter at the repository root where
    `import tensorflow` fails, after `argparse`, `prepare`, `tfds_builder` imports and a parser
    `p` with the prepare arguments; asserts a clean exit with no TensorFlow module loaded and
    returns the output."""
    code = BLOCK_TENSORFLOW + _PREPARE + textwrap.dedent(body) + _NO_TF_LOADED
    repo = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
    return out.stdout
