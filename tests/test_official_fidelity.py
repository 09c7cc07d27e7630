"""Issue 14: a folder written by `convert --from official` with no extra settings reproduces the official
preprocessing bit for bit (every image mode the official loader handles, extreme aspect ratios, a left-padded
multi-image batch) and the source model's logits; the official conversation roles are accepted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DEFAULT_SYSTEM_PROMPT

from deepseek_vl_hf.tokenizer import EOS_TOKEN, IMAGE_TOKEN
from tests.conftest import make_image
from tests.official_reference import (
    CASES,
    FIDELITY_PRESETS,
    convert_random,
    max_logit_difference,
    mode_images,
    official_batch,
    official_pixels,
)

TOLERANCE = 1e-4
# The released preprocessors: (image_size, padding colour) of the 7B (hybrid) and 1.3B (SigLIP-only) checkpoints.
RELEASED = {"hybrid": (1024, (122, 116, 104)), "siglip-only": (384, (127, 127, 127))}


@pytest.fixture(scope="module", params=list(FIDELITY_PRESETS))
def full_size(request, tmp_path_factory):
    """A converted folder per kind whose preprocessing is the released one (1024 / 384)."""
    return request.param, convert_random(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=list(FIDELITY_PRESETS))
def small(request, tmp_path_factory):
    """A converted folder per kind at the tiny towers' own input sizes (fast forwards for the logit checks)."""
    return convert_random(request.param, tmp_path_factory.mktemp(request.param), full_size=False)


def test_converted_folder_writes_the_exact_settings(full_size):
    kind, converted = full_size
    written = json.loads((converted.folder / "processor_config.json").read_text())["image_processor"]
    assert (written["resample_backend"], written["alpha_mode"]) == ("pil", "drop")
    size, background = RELEASED[kind]
    ip = converted.processor.image_processor
    assert (ip.image_size, ip.fill_color, ip.do_normalize) == (size, background, False)


@pytest.mark.parametrize("name", list(mode_images()))
def test_default_pixels_equal_the_official_preprocessing(full_size, name):
    """RGB, RGBA (PNG bytes), LA, P with transparency, L, CMYK and extreme aspect ratios, bit for bit."""
    kind, converted = full_size
    image = mode_images()[name]
    size, background = RELEASED[kind]
    pixels = converted.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    assert np.array_equal(pixels[0].numpy(), official_pixels(image, size, background)), name


def test_left_padded_multi_image_batch_equals_the_official_preprocessing(full_size):
    kind, converted = full_size
    processor = converted.processor
    images = [make_image(1500, 90, 1), mode_images()["RGBA"], make_image(180, 240, 2).convert("L")]
    texts = [f"User: {IMAGE_TOKEN} read the banner\n\nAssistant:",
             f"User: {IMAGE_TOKEN}{IMAGE_TOKEN} compare these two images, please, in detail\n\nAssistant:"]
    inputs = processor(text=texts, images=images, return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()  # left padding
    size, background = RELEASED[kind]
    assert torch.equal(inputs["pixel_values"], official_batch(images, size, background))


@pytest.mark.parametrize("case", CASES)
def test_converted_logits_match_the_source_model_on_official_pixels(small, case):
    assert max_logit_difference(small, case) <= TOLERANCE


def test_official_roles_and_prompt_format(small):
    """The official conversation (roles User / Assistant, placeholders inside the text) gives the official prompt
    (spec section 5) and the same ids as our lower-case roles."""
    processor = small.processor
    official = [
        {"role": "User", "content": "Hello! Who are you?"},
        {"role": "Assistant", "content": "I am a helpful assistant."},
        {"role": "User", "content": f"What is written on the banner? {IMAGE_TOKEN} Read it with {IMAGE_TOKEN}."},
    ]
    prompt = processor.apply_chat_template(official, add_generation_prompt=True, tokenize=False)
    assert prompt == (f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: Hello! Who are you?\n\nAssistant: I am a helpful assistant."
                      f"{EOS_TOKEN}User: What is written on the banner? {IMAGE_TOKEN} Read it with {IMAGE_TOKEN}."
                      "\n\nAssistant:")
    lower = [{**message, "role": message["role"].lower()} for message in official]
    assert processor.apply_chat_template(lower, add_generation_prompt=True, tokenize=False) == prompt
    with pytest.raises(Exception, match="unknown role USER"):
        processor.apply_chat_template([{"role": "USER", "content": "hi"}], tokenize=False)
