"""A second transformers environment (4.57.x) for compatibility tests, as an overlay on this venv.

`pip install --target` puts transformers 4.57 with the hub/tokenizers versions it needs into a cache folder;
putting that folder first on PYTHONPATH shadows the venv's transformers 5.x in a subprocess.

The 4.57 run is a pass criterion: in CI (`CI=true`) an overlay that cannot be installed FAILS the test, saying
why; elsewhere (a developer offline) it is a skip with the same reason.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPAT_PACKAGES = [
    "transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2",
    "requests", "urllib3", "charset_normalizer", "certifi", "idna",
    # TRL's client test: the venv's datasets 5.x needs huggingface_hub 1.x, which transformers 4.57 refuses.
    "datasets==4.8.5", "fsspec==2026.2.0",
]


def in_ci() -> bool:
    """True under CI (the `CI` variable set to true/1/yes, as GitHub Actions, GitLab and `.ci/run` users set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def compat_pythonpath() -> str:
    """The overlay folder, installed on first use. When pip cannot install it: a failure in CI, else a skip."""
    digest = hashlib.sha256(" ".join(COMPAT_PACKAGES).encode()).hexdigest()[:8]  # a new package list, a new folder
    default = Path.home() / ".cache" / "deepseek-vl-hf" / f"transformers-4.57.6-{digest}"
    root = Path(os.environ.get("DSVL_COMPAT_DIR", default))
    marker = root / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root), *COMPAT_PACKAGES]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            reason = (
                f"could not install the transformers 4.57 overlay ({' '.join(COMPAT_PACKAGES)}) into {root}: "
                f"pip exited with {result.returncode}: {result.stderr[-500:]}"
            )
            if in_ci():
                pytest.fail(f"{reason}; the 4.57 compatibility run is required in CI (CI=true)", pytrace=False)
            pytest.skip(reason)
        marker.touch()
    return str(root)
