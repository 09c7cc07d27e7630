"""Checking a converted folder: run it on a built-in sample (a synthetic image and a prompt) and compare logits."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM, AutoProcessor, BatchFeature

from .native import native_model_class, native_pixel_inputs

SAMPLE_PROMPT = "Describe the image: which shapes and colours do you see?"
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synthetic_image(width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic photo-like test image: a colour gradient with a circle, a square and a triangle."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=-1)
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 10, height // 5, width // 3, height // 5 + width // 4), fill=(220, 30, 30))
    draw.rectangle((width // 2, height // 6, width // 2 + width // 5, height // 6 + width // 5), fill=(30, 60, 220))
    draw.polygon([(width * 2 // 3, height * 9 // 10), (width * 9 // 10, height * 9 // 10), (width * 4 // 5, height // 2)],
                 fill=(30, 200, 60))
    return image


def sample_inputs(processor) -> BatchFeature:
    """The built-in sample through `processor`: one user turn with the synthetic image, generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SAMPLE_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=prompt, images=[synthetic_image()], return_tensors="pt")


def load_ours(folder: str | os.PathLike, dtype: str = "auto"):
    """(model, processor) of one of our folders through the Auto classes with trust_remote_code."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=_DTYPES[dtype]).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@torch.no_grad()
def native_logits(native_model, inputs: BatchFeature, config) -> torch.Tensor:
    """The native model's logits on our processor's `inputs`, fed the pixel tensors our model computes inside."""
    pixels = native_pixel_inputs(inputs["pixel_values"], config)
    dtype = native_model.dtype
    return native_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        **{name: value.to(dtype) for name, value in pixels.items()},
    ).logits


def compare_with_native(ours_folder: str | os.PathLike, native_folder: str | os.PathLike, dtype: str = "auto") -> float:
    """Max |logit difference| between our folder and a native folder on the built-in sample."""
    model, processor = load_ours(ours_folder, dtype)
    native = native_model_class(native_folder).from_pretrained(native_folder, dtype=_DTYPES[dtype]).eval()
    inputs = sample_inputs(processor)
    with torch.no_grad():
        ours = model(**inputs).logits
    return float((ours.float() - native_logits(native, inputs, model.config).float()).abs().max())


def check_runs(folder: str | os.PathLike, dtype: str = "auto") -> str:
    """Load our folder with the Auto classes, run the sample, and describe the result (fails on NaN/inf)."""
    model, processor = load_ours(folder, dtype)
    inputs = sample_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the converted model in {folder} gives non-finite logits on the sample")
    return (f"loads with AutoModelForCausalLM/AutoProcessor (trust_remote_code) and runs: logits "
            f"{list(logits.shape)}, {model.dtype}, all finite")
