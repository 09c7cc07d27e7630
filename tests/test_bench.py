"""The benchmark harness (`python -m bench`): interleaving, ratios, targets, isolated runs, same-weight model pairs,
every section's smoke mode, and BENCHMARKS.md written from stored results."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import bench.__main__ as bench_main
from bench import report
from bench.fixtures import build_ours, chat_batch, native_inputs, to_native
from bench.harness import MachineCheck, Row, Target, interleaved, isolated


def test_interleaved_rotates_the_order_and_times_every_repeat():
    calls = []
    timings = interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=3, warmup=1)
    assert calls == ["a", "b", "c", *"abc", *"bca", *"cab"]
    assert all(len(t.walls) == len(t.cpus) == 3 for t in timings.values())


def test_ratio_is_ours_over_native_time_for_times_and_speeds():
    assert Row("t", "ms", ours=5.0, native=10.0, cpu_wall=2.0).ratio == 0.5
    assert Row("s", "tokens/s", ours=20.0, native=10.0, cpu_wall=2.0, higher_is_better=True).ratio == 0.5


def test_native_twin_has_our_weights():
    ours, processor = build_ours("tiny")
    native = to_native(ours)
    inputs = chat_batch(processor, 2)
    with torch.no_grad():
        expected = ours(**inputs).logits
        got = native(**native_inputs(inputs, ours)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_isolated_training_step_reports_time_and_peak_memory():
    result = isolated("bench.training:step_case", config="tiny", native=False, checkpointing=True, steps=1, warmup=0)
    assert result["step_s"] > 0 and result["peak_rss_mib"] >= result["rss_before_mib"] > 0


def test_targets_judge_only_like_for_like_rows_and_name_the_worst():
    rows = [Row("1080p: like", "ms", 4.0, 10.0, 2.0), Row("4k: like", "ms", 6.0, 10.0, 2.0),
            Row("1080p: 1024 only", "ms", 1.0, 10.0, 2.0, like_for_like=False)]
    verdict = Target("2x native", "", 0.5).judge(rows)
    assert not verdict["met"] and "worst: 4k: like" in verdict["detail"] and "2 row(s) 0.40-0.60" in verdict["detail"]
    assert Target("1080p 2x native", "1080p", 0.5).judge(rows)["met"]
    assert not Target("missing", "720p", 0.5).judge(rows)["met"]


@pytest.mark.parametrize("name", bench_main.SECTIONS)
def test_every_section_runs_in_smoke_mode_and_its_checks_hold(name):
    """What CI runs of `python -m bench --smoke`: rows appear, with finite positive figures, and no failed check."""
    module = importlib.import_module(f"bench.{name}")
    rows = module.run("smoke")
    assert rows and isinstance(module.TITLE, str)
    for row in rows:
        assert math.isfinite(row.ratio) and row.ours > 0 and row.native > 0, row
        assert row.correct is not False, row
    if any(row.correct is not None for row in rows):  # a section that checks outputs checks them in smoke mode
        assert all(row.correct for row in rows if row.correct is not None)


def test_benchmarks_md_is_written_from_the_stored_results():
    """BENCHMARKS.md is the template rendered with bench/results.json: a hand edit of either side fails here."""
    expected = report.render(report.TEMPLATE.read_text(), bench_main.SECTIONS, report.load_results())
    assert report.BENCHMARKS_MD.read_text() == expected, "run `python -m bench --render` (or --write)"


def test_write_stores_each_section_with_its_machine_check_and_renders(tmp_path, monkeypatch):
    for attribute, name in (("RESULTS", "results.json"), ("BENCHMARKS_MD", "BENCHMARKS.md")):
        monkeypatch.setattr(report, attribute, tmp_path / name)
    (tmp_path / "template.md").write_text("# B\n\n{{targets}}\n\n{{sections}}\n")
    monkeypatch.setattr(report, "TEMPLATE", tmp_path / "template.md")
    machine = MachineCheck(cores=2, threads=2, torch="2.x", load_before=3.5, cpu_wall_before=0.6, load_after=3.0,
                           cpu_wall_after=0.7)

    def fake_section(name, mode):
        rows = [Row("1080p", "ms", 5.0, 10.0, 1.5, correct=True), Row("1024 only", "ms", 1.0, 10.0, 1.5,
                                                                     like_for_like=False)]
        return {"title": f"T {name}", "labels": ["ours", "native"], "mode": mode, "date": "2026-12-06",
                "command": f"python -m bench --only {name}", "seconds": 1.0, "versions": "- torch 2.x",
                "machine": machine.__dict__, "rows": [r.__dict__ for r in rows],
                "targets": [Target("2x", "", 0.5).judge(rows)]}

    monkeypatch.setattr(bench_main, "run_section", fake_section)
    monkeypatch.setattr(bench_main, "setup", lambda threads: None)
    assert bench_main.main(["--only", "vision", "--quick", "--write"]) == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "### T vision" in text and "| 1080p | 5 ms | 10 ms | **0.50** | 1.50 | ok |" in text
    assert "Not like for like" in text.split("| 1080p |")[1]  # the other row comes after, apart
    assert "load average 3.5 before" in text and "LOADED" in text and "`--quick` run" in text
    assert "| vision | 2x | **met** | quick run, 2026-12-06, machine loaded |" in text
    assert "Not measured yet: `python -m bench --only generation --write`" in text
    stored = report.load_results(tmp_path / "results.json")
    assert list(stored["sections"]) == ["vision"]
    with pytest.raises(SystemExit):
        bench_main.main(["--smoke", "--write"])
