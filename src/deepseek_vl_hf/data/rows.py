"""Random access to the raw rows of a data file: JSONL, JSON (a list), parquet, or a `datasets` folder.

The mixture sampler reads each source in a shuffled order, so rows are fetched by index. A JSONL file is
indexed by line offsets (one pass), so only the rows in use are parsed; JSON and parquet are read whole (for
large parquet data, convert it once to a `datasets` folder, which is memory-mapped). A row that cannot be
parsed raises `ValueError` naming its line when it is fetched, so one bad line never stops a whole file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class JsonLinesRows(Sequence):
    """The non-blank lines of a JSONL file, each parsed to a dict when fetched."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets: list[int] = []
        self.line_numbers: list[int] = []
        with open(path, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Any:
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[index])
            line = handle.readline()
        try:
            return json.loads(line)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(
                f"{self.path.name} line {self.line_numbers[index]} is not valid JSON ({err})"
            ) from err


class ArrowRows(Sequence):
    """The rows of a pyarrow table, or of a `datasets.Dataset` in arrow format, as dicts when fetched.

    Rows come undecoded: a `datasets` Image value is its stored `{"bytes", "path"}` struct, so images are
    decoded later by `load_image`, where a corrupt one is a bad record rather than an exception while reading.
    """

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.table[index : index + 1].to_pylist()[0]


def _load_datasets_folder(path: Path):
    """A `save_to_disk` folder: a Dataset, or the `train` split (or the only split) of a DatasetDict."""
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if not isinstance(loaded, DatasetDict):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(
        f"{path} holds the splits {sorted(loaded)} and none is called 'train'; point at one split"
    )


def open_rows(path: str | os.PathLike) -> Sequence:
    """The rows of the data file or folder at `path`, by the file's suffix or the folder's contents.

    A folder is a `datasets.save_to_disk` folder, or else a folder of parquet shards (read as one table).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return ArrowRows(_load_datasets_folder(path).with_format("arrow"))
        import pyarrow.parquet as pq

        return ArrowRows(pq.read_table(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonLinesRows(path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a JSON list of records, not a {type(rows).__name__}")
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return ArrowRows(pq.read_table(path))
    raise ValueError(
        f"{path}: unknown data file type {suffix!r}; "
        f"use one of {DATA_FILE_SUFFIXES}, or a datasets or parquet folder"
    )
