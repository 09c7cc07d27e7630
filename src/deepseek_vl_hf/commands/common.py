"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import ast
from typing import Any


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict; values are Python literals when they parse as one, else strings."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False, "none": None, "null": None}.get(raw.lower(), raw)
        overrides[key.strip()] = value
    return overrides


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """The options of `load_model_and_processor`: --model, --device, --dtype."""
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def load_model_and_processor(model_dir: str, device: str = "cpu", dtype: str = "auto"):
    """Load a checkpoint folder with the Auto classes + trust_remote_code, as any user would (after moving back
    a folder a killed writer left aside, see `deepseek_vl_hf.atomic.recover_directory`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from deepseek_vl_hf.atomic import recover_directory

    recover_directory(model_dir)

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtypes[dtype]).to(device)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model.eval(), processor
