"""Converting a checkpoint's tensors with a key table: check the whole mapping first, then stream the tensors.

`plan_weights` runs the key table over shape-only (meta) tensors built from the source headers and compares the
result with the target model's state dict: left-over source keys, missing target keys, duplicates and shape
mismatches are all reported at once, before anything is written. `write_weights` then streams the real tensors
through the same table into safetensors shards, one tensor in memory at a time.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .keymaps import KeyMapper
from .shards import CheckpointReader, ShardWriter, TensorSpec

MAX_LISTED = 50


class ConversionError(ValueError):
    """A checkpoint that does not fit the target layout or config; the message lists the offending keys."""


@dataclass
class WeightPlan:
    """The output tensors in write order, the source keys dropped as ignorable, and the main output dtype."""

    specs: list[TensorSpec]
    ignored: list[str]
    dtype: torch.dtype


def expected_state(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `model`'s state dict (build it on the meta device to spend no memory)."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _listing(title: str, lines: list[str]) -> str:
    shown = "\n".join(f"    {line}" for line in lines[:MAX_LISTED])
    more = f"\n    ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return f"  {len(lines)} {title}:\n{shown}{more}"


def _main_dtype(specs: list[TensorSpec]) -> torch.dtype:
    sizes: Counter = Counter()
    for spec in specs:
        if spec.dtype.is_floating_point:
            sizes[spec.dtype] += spec.nbytes
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def plan_weights(
    reader: CheckpointReader,
    mapper: KeyMapper,
    expected: dict[str, tuple[int, ...]],
    dtype: torch.dtype | None = None,
    reverse: KeyMapper | None = None,
) -> WeightPlan:
    """Map every source tensor's name and shape and check the result against `expected`.

    `dtype` casts floating tensors (None keeps each tensor's dtype). `reverse` (the opposite table) names the
    source key each missing target key would have come from. Raises `ConversionError` listing every problem.
    """
    ignored, leftover, matched = [], [], []
    for spec in reader.specs():
        if mapper.is_ignored(spec.name):
            ignored.append(spec.name)
        elif mapper.match(spec.name) is None:
            leftover.append(spec.name)
        else:
            matched.append(spec)
    meta = ((s.name, torch.empty(s.shape, dtype=s.dtype, device="meta")) for s in matched)
    specs = [
        TensorSpec(name, tuple(t.shape), dtype if dtype is not None and t.dtype.is_floating_point else t.dtype)
        for name, t in mapper.stream(meta)
    ]
    counts = Counter(spec.name for spec in specs)
    problems = []
    if leftover:
        problems.append(_listing("left-over source key(s) that no rule maps", sorted(leftover)))
    missing = [name for name in expected if name not in counts]
    if missing:
        hints = []
        for name in missing:
            sources = reverse.target_names(name) if reverse is not None else []
            hints.append(f"{name} (source key: {', '.join(sources)})" if sources else name)
        problems.append(_listing("missing key(s): the checkpoint has no tensor for", hints))
    unexpected = sorted(name for name in counts if name not in expected)
    if unexpected:
        problems.append(_listing("converted key(s) the target model does not have", unexpected))
    duplicated = sorted(name for name, n in counts.items() if n > 1)
    if duplicated:
        problems.append(_listing("target key(s) produced more than once", duplicated))
    mismatched = [
        f"{s.name}: converted {list(s.shape)}, model expects {list(expected[s.name])}"
        for s in specs if s.name in expected and s.shape != expected[s.name]
    ]
    if mismatched:
        problems.append(_listing("shape mismatch(es) (does the config fit the weights?)", mismatched))
    if problems:
        raise ConversionError(f"cannot convert the weights in {reader.folder}:\n" + "\n".join(problems))
    return WeightPlan(specs=specs, ignored=ignored, dtype=_main_dtype(specs))


def write_weights(
    reader: CheckpointReader, mapper: KeyMapper, plan: WeightPlan, folder: str | os.PathLike, max_shard_bytes: int
) -> None:
    """Stream the source tensors through `mapper` into safetensors shards + index in `folder`, as planned."""
    dtypes = {spec.name: spec.dtype for spec in plan.specs}
    writer = ShardWriter(folder, plan.specs, max_shard_bytes)
    skip = set(plan.ignored)
    for name, tensor in mapper.stream(reader.tensors(keep=lambda key: key not in skip)):
        writer.write(name, tensor.to(dtypes[name]))
    writer.close()
