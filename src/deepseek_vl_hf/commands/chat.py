"""`deepseek-vl-hf chat`: one-shot or interactive chat with a checkpoint folder, streamed."""

from __future__ import annotations

import argparse
import sys

from deepseek_vl_hf.commands.common import add_load_args, load_model_and_processor


def run(args: argparse.Namespace) -> None:
    from deepseek_vl_hf.chat import ChatSession, generation_kwargs

    model, processor = load_model_and_processor(args.model, args.device, args.dtype, args.quantize)
    session = ChatSession(model, processor, system_prompt=args.system)
    gen = generation_kwargs(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)

    def answer(text: str, images: list[str]) -> None:
        """Stream one answer; a failed turn (reported by the caller) leaves the session as it was."""
        print("Assistant: ", end="", flush=True)
        try:
            for piece in session.stream_reply(text, images, **gen):
                print(piece, end="", flush=True)
        finally:
            print()

    if args.prompt is not None:
        answer(args.prompt, args.image)
        return
    print("Interactive chat. Commands: /image PATH (attach to the next message), /new (reset), /exit.")
    pending = list(args.image)
    while True:
        try:
            line = input("User: ").strip()
        except EOFError:
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/new":
            session.reset()
            pending = []
        elif line.startswith("/image "):
            pending.append(line.split(" ", 1)[1].strip())
        elif line:
            try:
                answer(line, pending)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
            pending = []


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model folder (one-shot with --prompt, else interactive)")
    add_load_args(p)
    p.add_argument("--image", action="append", default=[], help="image file for the (first) message (repeatable)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system prompt (default: DeepSeek-VL's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.set_defaults(func=run)
