"""Running the real `lmms-eval` command on a model folder and reading what it writes.

The command runs in a subprocess exactly as a user would type it (`lmms-eval --model deepseek_vl_hf ...`); its
results file (`<output>/<model>/<time>_results.json`) and per-task samples (`..._samples_<task>.jsonl`, with
`--log_samples`) are read back into plain dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepseek_vl_hf.evaluation import MODEL_NAME


@dataclass
class HarnessRun:
    """One finished lmms-eval run: its results file, the parsed results and samples, the command and its time."""

    results_path: Path
    results: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]]
    command: list[str]
    seconds: float

    def metric(self, task: str, name: str = "exact_match", filter_name: str = "none") -> float:
        return float(self.results["results"][task][f"{name},{filter_name}"])

    def n_samples(self, task: str) -> int:
        return int(self.results["n-samples"][task]["effective"])


def lmms_eval_executable() -> list[str]:
    """The `lmms-eval` console script of this Python environment (or `python -m lmms_eval`, the same entry)."""
    script = Path(sys.executable).parent / "lmms-eval"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]


def lmms_eval_command(
    model: str | Path,
    tasks: str,
    output_path: str | Path,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    dtype: str = "auto",
    device: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """The `lmms-eval` argument list for `--model deepseek_vl_hf` on `model` (samples logged)."""
    model_args = f"pretrained={Path(model).resolve()},dtype={dtype},batch_size={batch_size}"
    if device:
        model_args += f",device={device}"
    command = [*lmms_eval_executable(), "--model", MODEL_NAME, "--model_args", model_args, "--tasks", tasks,
               "--output_path", str(output_path), "--log_samples"]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return command


def offline_env(cache_dir: str | Path) -> dict[str, str]:
    """Environment for local tasks: no Hub access, the parquet files' dataset cache under `cache_dir`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache_dir)}


def run_lmms_eval(command: list[str], output_path: str | Path, env: dict[str, str] | None = None,
                  log_path: str | Path | None = None) -> HarnessRun:
    """Run `command` (from `lmms_eval_command`) and read the results file it writes under `output_path`.

    lmms-eval exits 0 even when evaluation fails (it logs the error), so a run without a new results file is an
    error that quotes the end of its log."""
    output_path = Path(output_path)
    before = set(output_path.rglob("*_results.json")) if output_path.exists() else set()
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    if log_path is not None:
        Path(log_path).write_text(log, encoding="utf-8")
    new = sorted(set(output_path.rglob("*_results.json")) - before, key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not new:
        raise RuntimeError(f"lmms-eval failed (exit {proc.returncode}, no results file under {output_path}):\n"
                           + "\n".join(log.splitlines()[-25:]))
    return read_run(new[-1], command, seconds)


def read_run(results_path: str | Path, command: list[str], seconds: float) -> HarnessRun:
    """Parse a results file and the samples files written beside it in the same run."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text(encoding="utf-8"))
    stamp = results_path.name[: -len("_results.json")]
    samples = {}
    for path in results_path.parent.glob(f"{stamp}_samples_*.jsonl"):
        with open(path, encoding="utf-8") as handle:
            samples[path.stem[len(f"{stamp}_samples_") :]] = [json.loads(line) for line in handle if line.strip()]
    return HarnessRun(results_path, results, samples, command, seconds)
