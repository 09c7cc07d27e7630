"""Checkpoint tensor files, streamed: read a folder's weight files one tensor at a time, write safetensors shards
one tensor at a time.

Reading: `*.safetensors` (with or without `model.safetensors.index.json`) through `safetensors.safe_open`, or
`pytorch_model*.bin` through `torch.load(weights_only=True, mmap=True)`. Writing: the output layout (names, shapes,
dtypes, in write order) is planned first, so each shard's safetensors header is known before its first tensor
arrives and every tensor goes straight to disk; nothing is buffered beyond the tensor being written.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_DTYPE_FROM_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
SAFE_INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """`"5GB"` -> 5_000_000_000, `"2GiB"` -> 2**31; plain integers are bytes."""
    if isinstance(text, int):
        return text
    found = _SIZE.match(text)
    if not found:
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "").upper()])


def _keep_all(key: str) -> bool:
    return True


class CheckpointReader:
    """The weight files of a checkpoint folder, read one file and one tensor at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = self._find_files()

    def _find_files(self) -> list[Path]:
        for index_name in (SAFE_INDEX, "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return [self.folder / name for name in sorted(set(weight_map.values()))]
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.folder / single).is_file():
                return [self.folder / single]
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            return shards
        present = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
        raise FileNotFoundError(
            f"no weights in {self.folder}: expected {SAFE_INDEX}, model.safetensors, pytorch_model.bin(.index.json) "
            f"or *.safetensors; found {present or 'nothing'}"
        )

    def _file_items(
        self, path: Path, load: bool, keep: Callable[[str], bool]
    ) -> Iterator[tuple[str, torch.Tensor | TensorSpec]]:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                names = handle.keys()  # a safe_open handle is not iterable
                for key in names:
                    if not keep(key):
                        continue
                    if load:
                        yield key, handle.get_tensor(key)
                    else:
                        piece = handle.get_slice(key)
                        yield key, TensorSpec(key, tuple(piece.get_shape()), _DTYPE_FROM_CODE[piece.get_dtype()])
            return
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, tensor in state.items():
            if keep(key):
                yield key, (tensor if load else TensorSpec(key, tuple(tensor.shape), tensor.dtype))
        del state

    def specs(self) -> list[TensorSpec]:
        """Every tensor's name, shape and dtype, in reading order, without loading data."""
        return [spec for path in self.files for _, spec in self._file_items(path, False, _keep_all)]

    def tensors(self, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, tensor)` file by file, in the order of `specs()`; names failing `keep` are not even loaded."""
        for path in self.files:
            yield from self._file_items(path, True, keep or _keep_all)


def _header(specs: Sequence[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split the write order into consecutive shards of at most `max_shard_bytes` (a larger tensor goes alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardWriter:
    """Writes tensors, in exactly the planned order, into `model-XXXXX-of-XXXXX.safetensors` plus the index.

    Each tensor's bytes go straight into its shard file; `close()` checks that every planned tensor came and writes
    `model.safetensors.index.json`.
    """

    def __init__(self, folder: str | os.PathLike, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_bytes)
        count = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._handle = None
        self._open_index = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, shape and dtype must be the planned ones."""
        if self._position >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} arrived after all planned tensors were written")
        shard_index, spec = self._queue[self._position]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise RuntimeError(
                f"write order broken: expected {spec.name} {spec.shape} {spec.dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard_index != self._open_index:
            self._close_file()
            self._handle = open(self.folder / self.names[shard_index], "wb")  # noqa: SIM115
            self._handle.write(_header(self.shards[shard_index]))
            self._open_index = shard_index
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._position += 1

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Finish the last shard and write the index; fails if planned tensors are missing."""
        self._close_file()
        if self._position != len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._position :]]
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written: {missing[:10]}")
        weight_map = {spec.name: self.names[i] for i, spec in self._queue}
        total = sum(spec.nbytes for _, spec in self._queue)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
