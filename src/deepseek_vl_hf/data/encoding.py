"""One canonical record -> training tokens: input ids (image tokens expanded), labels and decoded images.

Tokenisation is the processor's own (BOS first, each `<image_placeholder>` expanded to `num_image_tokens`
image ids, truncation that never cuts through an image); this module adds how each kind is written as text and
which tokens are labels. BOS, image tokens and (later) padding are never labels.
"""

from __future__ import annotations

import os
import re
from typing import Any

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from deepseek_vl_hf.data.records import (
    CORRUPT_IMAGE,
    EMPTY,
    MALFORMED,
    MISSING_IMAGE,
    OVER_LONG,
    PLACEHOLDER_MISMATCH,
    RECORD_KINDS,
    TURN_BOUNDARY,
    BadRecord,
)
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import ImageInputError, load_image

IGNORE_INDEX = -100
SUPERVISION_MODES = ("all", "assistant")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def render_text(record: dict, kind: str, processor) -> tuple[str, list]:
    """The record as one text with a placeholder per image, and its image refs in text order.

    pairs: the image, then the text; interleaved: the segments joined by newlines; text: the text. These three
    end with EOS (the model learns where a document ends). conversations: the processor's chat template, which
    closes each assistant answer with EOS.
    """
    eos = processor.tokenizer.eos_token
    if kind == "pairs":
        return processor.image_token + record["text"] + eos, [record["image"]]
    if kind == "interleaved":
        segments = record["segments"]
        parts = [processor.image_token if "image" in segment else segment["text"] for segment in segments]
        return "\n".join(parts) + eos, [segment["image"] for segment in segments if "image" in segment]
    if kind == "text":
        return record["text"] + eos, []
    if kind == "conversations":
        return _chat_text(record["messages"], processor), record["images"]
    raise ValueError(f"unknown record kind {kind!r}; use one of {RECORD_KINDS}")


def _chat_text(messages: list[dict], processor) -> str:
    try:
        return processor.apply_chat_template(messages, tokenize=False)
    except TemplateError as err:
        raise BadRecord(MALFORMED, str(err)) from err


def _token_ids(text: str, processor, max_length: int | None = None) -> tuple[list[int], int]:
    """The processor's ids for `text` (BOS, expanded image tokens) and how many images survived truncation."""
    return processor.encode_text(text, max_length)


def _assistant_labels(messages: list[dict], ids: list[int], processor) -> list[int]:
    """Labels that keep only the assistant answers and the EOS closing each: everything else is IGNORE_INDEX.

    The answers are what the chat template marks `{% generation %}` (one render, one tokenisation); a template
    without the marks (or a slow tokenizer) falls back to rendering the conversation up to each answer.
    """
    if GENERATION_TAG.search(processor.chat_template or "") and processor.tokenizer.is_fast:
        return _marked_labels(messages, ids, processor)
    return _prefix_labels(messages, ids, processor)


def _marked_labels(messages: list[dict], ids: list[int], processor) -> list[int]:
    """Labels from the character spans the template marks `{% generation %}`, mapped onto token offsets."""
    try:
        texts, marked = render_jinja_template(
            [messages], chat_template=processor.chat_template, return_assistant_tokens_mask=True
        )
    except TemplateError as err:
        raise BadRecord(MALFORMED, str(err)) from err
    marked_ids, _, offsets = processor.encode_text(texts[0], return_offsets=True)
    if marked_ids != ids:
        raise BadRecord(MALFORMED, "the chat template renders the conversation differently when marking answers")
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = end > start and any(left <= start and end <= right for left, right in marked[0])
        if not inside and any(start < right and left < end for left, right in marked[0]):
            raise BadRecord(TURN_BOUNDARY, "the tokenizer merges text across the start or end of an assistant answer")
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def _prefix_labels(messages: list[dict], ids: list[int], processor) -> list[int]:
    """Labels from prefix lengths: an answer's tokens lie between the ids of the conversation up to "Assistant:"
    and up to the answer's EOS; both are rendered with the same chat template, so they are prefixes of the full
    conversation's ids."""
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_length(messages[:index] + [{"role": "assistant", "content": ""}], ids, processor)
        end = _prefix_length(messages[: index + 1], ids, processor)
        labels[start:end] = ids[start:end]
    return labels


def _prefix_length(messages: list[dict], ids: list[int], processor) -> int:
    prefix, _ = _token_ids(_chat_text(messages, processor), processor)
    if ids[: len(prefix)] != prefix:
        raise BadRecord(
            TURN_BOUNDARY, "the tokenizer merges text across the start or end of an assistant answer"
        )
    return len(prefix)


def _all_text_labels(ids: list[int], processor) -> list[int]:
    """Labels that keep every text token: BOS (position 0) and image tokens are IGNORE_INDEX."""
    masked = {processor.image_token_id}
    has_bos = processor.tokenizer.bos_token_id is not None
    return [IGNORE_INDEX if (has_bos and i == 0) or t in masked else t for i, t in enumerate(ids)]


def _load_images(refs: list, image_processor) -> list:
    """Decode the images with the image processor's loader (RGB, upright, alpha as its `alpha_mode` says)."""
    images = []
    for index, ref in enumerate(refs):
        try:
            images.append(
                load_image(
                    ref,
                    index,
                    background_color=image_processor.fill_color,
                    max_image_pixels=image_processor.max_image_pixels,
                    alpha_mode=getattr(image_processor, "alpha_mode", "drop"),
                )
            )
        except ImageInputError as err:
            missing = isinstance(ref, (str, os.PathLike)) and not os.path.exists(os.path.expanduser(ref))
            raise BadRecord(MISSING_IMAGE if missing else CORRUPT_IMAGE, str(err)) from err
    return images


def encode_record(
    record: dict[str, Any], kind: str, processor, max_length: int | None, supervise: str
) -> dict[str, list]:
    """Tokenise one canonical record: `{"input_ids", "labels", "images"}`, or raise `BadRecord` saying why.

    `supervise="all"` (pretraining) labels every text token; `"assistant"` (SFT, conversations only) labels
    only assistant answers and their EOS. Over `max_length` the sequence is cut before the first image that
    does not fit whole (that image and later ones are dropped); if no label is left it is a BadRecord.
    """
    if supervise not in SUPERVISION_MODES:
        raise ValueError(f"supervise must be one of {SUPERVISION_MODES}, got {supervise!r}")
    if supervise == "assistant" and kind != "conversations":
        raise ValueError(f"supervise='assistant' needs conversation records, not {kind!r}")
    if "_error" in record:
        raise BadRecord(MALFORMED, record["_error"])
    text, image_refs = render_text(record, kind, processor)
    placeholders = text.count(processor.image_token)
    if placeholders != len(image_refs):
        raise BadRecord(
            PLACEHOLDER_MISMATCH,
            f"the text has {placeholders} {processor.image_token} but {len(image_refs)} image(s)",
        )
    ids, kept = _token_ids(text, processor)
    if supervise == "all":
        labels = _all_text_labels(ids, processor)
    else:
        labels = _assistant_labels(record["messages"], ids, processor)
    eos_id = processor.tokenizer.eos_token_id
    if all(label in (IGNORE_INDEX, eos_id) for label in labels):
        where = "in assistant answers" if supervise == "assistant" else "besides EOS"
        raise BadRecord(EMPTY, f"the record has no text to learn {where}")
    if max_length is not None and len(ids) > max_length:
        full_length = len(ids)
        ids, kept = _token_ids(text, processor, max_length)
        labels = labels[: len(ids)]
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord(
                OVER_LONG,
                f"{full_length} tokens, max_length {max_length}: nothing to learn is left after truncation",
            )
    return {
        "input_ids": ids,
        "labels": labels,
        "images": _load_images(image_refs[:kept], processor.image_processor),
    }
