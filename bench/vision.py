"""Vision tower + adapter forward at the released 7B vision shape (SAM-B at 1024, SigLIP-L at 384, 576 tokens),
batch 1, fp32 and bf16, ours against the native model with the same weights (smoke mode: the tiny shape).

Ours takes the [0, 1] 1024 image and makes the normalised 1024 and 384 inputs inside (included in its time);
native takes both normalised tensors ready-made (its image processor makes them).
"""

from __future__ import annotations

import torch

from .fixtures import build_ours, decode, native_inputs, photo_jpeg, to_native
from .harness import Row, Target, interleaved, time_row

TITLE = "Vision towers + adapter forward, 7B vision shape, batch 1"
TARGETS = (Target("vision forward no slower than native (fp32 and bf16)", "", 1.0),)
FP32_TOLERANCE = 1e-5  # relative max abs difference of the adapter outputs, ours vs native, fp32
BF16_SLACK = 1.5  # ours' bf16 error vs fp32 may be at most this times native's


def run(mode: str) -> list[Row]:
    """Seconds per forward in fp32 and bf16, with the agreement of the adapter outputs in the notes."""
    ours, processor = build_ours("tiny" if mode == "smoke" else "7b-vision")
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
                    "ours": lambda x=ours_pixels: ours.get_image_features(x).pooler_output,
                    "native": lambda x=native_pixels: native.model.get_image_features(
                        x["pixel_values"], x["high_res_pixel_values"]
                    ).pooler_output,
                },
                repeats=3 if mode == "full" else 1,
                warmup=1,
            )
        ours_out, native_out = t["ours"].result.float(), t["native"].result.float()
        if reference is None:  # fp32: ours against native
            reference = native_out
            difference = _relative(ours_out, native_out)
            note = f"adapter outputs: max abs diff / max abs value {difference:.1e} (<= {FP32_TOLERANCE:g} wanted)"
            correct = difference <= FP32_TOLERANCE
        else:  # bf16: each side against the fp32 outputs
            errors = _relative(ours_out, reference), _relative(native_out, reference)
            note = (f"error vs fp32 outputs (max abs diff / max abs value): ours {errors[0]:.1e}, native "
                    f"{errors[1]:.1e} (ours <= {BF16_SLACK:g} x native wanted)")
            correct = errors[0] <= BF16_SLACK * errors[1]
        rows.append(time_row(str(dtype).removeprefix("torch."), t["ours"], t["native"], "s", 1.0, note=note,
                             correct=correct))
    return rows


def _relative(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).abs().max() / reference.abs().max()).item()
