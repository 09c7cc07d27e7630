"""`deepseek-vl-hf train RECIPE [--set key=value ...] [--resume]`: run one training stage from a YAML recipe.

Several processes: `torchrun --nproc_per_node N -m deepseek_vl_hf.cli train RECIPE` or
`accelerate launch --config_file recipes/accelerate/fsdp.yaml -m deepseek_vl_hf.cli train RECIPE`.
Exit codes: 0 done, 1 a recipe/data/NaN/QLoRA-unavailable error (one line on stderr), 143 stopped by SIGTERM after a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from deepseek_vl_hf.commands.common import parse_overrides

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


def _show_package_logs() -> None:
    """This package's messages (attention fallback, skipped records) on stderr, next to the Trainer's logging;
    info on the main process, warnings only on the others."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[deepseek_vl_hf] %(message)s"))
    package = logging.getLogger("deepseek_vl_hf")
    package.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    if not package.handlers:  # once per process, however often the command runs in it
        package.addHandler(handler)


def run(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from deepseek_vl_hf.lora import QLoRAUnavailableError
    from deepseek_vl_hf.training.callbacks import NonFiniteLossError
    from deepseek_vl_hf.training.recipe import RecipeError, load_recipe
    from deepseek_vl_hf.training.runner import TrainingInterrupted, run_stage

    _show_package_logs()
    code = 0
    try:
        recipe = load_recipe(args.recipe, parse_overrides(args.set))
        output = run_stage(recipe, resume=args.resume, recipe_path=args.recipe)
        if output is not None:
            print(f"wrote stage {recipe.stage} ({recipe.name}) to {output}")
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except (RecipeError, NonFiniteLossError, QLoRAUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if code:
        raise SystemExit(code)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one training stage from a YAML recipe (see recipes/)")
    p.add_argument("recipe", help="recipe file, e.g. recipes/tiny/stage1.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. train.max_steps=10 or data.sources.0.path=x.jsonl (repeatable)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint of this recipe's run"
    )
    p.set_defaults(func=run)
