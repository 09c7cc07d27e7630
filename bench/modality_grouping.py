"""Modality grouping: seconds per optimizer step with every step all-language or all-multimodal (grouped, the
paper's section 4.5 setting) vs language and multimodal examples mixed inside every batch (not grouped).

Both variants run the tiny stage-2 recipe (LLM + adapter train) with a constant language share of 0.5, in one
process, alternating, so machine noise hits both; the first steps of each run are warm-up and not timed.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

# Sleeping (not spinning) OpenMP waits: with spinning, any other load on a 2-core machine inflates steps ~60x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from deepseek_vl_hf.training import load_recipe  # noqa: E402
from deepseek_vl_hf.training.runner import run_stage  # noqa: E402

from .harness import Row  # noqa: E402

TITLE = "Modality grouping, tiny stage 2 (s per optimizer step)"
LABELS = ("grouped", "not grouped")
# (steps per run, rounds, batch): each round runs both variants once, in alternating order
PLANS = {"full": (40, 2, 8), "quick": (20, 1, 8), "smoke": (7, 1, 2)}
REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5


class StepTimer(TrainerCallback):
    """Wall and CPU seconds from one optimizer step's end to the next: data encoding and collation, forward,
    backward and the optimizer update (no evaluation or saving happens in these runs)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._last = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall.append(now[0] - self._last[0])
        self.cpu.append(now[1] - self._last[1])
        self._last = now


def timed_run(grouped: bool, steps: int, batch: int, out: Path) -> StepTimer:
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "stage2.yaml",
        {
            "model.init_from": None,
            "model.preset": "tiny",
            "data.eval": {},
            "data.group_by_modality": grouped,
            "data.schedule": {"start_language_share": 0.5, "target_language_share": 0.5, "warmup_steps": 0},
            "train.output_dir": str(out),
            "train.overwrite_output": True,
            "train.max_steps": steps,
            "train.per_device_batch_size": batch,
            "train.save_steps": 10**6,
            "train.logging_steps": 10**6,
        },
    )
    timer = StepTimer()
    run_stage(recipe, callbacks=[timer])
    return timer


def run(mode: str) -> list[Row]:
    """Mean and median seconds per step, grouped against not grouped."""
    steps, rounds, batch = PLANS[mode]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("deepseek_vl_hf").setLevel(logging.ERROR)
    results: dict[bool, dict[str, list[float]]] = {True: {"wall": [], "cpu": []}, False: {"wall": [], "cpu": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(rounds):
            for grouped in (False, True) if round_index % 2 == 0 else (True, False):
                timer = timed_run(grouped, steps, batch, Path(tmp) / "out")
                results[grouped]["wall"] += timer.wall[WARMUP_STEPS:]
                results[grouped]["cpu"] += timer.cpu[WARMUP_STEPS:]
    cpu_wall = sum(sum(r["cpu"]) for r in results.values()) / sum(sum(r["wall"]) for r in results.values())
    case = f"batch {batch}, language share 0.5, {rounds} x {steps} steps per variant ({WARMUP_STEPS} warm-up not timed)"
    return [
        Row(f"{case}: {name}", "s/step", statistics_fn(results[True]["wall"]), statistics_fn(results[False]["wall"]),
            cpu_wall, note="the paper reports about 20% faster with grouping" if name == "mean" else "")
        for name, statistics_fn in (("mean", statistics.mean), ("median", statistics.median))
    ]
