"""Official DeepSeek-VL checkpoints (`model_type: multi_modality`) -> our format: config, processor, weights.

The official `config.json` names its vision towers (`model_name` in the `{cls, model_type, params}` blocks) instead
of spelling out their shapes; the names the releases use map to the shapes below, anything else needs
`overrides`. `language_config` is read the official way: keys it leaves out take `LlamaConfig`'s defaults
(the released files list only a few keys). BOS/EOS come from the tokenizer, as the official code passes them.
Export back to the official layout is not offered: its unused tensors (`attn_pool.*`, `high/low_layer_norm`)
are dropped on import and cannot be recreated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import (
    DeepseekVLHFImageProcessor,
    default_background_color,
)
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor
from transformers import AutoTokenizer

from deepseek_vl_hf.presets import PRESETS, set_dotted

from .folders import ConversionResult, convert_folder, meta_model, save_our_metadata
from .keymaps import OFFICIAL_IGNORED, KeyMapper, official_to_ours_rules, ours_to_official_rules
from .weights import ConversionError, expected_state

# Tower names of the official code (`create_siglip_vit` / `create_sam_vit`) used by the releases -> our shapes.
OFFICIAL_TOWERS: dict[str, dict[str, Any]] = {
    "siglip_large_patch16_384": PRESETS["7b"]["siglip_config"],
    "sam_b_downsample": PRESETS["7b"]["sam_config"],
}
OFFICIAL_ALIGNERS = {"low_high_hybrid_split_mlp_gelu": "hybrid_split_mlp", "mlp_gelu": "mlp"}
# `CLIPVisionTower`'s defaults for tower params a config leaves out; `MlpProjector`'s default depth.
_TOWER_DEFAULTS = {"image_size": 336, "select_layer": -2, "select_feature": "patch"}
_ALIGNER_DEFAULT_DEPTH = 1
# Bookkeeping keys of a serialised LlamaConfig that are not model settings.
_NOT_LLAMA_SETTINGS = ("model_type", "torch_dtype", "dtype", "transformers_version", "architectures", "_name_or_path")


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise ConversionError(f"{folder} has no {name}; is it an official DeepSeek-VL checkpoint folder?")
    return json.loads(path.read_text())


def _tower(params: dict[str, Any], kind: str) -> dict[str, Any]:
    """One `CLIPVisionTower` params block -> our branch config dict (`kind` is "sam" or "siglip")."""
    name = params.get("model_name")
    if name not in OFFICIAL_TOWERS or not name.startswith(kind):
        known = [n for n in OFFICIAL_TOWERS if n.startswith(kind)]
        raise ConversionError(
            f"unsupported {kind} tower model_name {name!r}; known: {known}. For other shapes pass overrides "
            f"(--set {kind}_config.hidden_size=... etc.)"
        )
    # The official SigLIP tower forces select_feature "same"; on SAM's [b, 1024, 24, 24] output "patch" drops
    # feature channel 0 and the aligner's 1024-wide projection then fails; "same" and "cls_patch" keep everything.
    select_feature = params.get("select_feature", _TOWER_DEFAULTS["select_feature"])
    if kind == "sam" and select_feature not in ("same", "cls_patch"):
        raise ConversionError(
            f"the SAM tower has select_feature {select_feature!r} (the official default when the key is missing is "
            "'patch'): the official code then drops the first of SAM's 1024 feature channels and fails in the "
            "aligner; only 'same' (what the released checkpoints use) or 'cls_patch' (the same features) can run. "
            "Set select_feature to 'same' in config.json"
        )
    tree = dict(OFFICIAL_TOWERS[name])
    tree["image_size"] = params.get("image_size", _TOWER_DEFAULTS["image_size"])
    if kind == "siglip":
        tree["select_layer"] = params.get("select_layer", _TOWER_DEFAULTS["select_layer"])
    mean, std = params.get("pixel_mean"), params.get("pixel_std")
    if mean is None or std is None:  # the official tower then does not normalise: identity mean/std
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    tree["image_mean"], tree["image_std"] = list(mean), list(std)
    return tree


def official_config_tree(raw: dict[str, Any]) -> dict[str, Any]:
    """An official `config.json` (dict) -> keyword arguments of `DeepseekVLHFConfig` (nested plain dicts)."""
    if raw.get("model_type") != "multi_modality":
        raise ConversionError(
            f"config.json has model_type {raw.get('model_type')!r}, not 'multi_modality': not an official "
            "DeepSeek-VL checkpoint (for transformers' native one use --from native)"
        )
    vision = raw.get("vision_config", {})
    cls, params = vision.get("cls", ""), vision.get("params", {})
    if "HybridVisionTower" in cls:
        concat = params.get("concat_type", "tuple")
        if concat != "tuple":
            raise ConversionError(
                f"HybridVisionTower concat_type {concat!r} is not supported; the released checkpoints (and this "
                "model) use 'tuple' (SAM and SigLIP features projected separately, then joined by the aligner)"
            )
        sam, siglip = _tower(params["high_res_cfg"], "sam"), _tower(params["low_res_cfg"], "siglip")
    elif "CLIPVisionTower" in cls:
        sam, siglip = None, _tower(params, "siglip")
    else:
        raise ConversionError(f"unsupported vision_config cls {cls!r}; expected HybridVisionTower or CLIPVisionTower")
    aligner = raw.get("aligner_config", {}).get("params", {})
    projector = aligner.get("projector_type")
    if projector not in OFFICIAL_ALIGNERS:
        raise ConversionError(f"unsupported aligner projector_type {projector!r}; known: {list(OFFICIAL_ALIGNERS)}")
    language = {k: v for k, v in raw.get("language_config", {}).items() if k not in _NOT_LLAMA_SETTINGS}
    return {
        "sam_config": sam,
        "siglip_config": siglip,
        "text_config": language,
        "aligner_type": OFFICIAL_ALIGNERS[projector],
        "aligner_depth": aligner.get("depth", _ALIGNER_DEFAULT_DEPTH),
    }


def _config(raw: dict[str, Any], overrides: dict[str, Any] | None) -> DeepseekVLHFConfig:
    tree = official_config_tree(raw)
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    config = DeepseekVLHFConfig(**tree)
    aligner = raw["aligner_config"].get("params", {})
    input_dim = aligner.get("input_dim")
    if input_dim is not None and input_dim != config.siglip_config.hidden_size:
        raise ConversionError(
            f"aligner input_dim {input_dim} differs from the vision towers' feature width "
            f"{config.siglip_config.hidden_size}"
        )
    n_embed = aligner.get("n_embed")
    if n_embed is not None and n_embed != config.text_config.hidden_size:
        raise ConversionError(
            f"aligner n_embed {n_embed} differs from the language model's hidden_size {config.text_config.hidden_size}"
        )
    return config


def _image_processor(raw: dict[str, Any], config: DeepseekVLHFConfig) -> DeepseekVLHFImageProcessor:
    """`preprocessor_config.json` of `VLMImageProcessor` -> ours, reproducing it exactly: PIL's bicubic resize and
    alpha dropped as the official loader's `convert("RGB")` (written out, so that the folder says so)."""
    if raw.get("image_size") != config.image_size:
        raise ConversionError(
            f"preprocessor_config.json has image_size {raw.get('image_size')}, the model takes {config.image_size}"
        )
    mean, std = raw.get("image_mean"), raw.get("image_std")
    background = raw.get("background_color")
    if background is None:
        background = default_background_color(mean) if mean is not None else (127, 127, 127)
    return DeepseekVLHFImageProcessor(
        image_size=raw["image_size"],
        min_size=raw.get("min_size", 14),
        image_mean=mean if mean is not None else (0.0, 0.0, 0.0),
        image_std=std if std is not None else (1.0, 1.0, 1.0),
        rescale_factor=raw.get("rescale_factor", 1 / 255),
        do_normalize=raw.get("do_normalize", True),
        background_color=background,
        resample_backend="pil",
        alpha_mode="drop",
    )


def read_official(
    folder: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> tuple[DeepseekVLHFConfig, DeepseekVLHFProcessor]:
    """Our config and processor for an official checkpoint folder (tokenizer, special tokens, preprocessing)."""
    folder = Path(folder)
    config = _config(_read_json(folder, "config.json"), overrides)
    processor_raw = _read_json(folder, "processor_config.json")
    if processor_raw.get("sft_format", "deepseek") != "deepseek":
        raise ConversionError(f"unsupported sft_format {processor_raw['sft_format']!r}; only 'deepseek' is known")
    if processor_raw.get("add_special_token", False):
        raise ConversionError(
            "processor_config.json has add_special_token true: the official processor then keeps the image tag next to "
            "its 576 image tokens and its masks no longer match (it cannot run such a model either); set it to false"
        )
    if processor_raw.get("num_image_tokens", config.num_image_tokens) != config.num_image_tokens:
        raise ConversionError(
            f"processor_config.json has num_image_tokens {processor_raw['num_image_tokens']}, the vision tower "
            f"gives {config.num_image_tokens}"
        )
    image_tag = processor_raw.get("image_tag", "<image_placeholder>")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if image_tag not in tokenizer.get_vocab():  # the official processor adds it the same way
        tokenizer.add_special_tokens({"additional_special_tokens": [image_tag]})
    config.image_token_id = tokenizer.convert_tokens_to_ids(image_tag)
    if config.image_token_id >= config.text_config.vocab_size:
        raise ConversionError(
            f"the image token {image_tag!r} has id {config.image_token_id}, outside the embedding matrix "
            f"({config.text_config.vocab_size} rows)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for cfg in (config, config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, pad
    image_processor = _image_processor(_read_json(folder, "preprocessor_config.json"), config)
    processor = DeepseekVLHFProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.num_image_tokens,
        image_token=image_tag,
    )
    return config, processor


def convert_official(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> ConversionResult:
    """Convert an official checkpoint folder into our format (weights streamed; see `convert_folder`)."""
    config, processor = read_official(source, overrides)
    hybrid = config.is_hybrid
    result = convert_folder(
        source, output,
        mapper=KeyMapper(official_to_ours_rules(hybrid), ignored=OFFICIAL_IGNORED),
        reverse=KeyMapper(ours_to_official_rules(hybrid)),
        expected=expected_state(meta_model(DeepseekVLHFForCausalLM, config)),
        save_metadata=lambda folder, main_dtype: save_our_metadata(folder, config, processor, main_dtype),
        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, finalize=finalize,
    )
    if result.ignored:
        result.notes.append(
            f"dropped {len(result.ignored)} tensor(s) the official forward never uses (SigLIP attn_pool.*, "
            "high/low_layer_norm)"
        )
    return result
