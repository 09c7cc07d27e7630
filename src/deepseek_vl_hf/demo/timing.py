"""The demo's time budget: time the first steps of the run and size the rest to `--minutes`.

Fixed step counts do not adapt to the machine, so the run is planned in *units* (one stage-0 step) with each
stage's per-step cost and the evaluations' cost measured relative to it on a 2-core CPU (`RELATIVE_COST`,
`OVERHEAD_UNITS`). Stage 0 times its first steps, which gives seconds per unit on this machine; every stage is
then sized to what the remaining time affords (never above the `--minutes` budget's steps), and after each stage
its measured time corrects the estimate for the ones after it. A Trainer stage also gets a clock (`deadline`):
if its steps turn out slower than planned, it stops when its share of the time is spent instead of overrunning
the budget. What was measured and what was cut goes into `metrics.json` and the report. `enabled=False` keeps the
budget's steps (reproducible runs, tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

CALIBRATION_STEPS = 8  # stage-0 steps timed (after one untimed step) before the run is sized
TARGET_SHARE = 0.93  # plan to finish at this share of the budget (the rest absorbs estimation error)
MIN_STEPS = 2
DEADLINE_SLACK = 1.15  # a Trainer stage may run this much over its planned seconds before its clock stops it
# Seconds per step of each stage over seconds per stage-0 step (batch 16), and the fixed work around the stages
# in stage-0 steps: loading, saving and the text-task evaluation after a stage (replaced by the measured mean
# once a stage ran); the held-out visual evaluation with and without the image, and the export. From the default
# run on the 2-core machine (`calibration.stages[*].seconds_per_step` in docs/demo/metrics.json, seed 0).
RELATIVE_COST = {"stage0": 1.0, "stage1": 0.5, "stage2": 0.39, "stage3": 0.93}
OVERHEAD_UNITS = {"stage": 10.0, "visual_eval": 40.0}


@dataclass
class Planner:
    """Sizes a run's stages (`plan`: (stage, budget steps) in running order) to end by `minutes` after `start`."""

    minutes: float
    plan: list[tuple[str, int]]
    visual_evals: float = 1.0
    enabled: bool = True
    start: float = field(default_factory=time.perf_counter)
    seconds_per_unit: float | None = None
    stage_overhead: float = OVERHEAD_UNITS["stage"]  # in units; replaced by the measured mean once stages ran
    done: list[dict[str, Any]] = field(default_factory=list)

    def _remaining_units(self, position: int) -> tuple[float, float]:
        """(stage-step units, overhead units) of the plan from `position` on, at the budget's steps."""
        work = sum(RELATIVE_COST[name] * steps for name, steps in self.plan[position:])
        overhead = self.stage_overhead * (len(self.plan) - position) + OVERHEAD_UNITS["visual_eval"] * self.visual_evals
        return work, overhead

    def _scale(self, position: int, spent_units: float = 0.0) -> float:
        """The share of the budget's steps from `position` on that the remaining time affords (at most 1)."""
        if not self.enabled or self.seconds_per_unit is None:
            return 1.0
        left = self.minutes * 60 * TARGET_SHARE - (time.perf_counter() - self.start)
        work, overhead = self._remaining_units(position)
        affordable = left / self.seconds_per_unit - overhead + spent_units
        return max(0.0, min(1.0, affordable / work)) if work else 1.0

    def size_stage0(self, steps_done: int, seconds_per_step: float) -> int:
        """Called after stage 0's first timed steps: sets seconds per unit, returns stage 0's new total steps."""
        self.seconds_per_unit = seconds_per_step
        name, steps = self.plan[len(self.done)]
        scale = self._scale(len(self.done), spent_units=steps_done)
        return max(steps_done, MIN_STEPS, round(steps * scale))

    def steps(self) -> int:
        """The steps of the next stage in the plan (a Trainer stage), sized to the remaining time."""
        name, steps = self.plan[len(self.done)]
        return max(MIN_STEPS, round(steps * self._scale(len(self.done))))

    def deadline(self, steps: int) -> float | None:
        """Seconds the next stage's training loop may take for `steps` steps (planned time with `DEADLINE_SLACK`);
        None when the planner is off or not calibrated yet."""
        if not self.enabled or self.seconds_per_unit is None:
            return None
        name, _ = self.plan[len(self.done)]
        return steps * RELATIVE_COST[name] * self.seconds_per_unit * DEADLINE_SLACK

    def finished(self, name: str, steps: int, seconds: float, train_seconds: float, budget_steps: int,
                 planned_steps: int | None = None) -> None:
        """Record a stage's measured time (all of it, and its training loop's): they correct the seconds per unit
        and the per-stage overhead (loading, saving, the text evaluation) for the stages after it. `steps` below
        `planned_steps` means the stage's clock stopped it."""
        per_step = train_seconds / max(steps, 1)
        self.seconds_per_unit = per_step / RELATIVE_COST[name]
        self.done.append({"stage": name, "budget_steps": budget_steps, "steps": steps, "seconds": round(seconds, 1),
                          "seconds_per_step": round(per_step, 4), "overhead_seconds": round(seconds - train_seconds, 1),
                          "stopped_by_clock": planned_steps is not None and steps < planned_steps})
        overheads = [d["overhead_seconds"] for d in self.done]
        self.stage_overhead = sum(overheads) / len(overheads) / self.seconds_per_unit

    def summary(self) -> dict[str, Any]:
        """What metrics.json keeps: the stages' budget and actual steps, their times, and what was cut."""
        cuts = [f"{d['stage']} {d['budget_steps']} -> {d['steps']} steps"
                + (" (stopped by its clock)" if d.get("stopped_by_clock") else "")
                for d in self.done if d["steps"] < d["budget_steps"]]
        return {"enabled": self.enabled, "target_seconds": round(self.minutes * 60 * TARGET_SHARE),
                "stages": self.done, "cut": cuts}
