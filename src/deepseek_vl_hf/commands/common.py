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
    """The options of `load_model_and_processor`: --model, --device, --dtype, --quantize."""
    from deepseek_vl_hf.quantization import QUANTIZE_CHOICES

    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--quantize", default=None, choices=QUANTIZE_CHOICES,
        help="quantize the language model's linear layers while loading: int8/int4 (CPU, the quant extra), "
        "bnb-nf4/bnb-int8 (CUDA, the quant-gpu extra)",
    )


def load_model_and_processor(model_dir: str, device: str = "cpu", dtype: str = "auto", quantize: str | None = None):
    """Load a checkpoint folder with the Auto classes + trust_remote_code, as any user would (after moving back
    a folder a killed writer left aside, see `deepseek_vl_hf.atomic.recover_directory`); `quantize` (one of
    `quantization.QUANTIZE_CHOICES`) quantizes the language model's linear layers while loading."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from deepseek_vl_hf.atomic import recover_directory

    recover_directory(model_dir)

    dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if quantize:
        from deepseek_vl_hf.quantization import load_quantized

        try:
            model = load_quantized(model_dir, quantize, device, dtypes[dtype])
        except (ImportError, RuntimeError) as exc:
            raise SystemExit(f"error: {exc}") from None
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtypes[dtype]).to(device)
        if torch.device(device).type == "cpu":  # a folder saved at int8 runs compiled, as --quantize int8 does
            from deepseek_vl_hf.quantization import compile_int8_linears

            compile_int8_linears(model)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model.eval(), processor
