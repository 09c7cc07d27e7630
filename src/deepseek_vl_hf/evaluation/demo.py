"""The demo's model through lmms-eval: `deepseek-vl-hf eval --demo DIR` runs the harness on the demo's held-out
questions and puts its figures beside the demo evaluator's in `DIR/report.md` and `DIR/metrics.json`.

Both score the same greedy answers (same prompt, 6 new tokens, end-of-sentence stop) with the same normalised
exact match, so per category they must agree exactly; the report says whether they do.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from deepseek_vl_hf.demo.synthetic import VISUAL_CATEGORIES
from deepseek_vl_hf.evaluation.demo_tasks import GROUP, task_name, write_task_folder
from deepseek_vl_hf.evaluation.harness import HarnessRun, lmms_eval_command, offline_env, run_lmms_eval


def run_demo_tasks(model: str | Path, data_dir: str | Path, out: str | Path, batch_size: int = 8,
                   dtype: str = "auto", device: str | None = None, limit: int | None = None) -> HarnessRun:
    """Write the task folder for `data_dir` under `out/tasks` and run lmms-eval's `deepseek_vl_demo` group on
    `model` offline; results under `out/lmms-eval`, its log in `out/lmms-eval.log`."""
    out = Path(out)
    tasks = write_task_folder(data_dir, out / "tasks")
    command = lmms_eval_command(model, GROUP, out / "lmms-eval", include_path=tasks, batch_size=batch_size,
                                dtype=dtype, device=device, limit=limit)
    return run_lmms_eval(command, out / "lmms-eval", env=offline_env(out / "hf-datasets-cache"),
                         log_path=out / "lmms-eval.log")


def harness_figures(run: HarnessRun, batch_size: int) -> dict[str, Any]:
    """What the report shows: per category the harness's sample count and exact match, and how the run went."""
    categories = {c: {"n": run.n_samples(task_name(c)), "accuracy": run.metric(task_name(c))}
                  for c in VISUAL_CATEGORIES}
    total = sum(c["n"] for c in categories.values())
    return {
        "command": " ".join(["lmms-eval", *run.command[run.command.index("--model"):]]),
        "lmms_eval_version": version("lmms_eval"),
        "batch_size": batch_size,
        "seconds": run.seconds,
        "samples_per_second": total / run.seconds,
        "categories": categories,
        "overall": run.metric(GROUP),
    }


def agreement(harness: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Per category: the demo evaluator's accuracy, the harness's, and whether they are equal."""
    rows = []
    for category, figures in harness["categories"].items():
        own = evaluation["categories"][category]["accuracy"]
        rows.append({"category": category, "n": figures["n"], "demo": own, "harness": figures["accuracy"],
                     "agree": abs(own - figures["accuracy"]) < 1e-9})
    return rows


def harness_section(metrics: dict[str, Any]) -> str:
    """The report's section: harness figures beside the demo evaluator's, per held-out category."""
    harness = metrics["harness"]
    rows = agreement(harness, metrics["evaluation"])
    table = ["| category | questions | demo evaluator | lmms-eval | same |", "|---|---|---|---|---|"]
    table += [f"| {r['category']} | {r['n']} | {100 * r['demo']:.1f}% | {100 * r['harness']:.1f}% | "
              f"{'yes' if r['agree'] else '**no**'} |" for r in rows]
    verdict = ("They agree in every category." if all(r["agree"] for r in rows)
               else "**They disagree** in " + ", ".join(r["category"] for r in rows if not r["agree"]) + ".")
    return (
        "## The same model through lmms-eval\n\n"
        f"`deepseek-vl-hf eval --demo` ran lmms-eval {harness['lmms_eval_version']} (`--model deepseek_vl_hf`, the "
        "folder loaded with `trust_remote_code=True`) on the held-out questions as offline tasks "
        f"(`{GROUP}`), batch {harness['batch_size']}: {harness['seconds']:.0f} s including start-up, "
        f"{harness['samples_per_second']:.1f} questions/s. Both score the greedy answer by the same normalised "
        f"exact match. {verdict}\n\n" + "\n".join(table) + "\n\nCommand: `" + harness["command"] + "`"
    )


def evaluate_demo(demo_dir: str | Path, batch_size: int = 8, dtype: str = "auto", device: str | None = None
                  ) -> dict[str, Any]:
    """Run lmms-eval on `demo_dir/model` over `demo_dir/data`, add the figures to `demo_dir/metrics.json` as
    `harness` and rewrite the report; returns the figures."""
    from deepseek_vl_hf.demo.report import write_outputs

    demo_dir = Path(demo_dir)
    metrics_path = demo_dir / "metrics.json"
    if not metrics_path.exists() or not (demo_dir / "model").is_dir():
        raise FileNotFoundError(f"{demo_dir} is not a finished demo folder (metrics.json and model/); run "
                                f"deepseek-vl-hf demo --out {demo_dir} first")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if "evaluation" not in metrics:
        raise ValueError(f"{metrics_path} has no held-out evaluation (an ablation run?); use a default demo run")
    run = run_demo_tasks(demo_dir / "model", demo_dir / "data", demo_dir / "harness", batch_size, dtype, device)
    metrics["harness"] = harness_figures(run, batch_size)
    write_outputs(demo_dir, metrics)
    return metrics["harness"]
