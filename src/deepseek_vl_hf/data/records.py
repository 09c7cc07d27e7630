"""Training records: the canonical schema of each data kind, and reading data files into it.

Canonical records (see README.md in this folder for the accepted input variants):

- pairs: `{"image": ref, "text": str}`
- interleaved: `{"segments": [{"text": str} | {"image": ref}, ...]}`
- conversations: `{"images": [ref, ...], "messages": [{"role": "system"|"user"|"assistant", "content": ...}]}`
  where `content` is a string with one `<image_placeholder>` per image, or a Hugging Face content list
- text: `{"text": str}`

An image `ref` is a local path (relative ones are resolved against the folder holding the data file or
dataset folder), encoded bytes or a PIL image. A row that cannot be read or normalised is returned as
`{"_error": why}`; `encode_record` turns it into a `BadRecord("malformed", ...)`, so the stream goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deepseek_vl_hf.data.rows import open_rows
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import IMAGE_TOKEN

RECORD_KINDS = ("pairs", "interleaved", "conversations", "text")
LLAVA_IMAGE_TOKEN = "<image>"
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

# BadRecord reasons: the keys of the per-source skip counts.
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
PLACEHOLDER_MISMATCH = "placeholder mismatch"
OVER_LONG = "over-long"
EMPTY = "empty"
MALFORMED = "malformed"
TURN_BOUNDARY = "turn boundary"


class BadRecord(ValueError):
    """One unusable record: `reason` is its short category (counted per source), `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)  # both in args, so the error pickles across data-loader workers
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def _malformed(detail: str) -> BadRecord:
    return BadRecord(MALFORMED, detail)


def _field(row: dict, *names: str) -> Any:
    """The first of `names` present (and not None) in `row`; a malformed-record error if none is."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise _malformed(f"the record has no {' / '.join(repr(n) for n in names)} field (it has {sorted(row)})")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} must be a string, got {type(value).__name__}")
    return value


def _image_ref(value: Any, base: Path) -> Any:
    """A path resolved against `base`; a `datasets` Image struct `{"bytes", "path"}` unpacked."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(os.path.expanduser(os.fspath(value)))
        return str(path if path.is_absolute() or "://" in os.fspath(value) else base / path)
    if value is None:
        raise _malformed("an image entry is empty")
    return value


def _image_list(value: Any, base: Path) -> list:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_image_ref(item, base) for item in items]


def _pairs(row: dict, base: Path) -> dict:
    return {
        "image": _image_ref(_field(row, "image"), base),
        "text": _string(_field(row, "text", "caption"), "text"),
    }


def _mmc4_segments(row: dict, base: Path) -> list[dict]:
    """MMC4's `text_list` + `image_info`: each image goes before the sentence it is matched to."""
    sentences = [_string(s, "a text_list entry") for s in row["text_list"]]
    images_before: dict[int, list] = {}
    for info in row.get("image_info") or []:
        where = info.get("matched_text_index")
        if not isinstance(where, int) or not 0 <= where < len(sentences):
            raise _malformed(
                f"image_info entry {info} has no valid matched_text_index for {len(sentences)} sentences"
            )
        images_before.setdefault(where, []).append(
            _image_ref(_field(info, "path", "image_name", "image"), base)
        )
    segments: list[dict] = []
    run: list[str] = []
    for index, sentence in enumerate(sentences):
        if index in images_before:
            if run:
                segments.append({"text": " ".join(run)})
                run = []
            segments += [{"image": image} for image in images_before[index]]
        run.append(sentence)
    if run:
        segments.append({"text": " ".join(run)})
    return segments


def _interleaved(row: dict, base: Path) -> dict:
    if row.get("text_list") is not None:
        return {"segments": _mmc4_segments(row, base)}
    segments = []
    for segment in _field(row, "segments"):
        if not isinstance(segment, dict):
            raise _malformed(f"a segment must be an object, got {type(segment).__name__}")
        if segment.get("image") is not None:
            segments.append({"image": _image_ref(segment["image"], base)})
        elif segment.get("text") is not None:
            segments.append({"text": _string(segment["text"], "a text segment")})
        else:
            raise _malformed(f"a segment needs a 'text' or an 'image', got {segment}")
    return {"segments": segments}


def _message(role: Any, content: Any) -> dict:
    if role not in ROLES:
        raise _malformed(f"unknown role {role!r}; use one of {sorted(ROLES)}")
    if isinstance(content, str):
        content = content.replace(LLAVA_IMAGE_TOKEN, IMAGE_TOKEN)
    elif not isinstance(content, list):
        raise _malformed(f"message content must be a string or a content list, got {type(content).__name__}")
    return {"role": ROLES[role], "content": content}


def _conversations(row: dict, base: Path) -> dict:
    if row.get("conversations") is not None:  # LLaVA / ShareGPT4V: {"from": "human"|"gpt", "value": ...}
        messages = [_message(turn.get("from"), turn.get("value")) for turn in row["conversations"]]
    else:
        messages = [_message(turn.get("role"), turn.get("content")) for turn in _field(row, "messages")]
    images = row.get("images") if row.get("images") is not None else row.get("image")
    if images is None:  # images carried inside Hugging Face content parts
        images = [
            ref
            for message in messages
            if isinstance(message["content"], list)
            for part in message["content"]
            if part.get("type") == "image" and (ref := part.get("image") or part.get("path")) is not None
        ]
    return {"images": _image_list(images, base), "messages": messages}


def _text(row: dict, base: Path) -> dict:
    return {"text": _string(_field(row, "text"), "text")}


NORMALISERS = {"pairs": _pairs, "interleaved": _interleaved, "conversations": _conversations, "text": _text}


class RecordTable(Sequence):
    """The canonical records of one data file, by index; unusable rows come back as `{"_error": why}`."""

    def __init__(self, path: str | os.PathLike, kind: str):
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {kind!r}; use one of {RECORD_KINDS}")
        self.path = Path(path)
        self.kind = kind
        self.base = self.path.resolve().parent
        self.rows = open_rows(self.path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        try:
            row = self.rows[index]
        except ValueError as err:  # an unparsable line
            return {"_error": f"record {index}: {err}"}
        return normalise_row(row, self.kind, self.base, f"record {index}")


def normalise_row(row: Any, kind: str, base: Path, where: str) -> dict:
    """One raw row as the canonical record of `kind` (relative image paths against `base`), or
    `{"_error": why}` naming `where` the row came from when it cannot be read."""
    try:
        if not isinstance(row, dict):
            raise _malformed(f"a record must be an object, got {type(row).__name__}")
        return NORMALISERS[kind](row, base)
    except BadRecord as err:
        return {"_error": f"{where}: {err.detail}"}
    except (ValueError, TypeError, AttributeError, KeyError) as err:  # wrong nesting, wrong types
        return {"_error": f"{where}: {err}"}


def open_records(path: str | os.PathLike, kind: str) -> RecordTable:
    """Random access to the canonical records of `kind` in the file or folder at `path`."""
    return RecordTable(path, kind)


def read_records(path: str | os.PathLike, kind: str) -> Iterator[dict]:
    """The canonical records of `kind` in the file or folder at `path`, in file order."""
    table = open_records(path, kind)
    return (table[index] for index in range(len(table)))
