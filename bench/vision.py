"""Vision tower + adapter forward at the released 7B vision shape (SAM-B at 1024, SigLIP-L at 384, 576 tokens),
batch 1, fp32 and bf16, ours against the native model with the same weights.

Ours takes the [0, 1] 1024 image and makes the normalised 1024 and 384 inputs inside (included in its time);
native takes both normalised tensors ready-made (its image processor makes them).
"""

from __future__ import annotations

import torch

from .fixtures import build_ours, decode, native_inputs, photo_jpeg, to_native
from .harness import Row, interleaved, time_row

TITLE = "Vision towers + adapter forward, 7B vision shape, batch 1"


def run(quick: bool) -> list[Row]:
    """Seconds per forward in fp32 and bf16, with the agreement of the adapter outputs in the notes."""
    ours, processor = build_ours("7b-vision")
    native = to_native(ours)
    pixels = processor.image_processor([decode(photo_jpeg(1920, 1080))])
    rows, reference = [], None
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        native.to(dtype)
        native_pixels = native_inputs(pixels, ours)
        ours_pixels = pixels["pixel_values"]
        with torch.inference_mode():
            t = interleaved(
                {
                    "ours": lambda x=ours_pixels: ours.get_image_features(x),
                    "native": lambda x=native_pixels: native.model.get_image_features(
                        x["pixel_values"], x["high_res_pixel_values"]
                    ).pooler_output,
                },
                repeats=1 if quick else 3,
                warmup=1,
            )
        ours_out, native_out = t["ours"].result.float(), t["native"].result.float()
        if reference is None:  # fp32: ours against native
            reference = native_out
            note = f"adapter outputs: max abs diff / max abs value {_relative(ours_out, native_out):.1e}"
        else:  # bf16: each side against the fp32 outputs
            note = (f"error vs fp32 outputs (max abs diff / max abs value): ours {_relative(ours_out, reference):.1e}, "
                    f"native {_relative(native_out, reference):.1e}")
        rows.append(time_row(str(dtype).removeprefix("torch."), t["ours"], t["native"], "s", 1.0, note=note))
    return rows


def _relative(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).abs().max() / reference.abs().max()).item()
