"""`deepseek-vl-hf card`: write a Hub model card (README.md) for a checkpoint folder."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from deepseek_vl_hf.cards import write_card

    path = write_card(args.model, args.output, base_model=args.base_model, model_id=args.model_id,
                      license_id=args.license)
    print(f"wrote {path}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="write a Hub model card (README.md) for a checkpoint folder")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--output", default=None, help="where to write (default: MODEL/README.md)")
    p.add_argument("--model-id", default=None, help="path or Hub id the usage snippet loads (default: folder name)")
    p.add_argument("--base-model", default=None, help="Hub id of the weights this model comes from")
    p.add_argument("--license", default=None, help="license id (default: DeepSeek's for deepseek-ai base models, else mit)")
    p.set_defaults(func=run)
