"""`deepseek-vl-hf merge`: fold a LoRA adapter into its base and write a full checkpoint folder."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from deepseek_vl_hf.lora import merge_adapter

    path = merge_adapter(args.base, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base}; wrote {path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (a full checkpoint folder)")
    p.add_argument("--base", required=True, help="the base checkpoint folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json + weights)")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the merged weights (auto = the base's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)
