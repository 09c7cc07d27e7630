"""Writing converted checkpoint folders: the shared plan-then-stream driver and our folder's metadata files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from torch import nn
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from deepseek_vl_hf.atomic import atomic_directory

from .keymaps import KeyMapper
from .shards import CheckpointReader, parse_size
from .weights import plan_weights, write_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConversionResult:
    """Where the converted folder is, its main dtype, the source keys dropped as ignorable, and notes."""

    output: Path
    dtype: torch.dtype
    ignored: list[str]
    notes: list[str] = field(default_factory=list)


def meta_model(model_cls: Callable[..., nn.Module], config) -> nn.Module:
    """`model_cls(config)` on the meta device: its state-dict layout without allocating weights."""
    with torch.device("meta"):
        return model_cls(config)


def generation_config(tokenizer) -> GenerationConfig:
    """Greedy-by-default generation settings with the tokenizer's BOS/EOS; EOS pads when there is no pad token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)


def save_our_metadata(folder: Path, config, processor, dtype: torch.dtype) -> None:
    """Config (with `auto_map` and the remote-code files), generation config and processor of our format."""
    config.dtype = dtype
    config.architectures = [DeepseekVLHFForCausalLM.__name__]
    custom_object_save(meta_model(DeepseekVLHFForCausalLM, config), folder, config=config)
    config.save_pretrained(folder)
    generation_config(processor.tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)


def convert_folder(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    mapper: KeyMapper,
    reverse: KeyMapper,
    expected: dict[str, tuple[int, ...]],
    save_metadata: Callable[[Path, torch.dtype], None],
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> ConversionResult:
    """Check the whole key mapping against `expected` (target names and shapes), then write `output` atomically:
    metadata via `save_metadata(folder, dtype)`, the weights streamed shard by shard, then `finalize(folder)`."""
    reader = CheckpointReader(source)
    plan = plan_weights(reader, mapper, expected, dtype=dtype, reverse=reverse)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        save_metadata(tmp, plan.dtype)
        write_weights(reader, mapper, plan, tmp, parse_size(max_shard_size))
        if finalize is not None:
            finalize(tmp)
    return ConversionResult(output=Path(output), dtype=plan.dtype, ignored=plan.ignored)
