"""`deepseek-vl-hf api`: an OpenAI-compatible chat-completions server for a checkpoint folder."""

from __future__ import annotations

import argparse
import os
import signal

from deepseek_vl_hf.commands.common import add_load_args


def run(args: argparse.Namespace) -> None:
    """Load the folder and serve until SIGINT/SIGTERM, which finish the requests in flight first."""
    from deepseek_vl_hf.api import API_EXTRA_HINT

    try:
        import uvicorn

        from deepseek_vl_hf.api.app import build_app
    except ImportError as exc:
        raise SystemExit(f"deepseek-vl-hf api: {API_EXTRA_HINT} ({exc})") from None
    from deepseek_vl_hf.api.engine import Engine
    from deepseek_vl_hf.api.protocol import Limits, template_prefix
    from deepseek_vl_hf.commands.common import load_model_and_processor

    if args.max_batch_size < 1 or args.max_queue < 1:
        raise SystemExit("deepseek-vl-hf api: --max-batch-size and --max-queue must be at least 1")
    model, processor = load_model_and_processor(args.model, args.device, args.dtype, args.quantize)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    engine = Engine(model, processor.tokenizer, args.max_batch_size, args.max_queue, args.batch_wait_ms / 1000,
                    prefix_ids=template_prefix(processor))
    limits = Limits(context_length=model.config.text_config.max_position_embeddings,
                    max_image_bytes=args.max_image_bytes, allow_local_files=args.allow_local_files)
    app = build_app(model, processor, name, engine, limits)
    print(f"serving {args.model} as '{name}' on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn drains on SIGTERM, then re-sends the signal to the handler it found: a no-op one makes the drained
    # shutdown a clean exit (status 0) instead of a death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `api` subcommand."""
    p = sub.add_parser("api", help="OpenAI-compatible chat-completions API for a model folder (needs the api extra)")
    add_load_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (1: one at a time)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more are answered 503")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="when idle, how long to wait for more requests to form the first batch")
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest encoded image accepted")
    p.add_argument("--allow-local-files", action="store_true",
                   help="accept image_url paths on this machine (file:// or a plain path); off by default")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for requests in flight before closing them")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
