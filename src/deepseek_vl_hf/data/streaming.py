"""Streaming sources: sharded parquet, JSON lines or WebDataset tar files read lazily with `datasets`.

A streaming source is never held in memory or indexed. Its shards are split between the readers of a run
(one reader per rank and loader-worker lane) by `datasets.distributed.split_dataset_by_node`: whole shards
when their count is a multiple of the readers', else every reader-th record of every shard. Each reader
reads its part pass after pass, each pass in a seeded order (shard order and a shuffle buffer, reseeded per
pass by `set_epoch`), so a reader's n-th record is a pure function of (seed, reader, readers, n): resuming
at draw n re-reads the first n records without decoding their images.

WebDataset samples (files sharing a key in a tar: `key.json` plus `key.jpg`, `key.0.png`, ...) become the
sample's JSON object; a string in it naming one of the sample's other members by its extension (`"jpg"`,
`"0.png"`) stands for that member's bytes, and a record without `image` / `images` gets the sample's images
(one: `image`, several: `images`, by extension). A sample with `txt` and no JSON is `{"text": ...}`.
"""

from __future__ import annotations

import glob
import os
from collections import deque
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

from deepseek_vl_hf.data.records import normalise_row

STREAM_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".tar": "webdataset"}
MAX_CONSECUTIVE_BAD = 1000  # a streaming source with this many bad records in a row is given up on


def shard_files(path: str | os.PathLike) -> list[str]:
    """The shard files of a streaming source: a file, a glob pattern, or a folder's files of one known type."""
    text = os.fspath(path)
    if glob.has_magic(text):
        files = sorted(glob.glob(text))
    elif Path(text).is_dir():
        files = sorted(str(p) for p in Path(text).iterdir() if p.suffix.lower() in STREAM_BUILDERS)
    else:
        files = [text] if Path(text).is_file() else []
    if not files:
        raise FileNotFoundError(
            f"streaming source {text}: no shard files (one of {sorted(STREAM_BUILDERS)}) found there"
        )
    builders = {STREAM_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"streaming source {text}: the shards must all be one of {sorted(STREAM_BUILDERS)}, got "
            f"{sorted({Path(f).suffix for f in files})}"
        )
    return files


def _webdataset_row(sample: dict[str, Any]) -> Any:
    """A WebDataset sample as a raw record (see the module docstring)."""
    members = {k: v for k, v in sample.items() if not k.startswith("__") and k not in ("json", "txt")}
    if sample.get("json") is None:
        return {"text": sample["txt"]} if sample.get("txt") is not None else {"_members": sorted(members)}

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            return members.get(value, value)
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        return value

    row = resolve(sample["json"])
    if isinstance(row, dict) and row.get("image") is None and row.get("images") is None and members:
        images = [members[key] for key in sorted(members)]
        row = {**row, **({"image": images[0]} if len(images) == 1 else {"images": images})}
    return row


def open_stream(files: list[str], seed: int, reader: int, readers: int, shuffle_buffer: int):
    """The `datasets` streaming dataset of one reader's part of the shards; images stay undecoded."""
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError as err:
        raise ImportError('streaming sources need the datasets package: pip install -e ".[train]"') from err
    builder = STREAM_BUILDERS[Path(files[0]).suffix.lower()]
    stream = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=True)
    for name, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):  # decoded later by load_image: a corrupt one is a bad record
            stream = stream.cast_column(name, datasets.Image(decode=False))
    stream = split_dataset_by_node(stream, rank=reader, world_size=readers)
    if shuffle_buffer > 1:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return stream


class ShardedStream:
    """One reader's records of a streaming source, by raw index, read forward only.

    `record(draw, attempt)` is record `draw + attempt` of the reader's endless stream (pass after pass),
    normalised to the canonical form of `kind` (`{"_error": why}` when unusable): a bad draw is replaced by
    the records after it (`attempt` 1, 2, ...), as in-memory sources do. Records before `draw` are dropped,
    so draws must not go back; records skipped over (resuming) are never normalised nor decoded.
    """

    def __init__(self, path: str, kind: str, seed: int, reader: int, readers: int, shuffle_buffer: int):
        self.path, self.kind = path, kind
        self.files = shard_files(path)
        self.base = _base(path, self.files)
        self.stream = open_stream(self.files, seed, reader, readers, shuffle_buffer)
        self.where = f"reader {reader} of {readers}"
        self._rows = self._endless()
        self._start = 0  # raw index of self._buffer[0]
        self._buffer: deque = deque()

    def _endless(self) -> Iterator[Any]:
        webdataset = _is_webdataset(self.files)
        for epoch in count():
            self.stream.set_epoch(epoch)
            empty = True
            for sample in _samples(self.stream):
                empty = False
                yield _webdataset_row(sample) if webdataset else sample
            if empty:
                raise RuntimeError(
                    f"streaming source {self.path}: {self.where} got no record; use at least as many records "
                    "(better: shards) as ranks x data-loader workers"
                )

    def record(self, draw: int, attempt: int = 0) -> dict:
        if draw < self._start:
            raise IndexError(f"draw {draw} was already passed (at {self._start}); streams read forward")
        while self._buffer and self._start < draw:
            self._buffer.popleft()
            self._start += 1
        while self._start < draw:  # nothing buffered: skip forward
            next(self._rows)
            self._start += 1
        while len(self._buffer) <= attempt:
            self._buffer.append(next(self._rows))
        index = draw + attempt
        return normalise_row(
            self._buffer[attempt], self.kind, self.base, f"{self.path} {self.where} record {index}"
        )


def _samples(stream) -> Iterator[dict]:
    """The stream's records one by one. Through `iter(batch_size=1)`: iterating the dataset itself inside a
    data-loader worker would make `datasets` split it between the workers again, on top of our lanes."""
    for batch in stream.iter(batch_size=1):
        yield {key: values[0] for key, values in batch.items()}


def _base(path: str, files: list[str]) -> Path:
    """The folder relative image paths in the records are resolved against."""
    return Path(path).resolve() if Path(path).is_dir() else Path(files[0]).resolve().parent


def _is_webdataset(files: list[str]) -> bool:
    return STREAM_BUILDERS[Path(files[0]).suffix.lower()] == "webdataset"


def stream_records(path: str, kind: str) -> Iterator[dict]:
    """One pass over a streaming source in file order, normalised (for checks and eval sets); a missing or
    mixed shard set fails here, not when iterating."""
    files = shard_files(path)
    webdataset, base = _is_webdataset(files), _base(path, files)
    stream = open_stream(files, seed=0, reader=0, readers=1, shuffle_buffer=0)
    return (
        normalise_row(_webdataset_row(sample) if webdataset else sample, kind, base, f"{path} record {index}")
        for index, sample in enumerate(_samples(stream))
    )
