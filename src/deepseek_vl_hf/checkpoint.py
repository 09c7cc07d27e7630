"""Writing complete checkpoint folders: weights, config, tokenizer, processor and the remote-code files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from deepseek_vl_hf.atomic import atomic_directory
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from deepseek_vl_hf.presets import preset_config
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import DeepseekVLHFImageProcessor
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor
from deepseek_vl_hf.tokenizer import IMAGE_TOKEN, build_tokenizer


def build_processor(config: DeepseekVLHFConfig, tokenizer) -> DeepseekVLHFProcessor:
    """The processor that fits `config`: image size, the SAM (hybrid) or SigLIP background colour, token count."""
    branch = config.sam_config if config.is_hybrid else config.siglip_config
    image_processor = DeepseekVLHFImageProcessor(
        image_size=config.image_size, image_mean=tuple(branch.image_mean), image_std=tuple(branch.image_std)
    )
    return DeepseekVLHFProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens
    )


def build_random_model(
    preset: str, overrides: dict[str, Any] | None = None, seed: int = 0, tokenizer_corpus: list[str] | None = None
) -> tuple[DeepseekVLHFForCausalLM, DeepseekVLHFProcessor]:
    """A random-weight model of `preset` with a locally trained tokenizer and a matching processor."""
    config = preset_config(preset, overrides)
    tokenizer = build_tokenizer(vocab_size=min(config.text_config.vocab_size, 32000), corpus=tokenizer_corpus or ())
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than text_config.vocab_size")
    tokenizer.model_max_length = config.text_config.max_position_embeddings  # the processor's default limit
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for cfg in (config, config.text_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = DeepseekVLHFForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    return model, build_processor(config, tokenizer)


def save_checkpoint(
    model: DeepseekVLHFForCausalLM,
    processor: DeepseekVLHFProcessor | None,
    output: str | os.PathLike,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model (safetensors) and processor into `output` atomically; the folder carries its remote code.

    `state_dict` replaces the model's own tensors (training passes the full weights gathered from FSDP shards).
    """
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(tmp)
    return Path(output)
