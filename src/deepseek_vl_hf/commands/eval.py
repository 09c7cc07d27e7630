"""`deepseek-vl-hf eval`: lmms-eval on a model folder (the `eval` extra).

`--demo DIR` evaluates a finished demo's model on its held-out questions (offline tasks) and adds the harness
figures to its report; otherwise `--model DIR --tasks T` runs any lmms-eval tasks (`--data` adds the demo tasks
for a folder written by the demo's data generator).
"""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        sys.exit('error: deepseek-vl-hf eval needs lmms-eval (the eval extra): pip install -e ".[eval]"')
    if args.demo:
        from deepseek_vl_hf.evaluation.demo import evaluate_demo

        try:
            figures = evaluate_demo(args.demo, args.batch_size, args.dtype, args.device)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            sys.exit(f"error: {exc}")
        print(f"lmms-eval on the demo's held-out questions: {100 * figures['overall']:.1f}% exact match; "
              f"report: {args.demo}/report.md")
        return
    if not args.model or not args.tasks:
        sys.exit("error: give --demo DIR, or --model DIR and --tasks T")
    from pathlib import Path

    from deepseek_vl_hf.evaluation.demo_tasks import write_task_folder
    from deepseek_vl_hf.evaluation.harness import lmms_eval_command, offline_env, run_lmms_eval

    out = Path(args.out)
    include = write_task_folder(args.data, out / "tasks") if args.data else None
    command = lmms_eval_command(args.model, args.tasks, out / "lmms-eval", include, args.batch_size, args.dtype,
                                args.device, args.limit)
    try:
        result = run_lmms_eval(command, out / "lmms-eval", offline_env(out / "hf-datasets-cache") if args.data
                               else None, log_path=out / "lmms-eval.log")
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    for task, values in result.results["results"].items():
        figures = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in values.items()
                            if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {figures}")
    print(f"results: {result.results_path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model folder with lmms-eval (needs the eval extra)")
    p.add_argument("--demo", help="a finished demo folder: evaluate its model on its held-out questions, update the report")
    p.add_argument("--model", help="model folder (any folder this package writes)")
    p.add_argument("--tasks", help="lmms-eval tasks, comma-separated (e.g. mmbench_en_dev,chartqa; network needed)")
    p.add_argument("--data", help="a demo data folder: adds the offline deepseek_vl_demo tasks for it")
    p.add_argument("--out", default="eval-out", help="output folder (lmms-eval results, log, task folder)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", help="auto (the folder's), float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda when available)")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per task")
    p.set_defaults(func=run)
