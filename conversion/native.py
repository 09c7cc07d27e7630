"""transformers' native DeepSeek-VL port <-> our format: config, processor and weights, both directions.

Native classes: `DeepseekVLHybridForConditionalGeneration` (hybrid, 7B-style) and `DeepseekVLForConditionalGeneration`
(SigLIP-only, 1.3B-style). Pixel inputs differ by design: the native image processor makes a normalised 1024 image
for SAM and a normalised 384 image for SigLIP (resized from the padded uint8 image), ours makes one [0, 1] image and
the model normalises and resizes inside. `native_pixel_inputs` gives the native model exactly the tensors our
model computes inside, which is how model parity is checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import DeepseekVLHFImageProcessor
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    DeepseekVLHFProcessor,
)
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    DeepseekVLHybridProcessor,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    PreTrainedConfig,
)
from transformers.image_utils import PILImageResampling

from .folders import ConversionResult, convert_folder, generation_config, meta_model, save_our_metadata
from .keymaps import NATIVE_IGNORED, NATIVE_SIGLIP_OUT, KeyMapper, native_to_ours_rules, ours_to_native_rules
from .shards import CheckpointReader
from .weights import ConversionError, expected_state

NATIVE_MODELS = {"deepseek_vl_hybrid": DeepseekVLHybridForConditionalGeneration, "deepseek_vl": DeepseekVLForConditionalGeneration}
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def _side(size) -> int:
    """A square size setting (`{"height": s, "width": s}` or a SizeDict) -> s."""
    height, width = size["height"], size["width"]
    _require(height == width, f"only square image sizes are supported, got {height}x{width}")
    return int(height)


def _norm(image_processor, prefix: str = "") -> tuple[list[float], list[float]]:
    """The mean/std the native image processor normalises with (identity when it does not normalise)."""
    if not image_processor.do_normalize:
        return list(IDENTITY_MEAN), list(IDENTITY_STD)
    return list(getattr(image_processor, f"{prefix}image_mean")), list(getattr(image_processor, f"{prefix}image_std"))


def native_to_ours_config(native: PreTrainedConfig, image_processor) -> DeepseekVLHFConfig:
    """A native config (+ its image processor, which holds the normalisation) -> our config."""
    hybrid = native.model_type == "deepseek_vl_hybrid"
    vision = native.vision_config
    _require(vision.hidden_act == "gelu",
             f"the native SigLIP uses hidden_act {vision.hidden_act!r}; DeepSeek-VL's (and ours) is exact 'gelu'")
    mean, std = _norm(image_processor)
    siglip = dict(
        image_size=vision.image_size, patch_size=vision.patch_size, hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
        intermediate_size=vision.intermediate_size, layer_norm_eps=vision.layer_norm_eps, select_layer=-1,
        image_mean=mean, image_std=std,
    )
    sam = None
    if hybrid:
        high = native.high_res_vision_config
        _require(high.hidden_act == "gelu" and high.use_rel_pos and high.use_abs_pos and high.qkv_bias,
                 "the native SAM config must use exact gelu, relative and absolute positions and qkv bias")
        mean, std = _norm(image_processor, "high_res_")
        channels = high.output_channels
        sam = dict(
            image_size=high.image_size, patch_size=high.patch_size, hidden_size=high.hidden_size,
            num_hidden_layers=high.num_hidden_layers, num_attention_heads=high.num_attention_heads,
            intermediate_size=high.mlp_dim, layer_norm_eps=high.layer_norm_eps, window_size=high.window_size,
            global_attn_indexes=list(high.global_attn_indexes), neck_channels=channels,
            downsample_channels=[2 * channels, 4 * channels], hd_block_index=high.global_attn_indexes[0],
            image_mean=mean, image_std=std,
        )
    text = native.text_config.to_dict()
    text["tie_word_embeddings"] = False
    return DeepseekVLHFConfig(
        siglip_config=siglip, sam_config=sam, text_config=text, aligner_type="hybrid_split_mlp" if hybrid else "mlp",
        aligner_depth=2, image_token_id=native.image_token_id,
    )


def ours_to_native_config(config: DeepseekVLHFConfig) -> PreTrainedConfig:
    """Our config -> the native one; fails on settings the native port cannot express."""
    _require(config.aligner_depth == 2, f"the native adapter has depth 2, this model {config.aligner_depth}")
    siglip = config.siglip_config
    vision = dict(
        image_size=siglip.image_size, patch_size=siglip.patch_size, hidden_size=siglip.hidden_size,
        num_hidden_layers=siglip.num_kept_layers, num_attention_heads=siglip.num_attention_heads,
        intermediate_size=siglip.intermediate_size, layer_norm_eps=siglip.layer_norm_eps, hidden_act="gelu",
        vision_use_head=False,
    )
    text = config.text_config.to_dict()
    text["tie_word_embeddings"] = False
    common = dict(text_config=text, vision_config=vision, image_token_id=config.image_token_id, tie_word_embeddings=False)
    if not config.is_hybrid:
        return DeepseekVLConfig(**common)
    sam = config.sam_config
    channels = sam.neck_channels
    _require(list(sam.downsample_channels) == [2 * channels, 4 * channels],
             f"the native SAM tail is two convs {channels}->{2 * channels}->{4 * channels}; this model has "
             f"{sam.downsample_channels}")
    _require(sam.hd_block_index is not None and sam.hd_block_index == sam.global_attn_indexes[0],
             "the native SAM takes its second neck from the first global-attention block")
    high = dict(
        image_size=sam.image_size, patch_size=sam.patch_size, hidden_size=sam.hidden_size,
        num_hidden_layers=sam.num_hidden_layers, num_attention_heads=sam.num_attention_heads,
        mlp_dim=sam.intermediate_size, layer_norm_eps=sam.layer_norm_eps, window_size=sam.window_size,
        global_attn_indexes=list(sam.global_attn_indexes), output_channels=channels, hidden_act="gelu",
    )
    return DeepseekVLHybridConfig(**common, high_res_vision_config=high)


def native_image_processor(config: DeepseekVLHFConfig, image_processor: DeepseekVLHFImageProcessor):
    """The native image processor that prepares what our model sees (up to its uint8 low-res resize)."""
    _require(not image_processor.do_normalize,
             "export needs an image processor with do_normalize=False (the model normalises inside)")
    common = dict(min_size=image_processor.min_size, rescale_factor=image_processor.rescale_factor,
                  do_normalize=True, image_mean=config.siglip_config.image_mean, image_std=config.siglip_config.image_std)
    side = config.siglip_config.image_size
    if not config.is_hybrid:
        return DeepseekVLImageProcessor(size={"height": side, "width": side}, resample=PILImageResampling.BICUBIC, **common)
    high = config.sam_config.image_size
    return DeepseekVLHybridImageProcessor(
        size={"height": side, "width": side}, resample=PILImageResampling.BILINEAR,
        high_res_size={"height": high, "width": high}, high_res_resample=PILImageResampling.BICUBIC,
        high_res_image_mean=config.sam_config.image_mean, high_res_image_std=config.sam_config.image_std, **common,
    )


def native_pixel_inputs(pixel_values: torch.Tensor, config: DeepseekVLHFConfig) -> dict[str, torch.Tensor]:
    """From our [0, 1] `pixel_values`, the native model's inputs that equal what our model computes inside:
    the SigLIP input (fp32 antialiased bilinear resize, then its normalisation) and, for the hybrid, the SAM
    input (normalised)."""
    def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
        mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean_t) / std_t

    pixels = pixel_values.float()
    siglip = config.siglip_config
    low = pixels
    if pixels.shape[-1] != siglip.image_size:
        size = (siglip.image_size, siglip.image_size)
        low = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    inputs = {"pixel_values": normalise(low, siglip.image_mean, siglip.image_std)}
    if config.is_hybrid:
        inputs["high_res_pixel_values"] = normalise(pixels, config.sam_config.image_mean, config.sam_config.image_std)
    return inputs


def read_native(folder: str | os.PathLike) -> tuple[DeepseekVLHFConfig, DeepseekVLHFProcessor, PreTrainedConfig]:
    """Our config and processor for a native checkpoint folder, and the native config itself."""
    native = AutoConfig.from_pretrained(folder)
    _require(native.model_type in NATIVE_MODELS,
             f"config.json has model_type {native.model_type!r}; --from native reads {list(NATIVE_MODELS)}")
    native_processor = AutoProcessor.from_pretrained(folder)
    native_ip = native_processor.image_processor
    hybrid = native.model_type == "deepseek_vl_hybrid"
    config = native_to_ours_config(native, native_ip)
    tokenizer = native_processor.tokenizer
    _require(tokenizer.convert_tokens_to_ids(native_processor.image_token) == config.image_token_id,
             f"the tokenizer's id of {native_processor.image_token!r} differs from image_token_id {config.image_token_id}")
    _require(native_processor.num_image_tokens == config.num_image_tokens,
             f"the processor expands each image to {native_processor.num_image_tokens} tokens, the towers give "
             f"{config.num_image_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for cfg in (config, config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, pad
    prefix = "high_res_" if hybrid else ""
    image_processor = DeepseekVLHFImageProcessor(
        image_size=_side(getattr(native_ip, f"{prefix}size")), min_size=native_ip.min_size,
        image_mean=getattr(native_ip, f"{prefix}image_mean"), image_std=getattr(native_ip, f"{prefix}image_std"),
        rescale_factor=native_ip.rescale_factor, do_normalize=False,
        background_color=getattr(native_ip, f"{prefix}background_color"),
        resample_backend="pil", alpha_mode="drop",  # the official preprocessing the native port reproduces
    )
    processor = DeepseekVLHFProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens,
        image_token=native_processor.image_token,
    )
    return config, processor, native


def convert_native(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> ConversionResult:
    """Convert a native checkpoint folder into our format (the chat template becomes ours, which renders the
    same prompts as the native one for conversations without a system message)."""
    config, processor, native = read_native(source)
    hybrid = config.is_hybrid
    names = {spec.name for spec in CheckpointReader(source).specs()}
    tied = "lm_head.weight" not in names and bool(native.tie_word_embeddings)
    result = convert_folder(
        source, output,
        mapper=KeyMapper(native_to_ours_rules(hybrid, tied_head=tied), ignored=NATIVE_IGNORED),
        reverse=KeyMapper(ours_to_native_rules(hybrid)),
        expected=expected_state(meta_model(DeepseekVLHFForCausalLM, config)),
        save_metadata=lambda folder, main_dtype: save_our_metadata(folder, config, processor, main_dtype),
        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, finalize=finalize,
    )
    if tied:
        result.notes.append("the native checkpoint ties the LM head to the embeddings: both got the embedding matrix")
    if result.ignored:
        result.notes.append(f"dropped the native SigLIP's unused MAP head ({len(result.ignored)} tensors)")
    return result


def _hub_layout(expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Native state-dict names as the Hub checkpoints spell them (transformers 5 drops one `vision_model.`)."""
    return {re.sub(r"^model\.vision_model\.(?!vision_model\.)", NATIVE_SIGLIP_OUT, k): v for k, v in expected.items()}


def native_tokenizer(folder: Path, image_token: str):
    """Our tokenizer as the native processor needs it: `image_token` attribute, a pad token, BOS added."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, extra_special_tokens={"image_token": image_token})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = tokenizer("a")["input_ids"]
    if not probe or probe[0] != tokenizer.bos_token_id:
        tokenizer.add_bos_token = True
        _require(tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id,
                 "could not make the tokenizer add BOS, which the native processor relies on")
    return tokenizer


def export_native(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> ConversionResult:
    """Export one of our folders to the native layout (weights streamed; see `convert_folder`)."""
    source = Path(source)
    config = DeepseekVLHFConfig.from_pretrained(source)
    settings, _ = DeepseekVLHFProcessor.get_processor_dict(source)  # read without running the folder's code
    ours = DeepseekVLHFImageProcessor.from_pretrained(source)
    native = ours_to_native_config(config)
    image_processor = native_image_processor(config, ours)
    tokenizer = native_tokenizer(source, settings.get("image_token", IMAGE_TOKEN))
    processor_cls = DeepseekVLHybridProcessor if config.is_hybrid else DeepseekVLProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=settings.get("chat_template") or CHAT_TEMPLATE,
                              num_image_tokens=config.num_image_tokens)
    model_cls = NATIVE_MODELS[native.model_type]

    def save_metadata(folder: Path, main_dtype: torch.dtype) -> None:
        native.dtype = main_dtype
        native.architectures = [model_cls.__name__]
        native.save_pretrained(folder)
        generation_config(tokenizer).save_pretrained(folder)
        processor.save_pretrained(folder)

    result = convert_folder(
        source, output,
        mapper=KeyMapper(ours_to_native_rules(config.is_hybrid)),
        reverse=KeyMapper(native_to_ours_rules(config.is_hybrid)),
        expected=_hub_layout(expected_state(meta_model(model_cls, native))),
        save_metadata=save_metadata, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
    )
    background = ours.fill_color
    native_background = getattr(image_processor, "high_res_background_color", image_processor.background_color)
    if tuple(native_background) != tuple(background):
        result.notes.append(f"the native image processor pads with {tuple(native_background)} (from its mean), this "
                            f"model's processor with {tuple(background)}")
    return result


def native_model_class(folder: str | os.PathLike) -> Any:
    """The native model class for a native checkpoint folder."""
    return NATIVE_MODELS[AutoConfig.from_pretrained(folder).model_type]
