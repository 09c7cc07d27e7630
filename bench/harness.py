"""Timing helpers shared by all benchmarks: interleaved medians, cpu/wall, result rows, targets, machine checks,
isolated subprocesses.

Every comparison runs its contenders round-robin in one process (the starting contender rotates each round),
so a neighbour stealing CPU slows all sides alike; `cpu/wall` (process CPU seconds over wall seconds) says how
much of the requested threads the run actually got (2.0 = two quiet cores).

The section contract (what `python -m bench` runs; see bench/README.md): a module `bench/NAME.py` listed in
`bench.__main__.SECTIONS` with `TITLE: str`, `run(mode: str) -> list[Row]` for `mode` in `MODES`, and optionally
`LABELS` (the two contenders' column names, default ours/native) and `TARGETS` (`Target`s judged on its rows).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
# full: the published figures; quick: fewer repeats (a few minutes); smoke: tiny sizes, one repeat, for CI
# (checks that every row appears and its correctness check holds; its timings mean nothing).
MODES = ("full", "quick", "smoke")
_RESULT_MARK = "BENCH-RESULT "


def setup(threads: int = THREADS) -> None:
    """Fix the thread count and keep everything offline and quiet (called by the CLI and every subprocess)."""
    os.environ["BENCH_THREADS"] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging

    torch.set_num_threads(threads)
    logging.set_verbosity_error()


@dataclass
class Timing:
    """Wall and CPU seconds of each repeat of one contender, and its last return value."""

    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu_wall(self) -> float:
        return sum(self.cpus) / sum(self.walls)


def measure(fn: Callable[[], Any], timing: Timing) -> None:
    """Run `fn` once and append its wall and process-CPU seconds to `timing`."""
    cpu, wall = time.process_time(), time.perf_counter()
    timing.result = fn()
    timing.walls.append(time.perf_counter() - wall)
    timing.cpus.append(time.process_time() - cpu)


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Warm each contender up, then time `repeats` rounds of all of them in rotating order."""
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    timings = {name: Timing() for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            measure(contenders[name], timings[name])
    return timings


def combined_cpu_wall(*timings: Timing) -> float:
    """cpu/wall over all repeats of the given contenders together."""
    return sum(sum(t.cpus) for t in timings) / sum(sum(t.walls) for t in timings)


@dataclass
class Row:
    """One comparison: `ours` and `native` in `unit`; `ratio` is always ours' time over native's (< 1: ours faster).

    `like_for_like`: both sides produce the same outputs with the same threads (only such rows are headlines and
    are judged against targets). `correct`: the row's correctness check (same tokens, outputs within tolerance...)
    held (True), failed (False) or the row has none (None); the smoke test fails on False.
    """

    case: str
    unit: str
    ours: float
    native: float
    cpu_wall: float
    higher_is_better: bool = False
    note: str = ""
    like_for_like: bool = True
    correct: bool | None = None

    @property
    def ratio(self) -> float:
        return self.native / self.ours if self.higher_is_better else self.ours / self.native


def time_row(
    case: str, ours: Timing, native: Timing, unit: str = "ms", scale: float = 1000.0, note: str = "", **flags: Any
) -> Row:
    """A row of median times (seconds times `scale`, in `unit`) for two timings of one interleaved run; `flags`
    are `Row`'s `like_for_like` / `correct`."""
    return Row(case, unit, ours.median * scale, native.median * scale, combined_cpu_wall(ours, native), note=note,
               **flags)


@dataclass(frozen=True)
class Target:
    """A goal on the ratio of a section's like-for-like rows whose case contains `select` ("" = all of them):
    met when every such row's ratio is at most `max_ratio`. `like_for_like_only=False` judges rows whose outputs
    differ by design (a quantized model against bf16)."""

    name: str
    select: str
    max_ratio: float
    like_for_like_only: bool = True

    def judge(self, rows: list[Row]) -> dict[str, Any]:
        """`{"target", "met", "detail"}`; a target with no row to judge is not met, and says so."""
        chosen = [row for row in rows if (row.like_for_like or not self.like_for_like_only) and self.select in row.case]
        if not chosen:
            return {"target": self.name, "met": False, "detail": f"no row to judge matches {self.select!r}"}
        worst = max(chosen, key=lambda row: row.ratio)
        detail = (f"ratio <= {self.max_ratio:g} wanted; {len(chosen)} row(s) {min(r.ratio for r in chosen):.2f}-"
                  f"{worst.ratio:.2f}, worst: {worst.case}")
        return {"target": self.name, "met": worst.ratio <= self.max_ratio, "detail": detail}


def format_table(title: str, rows: list[Row], labels: tuple[str, str] = ("ours", "native")) -> str:
    """A markdown table of rows under a `### title` heading: like-for-like rows first, then the others."""
    first, second = labels
    header = [
        f"| case | {first} | {second} | {first}/{second} | cpu/wall | check | note |",
        "|---|---|---|---|---|---|---|",
    ]
    lines = [f"### {title}", ""]
    for group, heading in ((True, ""), (False, "Not like for like (different outputs or threads; not judged):")):
        chosen = [row for row in rows if row.like_for_like == group]
        if not chosen:
            continue
        lines += ([heading, ""] if heading else []) + header
        for row in chosen:
            check = {None: "", True: "ok", False: "**FAILED**"}[row.correct]
            lines.append(
                f"| {row.case} | {_number(row.ours)} {row.unit} | {_number(row.native)} {row.unit} | "
                f"**{row.ratio:.2f}** | {row.cpu_wall:.2f} | {check} | {row.note} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def machine_info() -> str:
    """CPU model, cores, threads used and package versions, as markdown bullet points."""
    import PIL
    import timm
    import torch
    import torchvision
    import transformers

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "\n".join(
        [
            f"- CPU: {model}, {_cores()} cores available, torch threads: {THREADS}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"transformers {transformers.__version__}, timm {timm.__version__}, Pillow {PIL.__version__}",
        ]
    )


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB: `VmHWM` on Linux (`ru_maxrss` there would include
    the RSS of the parent at fork time), else `ru_maxrss` (KiB)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_check(seconds: float = 0.5) -> float:
    """cpu/wall of a fixed multi-threaded matmul loop: ~`THREADS` on a quiet machine, less when others compete."""
    import torch

    a = torch.randn(512, 512)
    cpu, wall = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        for _ in range(8):
            a @ a
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


@dataclass
class MachineCheck:
    """What a table was measured on and how busy the machine was around it: cores, torch threads, torch version,
    the 1-minute load average and the `machine_check` cpu/wall before and after the section."""

    cores: int
    threads: int
    torch: str
    load_before: float
    cpu_wall_before: float
    load_after: float = 0.0
    cpu_wall_after: float = 0.0

    @classmethod
    def start(cls) -> MachineCheck:
        import torch

        return cls(_cores(), THREADS, torch.__version__, os.getloadavg()[0], machine_check())

    def finish(self) -> MachineCheck:
        self.load_after, self.cpu_wall_after = os.getloadavg()[0], machine_check()
        return self

    @property
    def loaded(self) -> bool:
        """Other work competed for the cores: a check below 85% of the threads, or more load than cores."""
        return min(self.cpu_wall_before, self.cpu_wall_after) < 0.85 * self.threads or self.load_before > self.cores

    def line(self) -> str:
        state = "LOADED (other jobs competed for the cores: timings are not conclusive)" if self.loaded else "quiet"
        return (f"machine check: {self.cores} cores, {self.threads} torch threads, torch {self.torch}; load average "
                f"{self.load_before:.1f} before / {self.load_after:.1f} after; cpu/wall {self.cpu_wall_before:.2f} "
                f"before / {self.cpu_wall_after:.2f} after (about {self.threads} when quiet): {state}")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def isolated(target: str, **kwargs: Any) -> dict[str, Any]:
    """Run `module:function(**kwargs)` in a fresh Python process; its dict result plus `peak_rss_mib`."""
    command = [sys.executable, "-m", "bench.harness", target, json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.getcwd(), env=os.environ.copy())
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    raise RuntimeError(f"{target}({kwargs}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def _child(target: str, arguments: str) -> None:
    setup()
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(arguments))
    result["peak_rss_mib"] = peak_rss_mib()
    print(_RESULT_MARK + json.dumps(result), flush=True)


def write_readme_block(markers: tuple[str, str], text: str, readme: Path | None = None) -> None:
    """Replace what README.md (or `readme`) holds between the two `markers` with `text`; atomic replace."""
    readme = readme or Path(__file__).resolve().parents[1] / "README.md"
    content = readme.read_text(encoding="utf-8")
    start, end = (content.index(marker) for marker in markers)
    updated = content[: start + len(markers[0])] + "\n" + text + "\n" + content[end:]
    with tempfile.NamedTemporaryFile("w", dir=readme.parent, delete=False, encoding="utf-8") as tmp:
        tmp.write(updated)
    os.replace(tmp.name, readme)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
