"""`deepseek-vl-hf demo`: the end-to-end demo (synthetic data, stage 0 + stages 1-3, evaluation, report)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

TRAIN_EXTRA = ("accelerate", "matplotlib")  # the Trainer's and the report's packages beyond the core install


def missing_packages(names: tuple[str, ...] = TRAIN_EXTRA) -> list[str]:
    """The packages of `names` that cannot be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run(args: argparse.Namespace) -> None:
    # Before torch loads: idle OpenMP threads sleep instead of spinning, which matters on a shared CPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    missing = missing_packages()
    if missing:
        sys.exit(f'error: the demo needs {", ".join(missing)} (the train extra): pip install -e ".[train]"')
    from deepseek_vl_hf.demo.pipeline import run_demo

    try:
        run_demo(args.out, minutes=args.minutes, ablation=args.ablation, overwrite=args.overwrite, seed=args.seed,
                 calibrate=not args.fixed_steps)
    except (FileExistsError, ValueError) as exc:  # a non-empty --out, --minutes <= 0
        sys.exit(f"error: {exc}")


def register(sub: argparse._SubParsersAction) -> None:
    from deepseek_vl_hf.demo import ABLATIONS, DEFAULT_MINUTES

    p = sub.add_parser(
        "demo",
        help="end-to-end demo: synthetic data, stage 0 + stages 1-3, evaluation, report (CPU, nothing downloaded)",
    )
    p.add_argument("--out", required=True, help="output folder (report.md, metrics.json, plots/, model/, data/)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help="the time budget: data and steps scale with it, and the stages are sized to finish within "
                        "it on this machine (the report says what was cut)")
    p.add_argument("--fixed-steps", action="store_true",
                   help="run the budget's steps whatever the machine's speed (reproducible numbers, no time limit)")
    p.add_argument("--ablation", choices=ABLATIONS, default=None,
                   help="run an ablation instead: modality-mix (text data in stage 2) or hybrid (vs SigLIP-only)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)
