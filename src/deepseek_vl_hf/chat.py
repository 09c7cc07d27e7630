"""Multi-turn chat with a DeepSeek-VL model: conversation state and streamed generation."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TextIteratorStreamer

IMAGE_TOKEN = "<image_placeholder>"


def user_content(text: str, num_images: int) -> list[dict[str, str]]:
    """Content parts of a user turn: placeholders in `text` mark where images go; otherwise images come first."""
    if IMAGE_TOKEN in text:
        if text.count(IMAGE_TOKEN) != num_images:
            raise ValueError(
                f"the message has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {num_images} image(s) were attached"
            )
        parts: list[dict[str, str]] = []
        for index, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if index:
                parts.append({"type": "image"})
            if chunk.strip():
                parts.append({"type": "text", "text": chunk})
        return parts
    return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]


class ChatSession:
    """A conversation with one model: user turns (with images) in, streamed assistant turns out."""

    def __init__(self, model, processor, system_prompt: str | None = None):
        self.model = model
        self.processor = processor
        self.system_prompt = system_prompt
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        if self.system_prompt is not None:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        self.images: list = []

    def prompt(self) -> str:
        return self.processor.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)

    def stream_reply(self, text: str, images: list | tuple = (), **generate_kwargs: Any) -> Iterator[str]:
        """Add a user turn and yield the answer's text pieces as they are generated; the answer joins the history.

        A turn that fails (bad input, an error during generation such as the context length) or is abandoned
        mid-answer (the generator closed) leaves the session exactly as before it: messages and images.
        """
        kept_messages, kept_images = len(self.messages), len(self.images)
        try:
            yield from self._turn(text, images, **generate_kwargs)
        except BaseException:
            del self.messages[kept_messages:]
            del self.images[kept_images:]
            raise

    def _turn(self, text: str, images: list | tuple, **generate_kwargs: Any) -> Iterator[str]:
        content = user_content(text, len(images))
        self.messages.append({"role": "user", "content": content})
        self.images.extend(images)
        inputs = self.processor(text=self.prompt(), images=self.images or None, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer, **generate_kwargs)
            except BaseException as exc:  # surfaced in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            if not pieces:  # the answer follows "Assistant:" after a space, which is the template's, not the answer's
                piece = piece.lstrip()
                if not piece:
                    continue
            pieces.append(piece)
            yield piece
        thread.join()
        if errors:
            raise errors[0]
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": "".join(pieces).strip()}]})


def generation_kwargs(
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0
) -> dict[str, Any]:
    """`generate` arguments: greedy when temperature is 0, else sampling."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    return kwargs
