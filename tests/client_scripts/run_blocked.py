"""Run a client script where `deepseek_vl_hf` cannot be imported: `python run_blocked.py SCRIPT ARGS...`.

Users load our folders with `trust_remote_code=True` in their own environments; this reproduces that: only the
folder's remote code and the third-party client are available.
"""

import importlib.abc
import runpy
import sys


class _BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepseek_vl_hf":
            raise ImportError("deepseek_vl_hf is blocked: this client must work from the folder's remote code")


sys.meta_path.insert(0, _BlockPackage())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
