"""The official DeepSeek-VL preprocessing written out from ../shared/spec/official-implementation.md (sections 0
and 1), independent of our image processor, and the fidelity cases of issue 14: a converted official checkpoint
against the source model fed these reference pixels.

Used by tests/test_official_fidelity.py (which asserts) and bench/fidelity.py (which prints the figures).
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.conftest import make_image


def official_pixels(image: Image.Image | bytes, size: int, background, rescale_factor: float = 1 / 255,
                    mean=None, std=None) -> np.ndarray:
    """One image as the official code prepares it: `load_pil_images` opens it and calls `convert("RGB")` (alpha
    dropped, no EXIF rotation); the long side goes to `size`, the short one to `int(short / long * size)` but at
    least 14; torchvision's resize of a PIL image is PIL's bicubic; `expand2square` pastes it at
    `(size - short) // 2` on a canvas of `background`; HWC uint8 -> CHW, times `rescale_factor` in float64, then
    float32 (transformers' `rescale`); normalised only when `mean`/`std` are given. Returns [3, size, size]."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    rgb = image.convert("RGB")
    width, height = rgb.size
    longest = max(width, height)
    new_h, new_w = max(int(height / longest * size), 14), max(int(width / longest * size), 14)
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), tuple(background))
    canvas.paste(rgb, ((size - new_w) // 2, (size - new_h) // 2))
    x = (np.asarray(canvas).transpose(2, 0, 1).astype(np.float64) * rescale_factor).astype(np.float32)
    if mean is not None:
        x = (x - np.array(mean, np.float32).reshape(3, 1, 1)) / np.array(std, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray(x)  # row-major like any processor output (a strided layout changes conv rounding)


def official_batch(images: list, size: int, background) -> torch.Tensor:
    """The reference pixels of several images in text order, [N, 3, size, size] (our flat layout)."""
    return torch.from_numpy(np.stack([official_pixels(image, size, background) for image in images]))


# --- test images --------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def rgba_png(width: int = 300, height: int = 200, seed: int = 4) -> bytes:
    """A photo with an alpha ramp (fully transparent on the left, opaque on the right), saved as PNG."""
    image = make_image(width, height, seed).convert("RGBA")
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    image.putalpha(Image.fromarray(ramp, "L"))
    return png_bytes(image)


@cache
def mode_images() -> dict[str, Image.Image | bytes]:
    """One image per mode the official loader handles, plus extreme aspect ratios (built once; do not modify)."""
    photo = make_image(240, 180, 11)
    la = photo.convert("LA")
    la.putalpha(Image.fromarray(np.tile(np.arange(240, dtype=np.uint8), (180, 1)), "L"))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 3
    return {
        "RGB": photo,
        "RGBA": rgba_png(),
        "LA": la,
        "P with transparency": palette,
        "L": make_image(150, 260, 12).convert("L"),
        "CMYK": make_image(200, 120, 13).convert("CMYK"),
        "banner 2000x15": make_image(2000, 15, 14),
        "tower 9x1500": make_image(9, 1500, 15),
        "1x1": make_image(1, 1, 16),
    }


# --- fidelity cases (issue 14's table) ----------------------------------------------------------------------

# Our tiny test towers; `full_size` runs them at the released input sizes (SAM 1024, SigLIP 384), so that the
# preprocessing is the released one (slow on CPU: about 10 s per forward with two images).
FIDELITY_PRESETS = {"hybrid": "tiny", "siglip-only": "tiny-siglip"}
FULL_SIZE = {
    "hybrid": {"sam_config.image_size": 1024, "siglip_config.image_size": 384,
               "text_config.max_position_embeddings": 4096},
    "siglip-only": {"siglip_config.image_size": 384, "text_config.max_position_embeddings": 4096},
}
CASES = ("one RGB image", "two images (RGBA PNG + greyscale)", "left-padded batch (banner, greyscale)", "text only")


@dataclass
class Converted:
    """A random source model, the folder `convert --from official` wrote from it, and that folder loaded."""

    source: torch.nn.Module
    model: torch.nn.Module
    processor: object
    folder: Path


def convert_random(kind: str, root: Path, full_size: bool = True) -> Converted:
    """Build a random model of `kind` (see FIDELITY_PRESETS), write it in the official layout and convert it with
    no extra settings; the converted folder is loaded through the Auto classes (its remote code)."""
    # imported here: the preprocessing reference above also serves suites that run on transformers 4.57
    from deepseek_vl_hf.conversion.official import convert_official
    from transformers import AutoModelForCausalLM, AutoProcessor

    from deepseek_vl_hf.checkpoint import build_random_model
    from tests.conversion_fixtures import randomize_, tiny_official_overrides, write_official_folder

    preset = FIDELITY_PRESETS[kind]
    source, processor = build_random_model(preset, FULL_SIZE[kind] if full_size else None, seed=0)
    randomize_(source, seed=1)
    official = write_official_folder(source, processor, root / "official", shards=1)
    convert_official(official, root / "converted", overrides=tiny_official_overrides(preset))
    model = AutoModelForCausalLM.from_pretrained(root / "converted", trust_remote_code=True).eval()
    return Converted(source, model, AutoProcessor.from_pretrained(root / "converted", trust_remote_code=True),
                     root / "converted")


def _prompt(processor, text: str, images: int) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "User", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def case_inputs(case: str, processor) -> tuple[list[str], list]:
    """(prompts, images in text order) of one of CASES."""
    grey = make_image(180, 240, 21).convert("L")
    if case == CASES[0]:
        return [_prompt(processor, "What is in the image?", 1)], [make_image(640, 480, 20)]
    if case == CASES[1]:
        return [_prompt(processor, "Compare the two images.", 2)], [rgba_png(), grey]
    if case == CASES[2]:
        return ([_prompt(processor, "Read the banner, please, word by word.", 1),
                 _prompt(processor, "Grey?", 1)], [make_image(1500, 90, 22), grey])
    return [_prompt(processor, "Tell me a short story about a lighthouse.", 0)], []


@torch.no_grad()
def max_logit_difference(converted: Converted, case: str, **image_settings) -> float:
    """Max |logit difference| on real tokens between the converted folder (its processor with `image_settings`
    overriding its own, default: none) and the source model fed the official reference pixels."""
    texts, images = case_inputs(case, converted.processor)
    inputs = converted.processor(text=texts, images=images or None, return_tensors="pt", **image_settings)
    ours = converted.model(**inputs).logits
    reference = dict(inputs)
    if images:
        ip = converted.processor.image_processor
        reference["pixel_values"] = official_batch(images, ip.image_size, ip.fill_color)
    theirs = converted.source(**reference).logits
    real = inputs["attention_mask"].bool()
    return float((ours[real] - theirs[real]).abs().max())


OPT_IN = {"resample_backend": "torch", "alpha_mode": "composite"}


def fidelity_table(full_size: bool = True) -> list[dict]:
    """Rows of issue 14's table: per case, hybrid and SigLIP-only, the converted folder's defaults and the opt-in
    fast/compositing settings, each the max |logit difference| against the source model on reference pixels."""
    with tempfile.TemporaryDirectory() as tmp:
        converted = {kind: convert_random(kind, Path(tmp) / kind, full_size) for kind in FIDELITY_PRESETS}
        rows = []
        for case in CASES:
            row = {"case": case}
            for kind, pair in converted.items():
                row[f"{kind}, defaults"] = max_logit_difference(pair, case)
                row[f"{kind}, opt-in"] = max_logit_difference(pair, case, **OPT_IN)
            rows.append(row)
        return rows


__all__ = ["CASES", "OPT_IN", "convert_random", "fidelity_table", "max_logit_difference", "mode_images", "official_batch", "official_pixels"]
