"""`deepseek-vl-hf serve`: a Gradio web chat with a checkpoint folder (images, multi-turn, streamed)."""

from __future__ import annotations

import argparse

from deepseek_vl_hf.commands.common import add_load_args


def run(args: argparse.Namespace) -> None:
    """Build the app and serve it until interrupted; one answer is generated at a time, others queue."""
    from deepseek_vl_hf.serve import build_app

    try:
        app = build_app(args.model, args.device, args.dtype, args.max_new_tokens, args.quantize)
    except ImportError as exc:
        raise SystemExit(f"deepseek-vl-hf serve: {exc}") from None
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=False)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand."""
    p = sub.add_parser("serve", help="Gradio web chat with a model folder (needs the serve extra)")
    add_load_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens", type=int, default=256, help="default of the page's max-new-tokens slider")
    p.set_defaults(func=run)
