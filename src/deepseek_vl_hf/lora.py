"""LoRA / QLoRA fine-tuning with PEFT: the recipe's `peft` section, target-module presets, adapter saving
with a model card, and merging an adapter into a full checkpoint.

The presets are regexes over full module names (PEFT matches a string `target_modules` with `re.fullmatch`),
so e.g. the LLM's `self_attn.o_proj` is targeted but never the vision towers' `attn.proj`. Everything here
works on a model loaded from a Hub folder with `trust_remote_code` (only module names are used), and the
saved adapter loads with plain `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from deepseek_vl_hf.atomic import atomic_directory

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

_LLM_ATTENTION = r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
_LLM_MLP = r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj"
_SAM = r"model\.vision_model\.sam\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
# Stands for the aligner's Linear layers, read from the model (the GELUs between them are not targets).
_ADAPTER = "adapter"
ADAPTER_MODULE = "aligner"

PRESETS: dict[str, tuple[str, ...]] = {
    "llm-attention": (_LLM_ATTENTION,),
    "llm-attention-mlp": (_LLM_ATTENTION, _LLM_MLP),
    "llm+adapter": (_LLM_ATTENTION, _LLM_MLP, _ADAPTER),
    "llm+adapter+sam": (_LLM_ATTENTION, _LLM_MLP, _ADAPTER, _SAM),
}

# Kept in full precision under QLoRA: the vision towers, the adapter and the LM head.
QLORA_SKIP_MODULES = ["lm_head", "model.vision_model", "model.aligner"]
# Non-reentrant checkpointing passes gradients to LoRA weights even when a layer's input comes from frozen
# layers (reentrant checkpointing needs an input that requires grad); pass it to TrainingArguments too.
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}

_SPEED_METRICS = ("_runtime", "_per_second", "total_flos")  # Trainer metrics the card leaves out
_CARD_TEMPLATE = Path(str(importlib.resources.files("deepseek_vl_hf.model_cards") / "adapter.template.md"))


class QLoRAUnavailableError(RuntimeError):
    """QLoRA was asked for where it cannot run; the message names what is missing."""


@dataclass
class PeftSettings:
    """The recipe's `peft:` section: LoRA on a frozen base (4-bit with `qlora`), by `preset` or
    `target_modules`.

    `target_modules` goes to PEFT as is (a regex string is matched against full module names, a list by name
    suffix); `train_adapter_fully` trains and saves the whole adapter (`modules_to_save`) instead of LoRA.
    """

    enabled: bool = False
    preset: str | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    train_adapter_fully: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    qlora: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"peft.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.preset is not None and self.target_modules is not None:
            raise ValueError("peft: set either preset or target_modules, not both")
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"peft.r must be >= 1 and peft.alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | PeftSettings) -> PeftSettings:
        """Settings from a recipe mapping (unknown keys are errors, so a typo fails early) or as given."""
        if isinstance(values, cls):
            return values
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in peft; known: {sorted(names)}")
        return cls(**values)

    @property
    def all_modules_to_save(self) -> list[str]:
        """`modules_to_save` plus the adapter when it is trained fully."""
        fully = self.train_adapter_fully and ADAPTER_MODULE not in self.modules_to_save
        return [*self.modules_to_save, *([ADAPTER_MODULE] if fully else [])]


def _adapter_pattern(model: nn.Module) -> str:
    """Regex for the aligner's Linear layers (`high_up_proj`, `low_up_proj`, the Linear items of `layers`)."""
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith(f"model.{ADAPTER_MODULE}.") and isinstance(module, nn.Linear)
    ]
    if not names:
        raise ValueError(
            f"the model has no Linear layers under model.{ADAPTER_MODULE}; is it a DeepSeek-VL model?"
        )
    return "|".join(re.escape(name) for name in names)


def target_modules_for(model: nn.Module, settings: PeftSettings | Mapping[str, Any]) -> list[str] | str:
    """What PEFT's `target_modules` gets: the preset's regex (adapter layers dropped when trained fully),
    or the recipe's own `target_modules`."""
    settings = PeftSettings.from_mapping(settings)
    if settings.target_modules is not None:
        return settings.target_modules
    if settings.preset is None:
        raise ValueError(f"peft: set a preset (one of {sorted(PRESETS)}) or target_modules")
    parts = [p for p in PRESETS[settings.preset] if not (p == _ADAPTER and settings.train_adapter_fully)]
    return "|".join(f"({_adapter_pattern(model) if p == _ADAPTER else p})" for p in parts)


def lora_config(model: nn.Module, settings: PeftSettings | Mapping[str, Any]) -> LoraConfig:
    """The `peft.LoraConfig` for `settings`, for plain `peft.get_peft_model(model, lora_config(...))`."""
    from peft import LoraConfig

    settings = PeftSettings.from_mapping(settings)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules_for(model, settings),
        modules_to_save=settings.all_modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def require_qlora() -> None:
    """Raise `QLoRAUnavailableError` naming what QLoRA lacks here: bitsandbytes and/or a CUDA GPU."""
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if missing:
        raise QLoRAUnavailableError(
            "QLoRA (peft.qlora: true) needs "
            + " and ".join(missing)
            + "; set peft.qlora: false to train LoRA on a full-precision base instead"
        )


def base_loading_kwargs(settings: PeftSettings | Mapping[str, Any]) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for the base: under QLoRA a 4-bit NF4 LLM on the current GPU, else none.

    The vision towers, the adapter and the LM head stay in bf16 (`QLORA_SKIP_MODULES`).
    """
    if not PeftSettings.from_mapping(settings).qlora:
        return {}
    from transformers import BitsAndBytesConfig

    require_qlora()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=QLORA_SKIP_MODULES,
    )
    return {
        "quantization_config": quantization,
        "device_map": {"": torch.cuda.current_device()},
        "dtype": torch.bfloat16,
    }


def apply_lora(model: nn.Module, settings: PeftSettings | Mapping[str, Any]) -> PeftModel:
    """Wrap `model` in a PEFT LoRA model per `settings`: only LoRA weights (and `modules_to_save`) train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    settings = PeftSettings.from_mapping(settings)
    if settings.qlora:
        require_qlora()
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError(
                "peft.qlora needs a 4-bit base: load it with "
                "from_pretrained(path, **base_loading_kwargs(settings))"
            )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(model, settings))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the LLM layers and the vision blocks of a (PEFT) model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # the newer name of the same transformers API
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)


def adapter_folder_card(
    folder: str | os.PathLike, base_model: str | None = None, metadata: Mapping[str, Any] | None = None
) -> str:
    """The adapter card of a saved adapter folder (`deepseek-vl-hf card` on a LoRA run's output), from its
    adapter_config.json and training metadata; no weights are loaded."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(folder))
    metadata = metadata or {}
    return adapter_card(
        config, base_model or config.base_model_name_or_path or "unknown", metadata.get("recipe"),
        metadata.get("final_metrics"),
    )


def adapter_card(
    model_or_config: PeftModel | Any,
    base_model: str,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> str:
    """The adapter folder's README.md: base model, data, LoRA settings, recipe, metrics and how to use it.
    Takes the PEFT model, or its LoRA config (then the base counts as not quantized)."""
    model = model_or_config if hasattr(model_or_config, "peft_config") else None
    config = model.peft_config[model.active_adapter] if model is not None else model_or_config
    recipe = dict(recipe or {})
    sources = (recipe.get("data") or {}).get("sources") or []
    data = (
        "\n".join(
            f"- `{s.get('name', s.get('path'))}`: {s.get('kind')} from `{s.get('path')}`" for s in sources
        )
        or "- not recorded"
    )
    targets = (
        config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    )
    lora = (
        f"r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}; target_modules: "
        f"`{targets}`; modules_to_save: `{sorted(config.modules_to_save or [])}`"
    )
    quantized = (model is not None and getattr(model.get_base_model(), "is_loaded_in_4bit", False)) or bool(
        (recipe.get("peft") or {}).get("qlora")
    )
    return Template(_CARD_TEMPLATE.read_text(encoding="utf-8")).substitute(
        base_model=base_model,
        title=recipe.get("name", "LoRA adapter"),
        data=data,
        lora=lora,
        quantized="yes (QLoRA, 4-bit NF4)" if quantized else "no",
        metrics="\n".join(
            f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in (metrics or {}).items()
            if not k.endswith(_SPEED_METRICS)
        )
        or "- not recorded",
        recipe=yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "# not recorded",
    )


def save_adapter(
    model: PeftModel,
    output: str | os.PathLike,
    base_model: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    overwrite: bool = False,
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write the adapter (safetensors + adapter_config.json) and its README.md atomically into `output`.

    `base_model` defaults to the path PEFT recorded; `extra(tmp)` may add files (e.g. training metadata)
    before the folder is renamed into place.
    """
    config = model.peft_config[model.active_adapter]
    base_model = base_model or config.base_model_name_or_path or "unknown"
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(adapter_card(model, base_model, recipe, metrics), encoding="utf-8")
        if extra is not None:
            extra(tmp)
    return Path(output)


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base and write a full checkpoint folder (weights, processor, remote code).

    The merge runs in float32; the result is saved in the base's dtype (`dtype="auto"`) or the one named.
    """
    from peft import PeftModel

    from deepseek_vl_hf.checkpoint import save_checkpoint
    from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
    from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor

    model = DeepseekVLHFForCausalLM.from_pretrained(base, dtype="auto")
    target_dtype = model.dtype if dtype == "auto" else getattr(torch, dtype)
    merged = PeftModel.from_pretrained(model.float(), adapter).merge_and_unload()
    processor = DeepseekVLHFProcessor.from_pretrained(base, trust_remote_code=True)
    return save_checkpoint(merged.to(target_dtype).eval(), processor, output, overwrite=overwrite)
