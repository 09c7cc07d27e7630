"""Quantized inference: the language model's linear layers in int8/int4 (torchao, CPU) or NF4/int8 (bitsandbytes, CUDA).

Weights are quantized while `from_pretrained` loads them (transformers' `TorchAoConfig` / `BitsAndBytesConfig`),
so the full-precision model never sits in memory whole. The model class leaves the vision towers, the adapter and
the LM head in the compute dtype (`DeepseekVLHFPreTrainedModel._quantization_skip_modules`), with or without
this package: the same configs work on a folder loaded with `trust_remote_code=True` alone.

- `int8`: torchao's weight-only int8, one scale per output row. Folders saved quantized reload as they are.
- `int4`: torchao's CPU int4 (groups of 128 input features, asymmetric, packed for ATen's CPU int4 matmul).
  Its packed layout has no safetensors form: save the unquantized folder and quantize again when loading.
- `bnb-nf4`, `bnb-int8`: bitsandbytes 4-bit NF4 (bf16 compute) and LLM.int8(); they need a CUDA GPU.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch loads inside the functions: the CLI reads QUANTIZE_CHOICES while building its parser.
QUANTIZE_CHOICES = ("int8", "int4", "bnb-nf4", "bnb-int8")
INT4_GROUP_SIZE = 128
QUANT_EXTRA = 'pip install "deepseek-vl-hf[quant]"'
QUANT_GPU_EXTRA = 'pip install "deepseek-vl-hf[quant-gpu]"'
# Tensor types whose safetensors form torchao defines (transformers saves and reloads them).
_SAVEABLE = ("Int8Tensor",)


def _require(module: str, kind: str, hint: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"--quantize {kind} needs the {module} package: {hint}") from exc


def quantization_config(kind: str, device: str = "cpu", group_size: int = INT4_GROUP_SIZE) -> Any:
    """The transformers quantization config of `kind` (one of `QUANTIZE_CHOICES`) for loading on `device`.

    Raises ImportError naming the extra when the library is missing, and RuntimeError for a kind the device
    cannot run (bitsandbytes without CUDA, torchao's CPU int4 on a GPU).
    """
    import torch

    if kind in ("int8", "int4"):
        _require("torchao", kind, QUANT_EXTRA)
        from transformers import TorchAoConfig

        if kind == "int8":
            from torchao.quantization import Int8WeightOnlyConfig

            return TorchAoConfig(Int8WeightOnlyConfig())
        if torch.device(device).type != "cpu":
            raise RuntimeError(
                "--quantize int4 packs weights for the CPU int4 kernel; on a CUDA GPU use --quantize bnb-nf4"
            )
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return TorchAoConfig(PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False))
    if kind in ("bnb-nf4", "bnb-int8"):
        if not torch.cuda.is_available() or torch.device(device).type != "cuda":
            raise RuntimeError(
                f"--quantize {kind} (bitsandbytes) needs a CUDA GPU and --device cuda; "
                "on CPU use --quantize int8 or int4 (torchao)"
            )
        _require("bitsandbytes", kind, QUANT_GPU_EXTRA)
        from transformers import BitsAndBytesConfig

        if kind == "bnb-int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")


def load_quantized(
    model_dir: str | os.PathLike, kind: str, device: str = "cpu", dtype: Any = "auto", **from_pretrained_kwargs: Any
):
    """Load a folder with the Auto classes + trust_remote_code, quantizing the LLM's linear layers to `kind`;
    `from_pretrained_kwargs` go to `from_pretrained` (e.g. `disable_mmap=True`)."""
    from transformers import AutoModelForCausalLM

    config = quantization_config(kind, device)
    placement = {"device_map": {"": device}} if kind.startswith("bnb-") else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=dtype, quantization_config=config, **placement,
        **from_pretrained_kwargs,
    )
    if not placement:
        model = model.to(device)
    return model.eval()


def quantized_layers(model: torch.nn.Module) -> dict[str, str]:
    """Module name -> weight type of every linear layer whose weight is no longer a plain tensor."""
    import torch

    return {
        name: type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight) not in (torch.Tensor, torch.nn.Parameter)
    }


def save_quantized(model: torch.nn.Module, processor: Any, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized model (and processor) as a folder that `from_pretrained` reloads quantized.

    Raises ValueError, before writing anything, for layouts without a safetensors form (int4 on CPU, bitsandbytes).
    """
    from deepseek_vl_hf.checkpoint import save_checkpoint

    unsaveable = sorted({kind for kind in quantized_layers(model).values() if kind not in _SAVEABLE})
    if unsaveable:
        raise ValueError(
            f"cannot save weights of type {', '.join(unsaveable)}: that quantized layout has no safetensors form. "
            "Keep the unquantized folder and quantize when loading (--quantize, or from_pretrained(..., "
            "quantization_config=...)); --quantize int8 folders can be saved."
        )
    return save_checkpoint(model, processor, output, overwrite=overwrite)
