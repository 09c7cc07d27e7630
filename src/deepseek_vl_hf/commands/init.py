"""`deepseek-vl-hf init`: write a random-weight checkpoint folder of a preset."""

from __future__ import annotations

import argparse

from deepseek_vl_hf.commands.common import parse_overrides


def run(args: argparse.Namespace) -> None:
    from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint

    model, processor = build_random_model(args.preset, parse_overrides(args.set), seed=args.seed)
    path = save_checkpoint(model, processor, args.output, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote a random-weight {args.preset} model ({n_params / 1e6:.2f} M parameters) to {path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a random-weight checkpoint folder of a preset")
    p.add_argument("--preset", default="tiny", help="tiny, tiny-siglip, 1.3b or 7b")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. text_config.num_hidden_layers=2 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)
