"""Chat-completion requests: OpenAI's JSON validated, messages turned into the chat template's conversation and
image bytes, then into token ids and pixels with the model's own processor.

Every problem becomes an `ApiError` (400) that names the field and what to change; unknown fields are refused
rather than silently ignored, so a client never believes a setting was applied when it was not.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deepseek_vl_hf.api.errors import ApiError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
_REMOTE_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The chat-completions fields this server honours; anything else is an unknown field (400)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded: greedy when `temperature` is 0."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Prepared:
    """A validated request, ready for the engine: token ids (images expanded), pixels, decoding settings."""

    input_ids: list[int]
    pixel_values: Any  # torch.Tensor [num_images, 3, S, S] or None
    sampling: Sampling
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Limits:
    """Server-side limits: the context length, image size in bytes, whether local files may be read."""

    context_length: int
    max_image_bytes: int
    allow_local_files: bool


def parse_body(raw: bytes) -> ChatCompletionRequest:
    """JSON bytes -> a validated request; bad JSON and invalid or unknown fields raise a 400 naming them."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object with 'model' and 'messages'")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = max(exc.errors(), key=lambda error: len(error["loc"]))  # the most specific one
        where = _location(first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown field '{where}': this server does not support it; leave it out"
        elif where == "n":
            message = "n must be 1: this server returns one choice per request"
        else:
            message = f"invalid field '{where}': {first['msg']}"
        raise ApiError(400, message, param=where) from None


def _location(loc: tuple) -> str:
    """An error location as a dotted field path, without the union members pydantic names in it ("str",
    "list[...]", and a content part's type tag right after its index)."""
    parts = []
    for position, part in enumerate(loc):
        if isinstance(part, str) and ("[" in part or part == "str"):
            continue
        if part in ("text", "image_url") and position and isinstance(loc[position - 1], int) and position + 1 < len(loc):
            continue
        parts.append(str(part))
    return ".".join(parts)


def image_source(url: str, index: int, limits: Limits) -> bytes | str:
    """An image_url's `url` -> encoded image bytes (data: URL) or a local path (only with --allow-local-files)."""
    param = f"image {index}"
    match = _DATA_URL.match(url)
    if match:
        try:
            data = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param}: the data URL is not valid base64", param="messages") from None
        if len(data) > limits.max_image_bytes:
            raise ApiError(
                400, f"{param} is {len(data)} bytes, over this server's limit of {limits.max_image_bytes} bytes; "
                "send a smaller image", param="messages", code="image_too_large")
        return data
    if url.startswith("data:"):
        raise ApiError(400, f"{param}: only base64 data URLs are supported (data:image/png;base64,...)",
                       param="messages")
    if re.match(r"^https?://", url, re.IGNORECASE):
        raise ApiError(400, f"{param}: http(s) image URLs are not fetched by this server; send the image inline "
                       "as a data:image/...;base64 URL", param="messages", code="remote_url_refused")
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif _REMOTE_URL.match(url):
        raise ApiError(400, f"{param}: unsupported URL scheme; send a data:image/...;base64 URL", param="messages")
    if not limits.allow_local_files:
        raise ApiError(400, f"{param}: local file paths are disabled; send a data: URL, or start the server with "
                       "--allow-local-files", param="messages", code="local_files_disabled")
    if not os.path.isfile(url):
        raise ApiError(400, f"{param}: no such file on the server: {url}", param="messages")
    if os.path.getsize(url) > limits.max_image_bytes:
        raise ApiError(400, f"{param} ({url}) is over this server's limit of {limits.max_image_bytes} bytes",
                       param="messages", code="image_too_large")
    return url


def conversation(request: ChatCompletionRequest, limits: Limits) -> tuple[list[dict[str, Any]], list[bytes | str]]:
    """OpenAI messages -> the chat template's messages (image parts become `{"type": "image"}`) and the images,
    in order."""
    messages, images = [], []
    for message in request.messages:
        if isinstance(message.content, str):
            parts = [{"type": "text", "text": message.content}]
        else:
            parts = []
            for part in message.content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                else:
                    images.append(image_source(part.image_url.url, len(images), limits))
                    parts.append({"type": "image"})
        messages.append({"role": message.role, "content": parts})
    return messages, images


def sampling(request: ChatCompletionRequest, prompt_tokens: int, limits: Limits, defaults: Sampling) -> Sampling:
    """Decoding settings; `max_tokens` defaults to what fits the context, and over it is a 400."""
    room = limits.context_length - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens (images expanded), which leaves no room in the "
                       f"model's context length of {limits.context_length} tokens; shorten the messages or send "
                       "fewer images", param="messages", code="context_length_exceeded")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        max_tokens = room if defaults.max_tokens <= 0 else min(room, defaults.max_tokens)
    elif max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} is over the limit: the prompt is {prompt_tokens} tokens and "
                       f"the context length is {limits.context_length}, so at most {room} new tokens fit",
                       param="max_tokens", code="context_length_exceeded")
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    temperature = defaults.temperature if request.temperature is None else request.temperature
    top_p = defaults.top_p if request.top_p is None else request.top_p
    return Sampling(max_tokens, temperature, top_p, tuple(stop), request.seed)


def prepare(request: ChatCompletionRequest, processor, limits: Limits, defaults: Sampling) -> Prepared:
    """Validate and encode a request with the model's processor (CPU work: call it off the event loop)."""
    from jinja2 import TemplateError

    messages, images = conversation(request, limits)
    try:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError) as exc:
        raise ApiError(400, f"the messages do not fit the chat format: {exc}", param="messages") from None
    try:  # over the tokenizer's length limit, a placeholder/image mismatch, an unreadable image: ValueErrors
        inputs = processor(text=prompt, images=images or None, return_tensors="pt", max_length=10**9)
    except ValueError as exc:
        raise ApiError(400, f"the messages cannot be encoded: {exc}", param="messages") from None
    input_ids = inputs["input_ids"][0].tolist()
    return Prepared(
        input_ids=input_ids,
        pixel_values=inputs.get("pixel_values"),
        sampling=sampling(request, len(input_ids), limits, defaults),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


def template_prefix(processor) -> list[int]:
    """The token ids every prompt of the chat template starts with (its system prompt and first role tag): the
    common start of two one-message prompts. The engine caches them once (`Engine(prefix_ids=...)`)."""
    first, second = (
        processor(text=processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                                     add_generation_prompt=True, tokenize=False),
                  return_tensors="pt")["input_ids"][0].tolist()
        for text in ("1", "x")
    )
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    return list(first[:common])
