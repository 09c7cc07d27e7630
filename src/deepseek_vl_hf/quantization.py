"""Quantized inference: the language model's linear layers in int8/int4 (torchao, CPU) or NF4/int8 (bitsandbytes, CUDA).

Weights are quantized while `from_pretrained` loads them (transformers' `TorchAoConfig` / `BitsAndBytesConfig`),
so the full-precision model never sits in memory whole. The model class leaves the vision towers, the adapter and
the LM head in the compute dtype (`DeepseekVLHFPreTrainedModel._quantization_skip_modules`), with or without
this package: the same configs work on a folder loaded with `trust_remote_code=True` alone.

- `int8`: torchao's weight-only int8, one scale per output row. Folders saved quantized reload as they are. On
  CPU, `load_quantized` routes these layers through one compiled `F.linear` (`compile_int8_linears`): eager,
  torchao converts each int8 matrix to the activation dtype on every call (slower than bf16); compiled, Inductor
  lowers the layer to ATen's fused int8 weight-only matmul, which reads one byte per weight.
- `int4`: torchao's CPU int4 (groups of 128 input features, asymmetric, packed for ATen's CPU int4 matmul).
  Its packed layout has no safetensors form: save the unquantized folder and quantize again when loading.
- `bnb-nf4`, `bnb-int8`: bitsandbytes 4-bit NF4 (bf16 compute) and LLM.int8(); they need a CUDA GPU.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
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
    model_dir: str | os.PathLike, kind: str, device: str = "cpu", dtype: Any = "auto", compile_int8: bool = True,
    **from_pretrained_kwargs: Any,
):
    """Load a folder with the Auto classes + trust_remote_code, quantizing the LLM's linear layers to `kind`;
    int8 on CPU runs compiled unless `compile_int8=False` (see `compile_int8_linears`). `from_pretrained_kwargs`
    go to `from_pretrained` (e.g. `disable_mmap=True`)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = quantization_config(kind, device)
    placement = {"device_map": {"": device}} if kind.startswith("bnb-") else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=dtype, quantization_config=config, **placement,
        **from_pretrained_kwargs,
    )
    if not placement:
        model = model.to(device)
    if kind == "int8" and compile_int8 and torch.device(device).type == "cpu":
        compile_int8_linears(model)
    return model.eval()


@functools.cache
def _compiled_linear():
    import torch

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    # Inductor's on-disk graph cache cannot key graphs on torchao's tensor subclass (it logs a traceback per
    # graph and compiles anyway): leave it off for this function.
    return torch.compile(linear, options={"fx_graph_cache": False})


def _int8_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _compiled_linear()(x, self.weight, self.bias)


def compile_int8_linears(model: torch.nn.Module) -> int:
    """Run every linear layer holding torchao int8 weights through one `torch.compile`d `F.linear`.

    On CPU this turns torchao's eager int8 path (convert the whole int8 matrix, then a bf16 matmul) into ATen's
    fused int8 weight-only matmul: decode and prefill then run faster than bf16 (BENCHMARKS.md). The graphs
    (one per weight shape, the token count dynamic) are compiled on the first calls, a few seconds each; outputs
    differ from the eager int8 path by bf16 rounding only. Needs a C++ compiler (Inductor's CPU backend).
    Returns the number of layers routed.
    """
    import torch

    routed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Int8Tensor":
            module.forward = types.MethodType(_int8_forward, module)
            routed += 1
    return routed


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
