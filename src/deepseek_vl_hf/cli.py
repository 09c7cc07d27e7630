"""The `deepseek-vl-hf` command. Each subcommand lives in `deepseek_vl_hf.commands.<name>` with a
`register(subparsers)` function; heavy imports happen inside the command, so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib

COMMANDS = ["init", "chat", "convert", "card", "train", "merge", "demo", "serve", "api", "eval"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek-vl-hf", description="DeepSeek-VL as a Transformers-native package")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"deepseek_vl_hf.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
