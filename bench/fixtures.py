"""What the benchmarks run on: model configurations, same-weight model pairs (ours and transformers' native,
via `deepseek_vl_hf.conversion`), photo-like JPEGs and prompt batches, all made locally."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from deepseek_vl_hf.conversion.keymaps import KeyMapper, ours_to_native_rules
from deepseek_vl_hf.conversion.native import NATIVE_MODELS, native_pixel_inputs, ours_to_native_config
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor
from PIL import Image
from transformers import BatchFeature

from deepseek_vl_hf.checkpoint import build_random_model

# Preset + `--set`-style overrides. The native SAM tail is always two convs neck -> 2x -> 4x channels, so the
# small configurations set `downsample_channels` to that shape.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {"sam_config.downsample_channels": [64, 128]}),
    # The "B" shape of shared/spec/cpu-feasibility.md: SAM at 384 px, SigLIP at 192 px, 144 image tokens.
    "mid": (
        "tiny",
        {
            "sam_config.image_size": 384, "sam_config.hidden_size": 96, "sam_config.num_hidden_layers": 3,
            "sam_config.num_attention_heads": 6, "sam_config.intermediate_size": 384, "sam_config.window_size": 8,
            "sam_config.global_attn_indexes": [2], "sam_config.hd_block_index": 2, "sam_config.neck_channels": 48,
            "sam_config.downsample_channels": [96, 192], "siglip_config.image_size": 192,
            "siglip_config.hidden_size": 96, "siglip_config.num_hidden_layers": 3,
            "siglip_config.num_attention_heads": 6, "siglip_config.intermediate_size": 384,
            "text_config.hidden_size": 192, "text_config.intermediate_size": 512, "text_config.num_hidden_layers": 3,
            "text_config.num_attention_heads": 6, "text_config.num_key_value_heads": 2, "text_config.vocab_size": 4096,
        },
    ),
    # Tiny towers with a small LLM (4 x 512, ~20 M parameters): forward and generation.
    "small-llm": (
        "tiny",
        {
            "sam_config.downsample_channels": [64, 128], "text_config.hidden_size": 512,
            "text_config.intermediate_size": 1408, "text_config.num_hidden_layers": 4,
            "text_config.num_attention_heads": 8, "text_config.num_key_value_heads": 4, "text_config.vocab_size": 8192,
        },
    ),
    # The released 7B vision shape (SAM-B at 1024, SigLIP-L at 384, 576 tokens) with a one-layer LLM.
    "7b-vision": ("7b", {"text_config.num_hidden_layers": 1, "text_config.vocab_size": 1024}),
}

_HUB_SIGLIP_PREFIX, _MODULE_SIGLIP_PREFIX = "model.vision_model.vision_model.", "model.vision_model."


def build_ours(name: str, seed: int = 0) -> tuple[DeepseekVLHFForCausalLM, DeepseekVLHFProcessor]:
    """Our random-weight model (eval mode) and processor for configuration `name`.

    The zero-initialised SAM relative positions and `hd_alpha_downsamples` get small random values, so that
    the output comparisons with native cover those paths too.
    """
    preset, overrides = CONFIGS[name]
    model, processor = build_random_model(preset, overrides, seed=seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith(("rel_pos_h", "rel_pos_w", "hd_alpha_downsamples")):
                tensor.normal_(0, 0.1)
    return model, processor


def to_native(ours: DeepseekVLHFForCausalLM) -> torch.nn.Module:
    """transformers' native model holding exactly `ours`' weights, mapped by the conversion key rules."""
    config = ours_to_native_config(ours.config)
    native = NATIVE_MODELS[config.model_type](config)
    mapper = KeyMapper(ours_to_native_rules(ours.config.is_hybrid))
    # The rules write the Hub layout; transformers 5 modules keep the SigLIP one level up (renamed on load).
    expected = native.state_dict().keys()
    state = {
        key if key in expected else key.replace(_HUB_SIGLIP_PREFIX, _MODULE_SIGLIP_PREFIX, 1): tensor
        for key, tensor in mapper.stream(ours.state_dict().items())
    }
    native.load_state_dict(state, strict=True)
    return native.to(ours.dtype).eval()


def native_inputs(inputs: BatchFeature, ours: DeepseekVLHFForCausalLM) -> dict[str, torch.Tensor]:
    """The native model's inputs for our processor's `inputs`: the pixel tensors our model computes inside."""
    converted = {key: value for key, value in inputs.items() if key != "pixel_values"}
    if "pixel_values" in inputs:
        pixels = native_pixel_inputs(inputs["pixel_values"], ours.config)
        converted.update({key: value.to(ours.dtype) for key, value in pixels.items()})
    return converted


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth photo-like JPEG: low-frequency colour fields, soft blobs and mild sensor noise."""
    rng = np.random.default_rng(seed)
    small_h, small_w = max(height // 16, 2), max(width // 16, 2)
    yy, xx = np.mgrid[0:small_h, 0:small_w] / max(small_h, small_w)
    channels = []
    for _ in range(3):
        field = sum(
            rng.uniform(20, 60) * np.cos(2 * np.pi * (rng.uniform(0.3, 3) * xx + rng.uniform(0.3, 3) * yy) + rng.uniform(0, 6))
            for _ in range(4)
        )
        channels.append(field + rng.uniform(90, 160))
    small = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")
    base = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 3, size=(height, width, 1)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """JPEG bytes -> RGB PIL image, decoded now (how images usually reach transformers' processors)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def chat_batch(processor: DeepseekVLHFProcessor, batch_size: int, seed: int = 0) -> BatchFeature:
    """`batch_size` one-image chat prompts of different lengths (640x480 photos), left-padded by our processor."""
    words = ["please", "describe", "the", "colours", "shapes", "and", "light", "in", "this", "photo", "with", "care"]
    prompts, images = [], []
    for index in range(batch_size):
        text = " ".join(words[: 4 + (3 * index) % len(words)])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        images.append(decode(photo_jpeg(640, 480, seed=seed + index)))
    return processor(text=prompts, images=images, return_tensors="pt")
