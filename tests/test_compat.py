"""The core suites (model, processor, generation) run again under transformers 4.57.x, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compat import compat_pythonpath

CORE_SUITES = [
    "tests/test_modeling.py", "tests/test_processing.py", "tests/test_generation.py",
    "tests/test_model_contract.py", "tests/test_processor_contract.py", "tests/test_backend_contract.py",
]


@pytest.mark.compat
def test_core_suites_pass_on_transformers_4_57(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": compat_pythonpath(), "HF_HUB_OFFLINE": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip().startswith("4.57.")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), *CORE_SUITES],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1] and "failed" not in result.stdout.splitlines()[-1]
