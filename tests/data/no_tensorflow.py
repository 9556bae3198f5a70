"""Preamble for subprocess tests: a fresh interpreter in which `import tensorflow` fails."""

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
