"""Helpers for the conversion tests: random weights everywhere, official-layout and native folders built locally."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from deepseek_vl_hf.conversion.keymaps import KeyMapper, ours_to_official_rules
from deepseek_vl_hf.conversion.native import native_tokenizer as load_native_tokenizer
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig
from safetensors.torch import save_file
from torch import nn

from deepseek_vl_hf.presets import PRESETS
from deepseek_vl_hf.tokenizer import IMAGE_TOKEN, build_tokenizer


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (norm weights near 1, the rest small), so that no tensor is zero or
    constant and a mapping mistake (swapped, transposed or dropped tensor) changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    norms = {
        id(m.weight) for m in model.modules()
        if (isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__) and getattr(m, "weight", None) is not None
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in norms:
                param.normal_(1.0, 0.1, generator=generator)
            elif "alpha" in name or "rel_pos" in name:
                param.normal_(0.0, 0.5, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def tiny_official_overrides(preset: str) -> dict:
    """Dotted overrides that give the tiny preset's tower shapes (official configs only name released towers)."""
    skip = {"image_size", "image_mean", "image_std"}
    overrides = {}
    for branch in ("sam_config", "siglip_config"):
        for key, value in (PRESETS[preset][branch] or {}).items():
            if key not in skip:
                overrides[f"{branch}.{key}"] = value
    return overrides


def official_config(config: DeepseekVLHFConfig) -> dict:
    """Our config -> an official `config.json` (multi_modality, `{cls, model_type, params}` blocks)."""
    siglip = config.siglip_config
    low = {"ckpt_path": "", "image_size": siglip.image_size, "model_name": "siglip_large_patch16_384",
           "output_dim": siglip.hidden_size, "pixel_mean": siglip.image_mean, "pixel_std": siglip.image_std,
           "select_feature": "same", "select_layer": siglip.select_layer}
    text = config.text_config
    language = {"hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
                "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
                "num_key_value_heads": text.num_key_value_heads, "max_position_embeddings": text.max_position_embeddings,
                "vocab_size": text.vocab_size, "model_type": "llama", "torch_dtype": "bfloat16"}
    aligner = {"depth": config.aligner_depth, "input_dim": siglip.hidden_size, "n_embed": text.hidden_size}
    if config.is_hybrid:
        sam = config.sam_config
        high = {"ckpt_path": "", "image_size": sam.image_size, "model_name": "sam_b_downsample",
                "output_dim": sam.output_channels, "pixel_mean": sam.image_mean, "pixel_std": sam.image_std,
                "select_feature": "same", "select_layer": -1}
        vision = {"cls": "HybridVisionTower", "model_type": "vision",
                  "params": {"concat_type": "tuple", "freeze_high": True, "freeze_low": True,
                             "high_res_cfg": high, "low_res_cfg": low}}
        aligner["projector_type"] = "low_high_hybrid_split_mlp_gelu"
    else:
        vision = {"cls": "CLIPVisionTower", "model_type": "vision", "params": low}
        aligner["projector_type"] = "mlp_gelu"
    return {"architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality", "torch_dtype": "bfloat16",
            "transformers_version": "4.38.2", "vision_config": vision,
            "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": aligner},
            "language_config": language}


def official_extras(config: DeepseekVLHFConfig) -> dict[str, torch.Tensor]:
    """The unused tensors of the released checkpoints (SigLIP MAP head, hybrid high/low LayerNorms), right shapes."""
    width, mlp = config.siglip_config.hidden_size, config.siglip_config.intermediate_size
    prefix = "vision_model.vision_tower_low.vision_tower." if config.is_hybrid else "vision_model.vision_tower."
    shapes = {"attn_pool.latent": (1, 1, width), "attn_pool.q.weight": (width, width), "attn_pool.q.bias": (width,),
              "attn_pool.kv.weight": (2 * width, width), "attn_pool.kv.bias": (2 * width,),
              "attn_pool.proj.weight": (width, width), "attn_pool.proj.bias": (width,),
              "attn_pool.norm.weight": (width,), "attn_pool.norm.bias": (width,),
              "attn_pool.mlp.fc1.weight": (mlp, width), "attn_pool.mlp.fc1.bias": (mlp,),
              "attn_pool.mlp.fc2.weight": (width, mlp), "attn_pool.mlp.fc2.bias": (width,)}
    extras = {prefix + name: torch.randn(shape) for name, shape in shapes.items()}
    if config.is_hybrid:
        for branch, dim in (("high", config.sam_config.output_channels), ("low", width)):
            extras[f"vision_model.{branch}_layer_norm.weight"] = torch.ones(dim)
            extras[f"vision_model.{branch}_layer_norm.bias"] = torch.zeros(dim)
    return extras


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model's tensors under the official names (reverse key table) plus the ignorable official extras."""
    mapper = KeyMapper(ours_to_official_rules(model.config.is_hybrid))
    state = {name: tensor.clone() for name, tensor in mapper.stream(model.state_dict().items())}
    return {**state, **official_extras(model.config)}


def write_official_folder(model: nn.Module, processor, folder: Path, dtype: torch.dtype = torch.float32,
                          shards: int = 2, bin_format: bool = False, tokenizer=None) -> Path:
    """An official-style checkpoint folder: config.json, processor/preprocessor configs, tokenizer, weights
    (`shards` safetensors files with an index, or one pytorch_model.bin)."""
    folder.mkdir(parents=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(official_config(config), indent=2))
    ip = processor.image_processor
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "background_color": list(ip.fill_color), "do_normalize": False, "image_mean": list(ip.image_mean),
        "image_processor_type": "VLMImageProcessor", "image_size": ip.image_size, "image_std": list(ip.image_std),
        "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 1 / 255}))
    (folder / "processor_config.json").write_text(json.dumps({
        "add_special_token": False, "ignore_id": -100, "image_tag": IMAGE_TOKEN, "mask_prompt": True,
        "num_image_tokens": config.num_image_tokens, "processor_class": "VLChatProcessor", "sft_format": "deepseek"}))
    (tokenizer or processor.tokenizer).save_pretrained(folder)
    state = {k: v.to(dtype) for k, v in official_state_dict(model).items()}
    if bin_format:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def native_tokenizer(folder: Path):
    """Our test tokenizer the way transformers' native DeepSeek-VL processor needs it (`image_token` attribute,
    EOS as pad, BOS added by the tokenizer itself as DeepSeek-LLM's does), via a save/load through `folder`."""
    build_tokenizer().save_pretrained(folder)
    return load_native_tokenizer(folder, IMAGE_TOKEN)
