"""A second transformers environment (4.57.x) for compatibility tests, as an overlay on this venv.

`pip install --target` puts transformers 4.57 with the hub/tokenizers versions it needs into a cache folder;
putting that folder first on PYTHONPATH shadows the venv's transformers 5.x in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPAT_PACKAGES = [
    "transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2",
    "requests", "urllib3", "charset_normalizer", "certifi", "idna",
]


def compat_pythonpath() -> str:
    """The overlay folder, installed on first use; skips the test with the reason when pip cannot install it."""
    root = Path(os.environ.get("DSVL_COMPAT_DIR", Path.home() / ".cache" / "deepseek-vl-hf" / "transformers-4.57.6"))
    marker = root / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root), *COMPAT_PACKAGES]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"could not install the transformers 4.57 overlay: {result.stderr[-500:]}")
        marker.touch()
    return str(root)
