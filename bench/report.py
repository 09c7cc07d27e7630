"""BENCHMARKS.md from measured results: the stored results (bench/results.json, written by `python -m bench --write`)
rendered into the prose template (bench/BENCHMARKS.template.md), so no figure in BENCHMARKS.md is typed by hand.

Template placeholders: `{{sections}}` (every registered section's table, command, date and machine check, in
registry order; "not measured yet" for a section with no stored result) and `{{targets}}` (the targets' verdicts,
judged by code when the section ran).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .harness import MachineCheck, Row, format_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
TEMPLATE = ROOT / "bench" / "BENCHMARKS.template.md"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def load_results(path: Path | None = None) -> dict[str, Any]:
    """The stored results (`{"sections": {name: result}}`, default bench/results.json), empty when none are stored."""
    path = path or RESULTS
    if not path.is_file():
        return {"sections": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_results(results: dict[str, Any]) -> None:
    """Store `results` in bench/results.json (written to a temporary name, then renamed)."""
    _write_atomic(RESULTS, json.dumps(results, indent=1, sort_keys=True) + "\n")


def rows_of(result: dict[str, Any]) -> list[Row]:
    """A stored section result's rows."""
    return [Row(**row) for row in result["rows"]]


def render_section(name: str, result: dict[str, Any] | None) -> str:
    """One section: its table, how it was produced, and the machine check around it."""
    if result is None:
        return f"### {name}\n\nNot measured yet: `python -m bench --only {name} --write`."
    check = MachineCheck(**result["machine"])
    mode = {"full": "full run", "quick": "`--quick` run (fewer repeats)"}[result["mode"]]
    return (
        f"{format_table(result['title'], rows_of(result), tuple(result['labels']))}\n\n"
        f"`{result['command']} --write`: {mode} on {result['date']}, {result['seconds']:.0f} s. {check.line()}.\n\n"
        + result["versions"]
    )


def render_targets(sections: tuple[str, ...], results: dict[str, Any]) -> str:
    """The verdict of every target of every measured section, with the run it was judged on."""
    lines = ["| section | target | verdict | judged on | detail |", "|---|---|---|---|---|"]
    for name in sections:
        result = results["sections"].get(name)
        for verdict in (result or {}).get("targets", ()):
            loaded = MachineCheck(**result["machine"]).loaded
            run = f"{result['mode']} run, {result['date']}" + (", machine loaded" if loaded else "")
            lines.append(f"| {name} | {verdict['target']} | **{'met' if verdict['met'] else 'not met'}** | {run} | "
                         f"{verdict['detail']} |")
    return "\n".join(lines)


def render(template: str, sections: tuple[str, ...], results: dict[str, Any]) -> str:
    """BENCHMARKS.md's text: the template with its placeholders filled from `results`."""
    tables = "\n\n".join(render_section(name, results["sections"].get(name)) for name in sections)
    return template.replace("{{sections}}", tables).replace("{{targets}}", render_targets(sections, results))


def render_file(sections: tuple[str, ...]) -> Path:
    """Regenerate BENCHMARKS.md from the template and the stored results."""
    text = render(TEMPLATE.read_text(encoding="utf-8"), sections, load_results())
    _write_atomic(BENCHMARKS_MD, text)
    return BENCHMARKS_MD
