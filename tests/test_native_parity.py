"""Parity with transformers' native DeepSeek-VL port: random native checkpoints built here are converted with
`--from native`; our processor must give the native processor's input_ids, our model its logits (fp32, max abs
diff <= 1e-4) and greedy tokens; `--to native` must give back a native checkpoint that reproduces our logits.

Pixel inputs differ by design, so the native model is fed exactly the tensors our model computes inside
(`native_pixel_inputs`); the two image processors are compared separately, with documented tolerances.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from deepseek_vl_hf.conversion.keymaps import NATIVE_SIGLIP_OUT
from deepseek_vl_hf.conversion.native import convert_native, export_native, native_pixel_inputs
from deepseek_vl_hf.conversion.shards import CheckpointReader
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import CLIP_MEAN, CLIP_STD
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import DeepseekVLHFImageProcessor, resized_size
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DEFAULT_SYSTEM_PROMPT
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    DeepseekVLHybridProcessor,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
)
from transformers.image_utils import PILImageResampling
from transformers.initialization import no_init_weights

from deepseek_vl_hf.commands import convert as convert_command
from deepseek_vl_hf.presets import PRESETS, preset_config
from deepseek_vl_hf.tokenizer import IMAGE_TOKEN
from tests.conftest import make_image
from tests.conversion_fixtures import native_tokenizer, randomize_

TOLERANCE = 1e-4
# A chat template with the semantics of the one in the native Hub checkpoints' processor folders (written for this
# test): always the default system prompt, "User: " / "Assistant: " turns, image parts as <image_placeholder>,
# consecutive text parts joined by a space, "\n\n" after user turns and EOS after assistant turns.
NATIVE_STYLE_TEMPLATE = (
    "{{- '" + DEFAULT_SYSTEM_PROMPT + "\\n\\n' -}}"
    "{%- for message in messages -%}"
    "{{- 'User: ' if message['role'] == 'user' else 'Assistant: ' -}}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image_placeholder>"
    "{%- else -%}"
    "{%- if not loop.first and message['content'][loop.index0 - 1]['type'] == 'text' -%} {% endif -%}"
    "{{- part['text'] | trim -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if not loop.last or add_generation_prompt -%}"
    "{{- '\\n\\n' if message['role'] == 'user' else '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red circle and a blue square."}]},
    {"role": "user", "content": [{"type": "text", "text": "Compare it with"}, {"type": "image"},
                                 {"type": "text", "text": "please."}]},
]
TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, vocab_size=2048)
# Native variants: (our preset whose towers it mirrors, hybrid?, tied LM head?).
VARIANTS = {
    "tiny": ("tiny", True, False),
    "tiny-siglip": ("tiny-siglip", False, True),
    "7b-vision": ("7b", True, False),
    "1.3b-vision": ("1.3b", False, False),  # image processor comparison only
}


def _native_config(variant: str, image_token_id: int):
    preset, hybrid, tied = VARIANTS[variant]
    siglip = PRESETS[preset]["siglip_config"]
    vision = dict(image_size=siglip["image_size"], patch_size=siglip["patch_size"], hidden_size=siglip["hidden_size"],
                  num_hidden_layers=siglip["num_hidden_layers"], num_attention_heads=siglip["num_attention_heads"],
                  intermediate_size=siglip["intermediate_size"], hidden_act="gelu", vision_use_head=False)
    common = dict(text_config=dict(TINY_LLM, tie_word_embeddings=tied), vision_config=vision,
                  image_token_id=image_token_id, tie_word_embeddings=tied)
    if not hybrid:
        return DeepseekVLConfig(**common)
    sam = PRESETS[preset]["sam_config"]
    high = dict(image_size=sam["image_size"], patch_size=sam["patch_size"], hidden_size=sam["hidden_size"],
                num_hidden_layers=sam["num_hidden_layers"], num_attention_heads=sam["num_attention_heads"],
                mlp_dim=sam["intermediate_size"], window_size=sam["window_size"],
                global_attn_indexes=sam["global_attn_indexes"], output_channels=sam["neck_channels"])
    return DeepseekVLHybridConfig(**common, high_res_vision_config=high)


def _native_image_processor(variant: str):
    preset, hybrid, _ = VARIANTS[variant]
    side = PRESETS[preset]["siglip_config"]["image_size"]
    size = {"height": side, "width": side}
    if not hybrid:
        return DeepseekVLImageProcessor(size=size, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    high = PRESETS[preset]["sam_config"]["image_size"]
    return DeepseekVLHybridImageProcessor(
        size=size, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, resample=PILImageResampling.BILINEAR,
        high_res_size={"height": high, "width": high}, high_res_image_mean=CLIP_MEAN, high_res_image_std=CLIP_STD)


def build_native(variant: str, root):
    """A random native checkpoint folder of `variant` (every weight random, the SAM gate included)."""
    tokenizer = native_tokenizer(root / "tokenizer")
    config = _native_config(variant, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    cls = DeepseekVLHybridForConditionalGeneration if VARIANTS[variant][1] else DeepseekVLForConditionalGeneration
    with no_init_weights():  # every weight is set by randomize_
        model = cls(config).eval()
    model.tie_weights()  # skipped with the init above; ties the head for `tie_word_embeddings=True`
    randomize_(model)
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("pad_token_id", tokenizer.eos_token_id)):
        setattr(model.generation_config, key, value)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    processor_cls = DeepseekVLHybridProcessor if VARIANTS[variant][1] else DeepseekVLProcessor
    processor = processor_cls(image_processor=_native_image_processor(variant), tokenizer=tokenizer,
                              chat_template=NATIVE_STYLE_TEMPLATE, num_image_tokens=grid * grid)
    folder = root / "native"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def _images():
    return [make_image(320, 240, 1), make_image(200, 300, 2)]


@torch.no_grad()
def _native_logits(native, inputs, config):
    return native(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  **native_pixel_inputs(inputs["pixel_values"], config))


@pytest.mark.parametrize("variant", ["tiny", "tiny-siglip"])
def test_tiny_native_round_trip_parity(variant, tmp_path, capsys):
    native, native_processor, native_dir = build_native(variant, tmp_path)
    result = convert_native(native_dir, tmp_path / "ours")
    assert ("ties the LM head" in " ".join(result.notes)) == VARIANTS[variant][2]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours", trust_remote_code=True)

    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert prompt == native_processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=_images(), return_tensors="pt")
    native_inputs = native_processor(text=prompt, images=_images(), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], native_inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"], native_inputs["attention_mask"])

    with torch.no_grad():
        logits = model(**inputs).logits
    diff = float((logits - _native_logits(native, inputs, model.config).logits).abs().max())
    with capsys.disabled():
        print(f"\n[{variant}] native -> ours max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    pixels = native_pixel_inputs(inputs["pixel_values"], model.config)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    ours_tokens = model.generate(**inputs, **gen)
    native_tokens = native.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **pixels, **gen)
    assert torch.equal(ours_tokens, native_tokens)

    export_native(tmp_path / "ours", tmp_path / "back")
    back = type(native).from_pretrained(tmp_path / "back").eval()
    back_processor = AutoProcessor.from_pretrained(tmp_path / "back")
    back_inputs = back_processor(text=prompt, images=_images(), return_tensors="pt")
    assert torch.equal(back_inputs["input_ids"], inputs["input_ids"])
    back_diff = float((logits - _native_logits(back, inputs, model.config).logits).abs().max())
    with capsys.disabled():
        print(f"[{variant}] ours -> native max |logit diff| = {back_diff:.3g}")
    assert back_diff <= TOLERANCE


@pytest.mark.slow
def test_release_vision_shapes_native_parity(tmp_path, capsys):
    """The released 7B tower shapes (SAM-B at 1024 + SigLIP-L at 384) with a tiny LLM: one image, one forward
    per model (fp32, ~12 s each on 2 cores); greedy tokens from the image embeddings each model computed. Export
    back to native and the SigLIP-only variant are checked on the tiny shapes (the key tables and code paths do
    not depend on the sizes)."""
    variant = "7b-vision"
    native, native_processor, native_dir = build_native(variant, tmp_path)
    convert_native(native_dir, tmp_path / "ours")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "ours", trust_remote_code=True)
    conversation = CONVERSATION[:1]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    image = [make_image(640, 480, 3)]
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    native_inputs = native_processor(text=prompt, images=image, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], native_inputs["input_ids"])
    with torch.no_grad():
        ours = model(**inputs)
        theirs = _native_logits(native, inputs, model.config)
    diff = float((ours.logits - theirs.logits).abs().max())
    with capsys.disabled():
        print(f"\n[{variant}] native -> ours max |logit diff| = {diff:.3g}")
    assert diff <= TOLERANCE

    def greedy(lm, features):
        embeds = lm.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features.reshape(-1, embeds.shape[-1]))
        return lm.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=6,
                           min_new_tokens=6, do_sample=False)

    assert torch.equal(greedy(model, ours.image_hidden_states), greedy(native, theirs.image_outputs.pooler_output))


# ---------------------------------------------------------------------------------------------------------------
# Image processors. Measured tolerances (grey levels, 0-255 scale):
# - The content box is sized with int() by ours (as the official code) and round() by the native one, so sizes whose
#   fraction is >= .5 differ by one pixel (e.g. 333x500 -> 681 vs 682 wide at 1024): compared by size only.
# - Same box: our "torch" backend equals the native (torchvision, uint8 antialiased bicubic) exactly; our "pil"
#   backend (PIL's bicubic, as the official code) is within 2 levels, and within 1 level on all but a few pixels.
# - The native SigLIP input is resized from the padded uint8 image and rounded to uint8, ours from the float image
#   inside the model: within 1 level ("torch"), 1.5 levels ("pil", both differences together).
# ---------------------------------------------------------------------------------------------------------------

SIZES = [(640, 480), (300, 500), (333, 500), (1200, 10), (64, 64), (1500, 977)]
# backend -> (max levels of the main image, share of its values over 1 level, max levels of the SigLIP 384 input)
LEVELS = {"torch": (0.01, 0.0, 1.0), "pil": (2.0, 1e-4, 1.5)}


def _native_box(height: int, width: int, side: int, min_size: int = 14) -> tuple[int, int]:
    scale = side / max(height, width)
    return max(round(height * scale), min_size), max(round(width * scale), min_size)


@pytest.mark.parametrize("hybrid", [True, False], ids=["hybrid", "siglip-only"])
def test_image_processors_agree(hybrid):
    config = preset_config("7b" if hybrid else "1.3b")
    side = config.image_size
    branch = config.sam_config if hybrid else config.siglip_config
    std = torch.tensor(branch.image_std).view(1, 3, 1, 1)
    native = _native_image_processor("7b-vision" if hybrid else "1.3b-vision")
    main_key = "high_res_pixel_values" if hybrid else "pixel_values"
    compared = 0
    for index, (width, height) in enumerate(SIZES):
        image = make_image(width, height, index)
        box, native_box = resized_size(height, width, side, 14), _native_box(height, width, side)
        if box != native_box:
            assert sum(abs(a - b) for a, b in zip(box, native_box)) == 1, (width, height)
            continue
        compared += 1
        theirs = native(image, return_tensors="pt")
        for backend, (max_main, max_share, max_low) in LEVELS.items():
            ours = DeepseekVLHFImageProcessor(image_size=side, image_mean=branch.image_mean,
                                              image_std=branch.image_std, resample_backend=backend)
            fed = native_pixel_inputs(ours(image, return_tensors="pt")["pixel_values"], config)
            levels = (fed[main_key] - theirs[main_key]).abs() * std * 255  # normalised units -> grey levels
            assert float(levels.max()) <= max_main + 1e-3, (backend, width, height, float(levels.max()))
            assert float((levels > 1.001).float().mean()) <= max_share, (backend, width, height)
            if hybrid:
                low = (fed["pixel_values"] - theirs["pixel_values"]).abs() * 0.5 * 255
                assert float(low.max()) <= max_low + 1e-3, (backend, width, height, float(low.max()))
    assert compared >= 4


def test_native_pixel_inputs_are_what_our_model_computes(tiny_pair):
    """The tensors fed to the native model equal our towers' internal inputs (checked through the tower outputs)."""
    model, _ = tiny_pair
    pixels = torch.rand(2, 3, 256, 256)
    inputs = native_pixel_inputs(pixels, model.config)
    vision = model.model.vision_model
    with torch.no_grad():
        low, high = vision(pixels)
        assert torch.equal(low, vision.siglip(inputs["pixel_values"]).last_hidden_state)
        assert torch.equal(high, vision.sam(inputs["high_res_pixel_values"]))
    assert np.isfinite(inputs["pixel_values"].numpy()).all()


def test_convert_cli_native_both_ways_with_verify(tmp_path, capsys):
    """`convert --from native --verify`, `--to native --verify`, and reading back the exported folder, which uses
    the Hub checkpoints' key layout (`model.vision_model.vision_model.*`)."""
    _, _, native_dir = build_native("tiny", tmp_path)
    parser = argparse.ArgumentParser()
    convert_command.register(parser.add_subparsers(dest="command", required=True))
    steps = [("--from", native_dir, tmp_path / "ours"), ("--to", tmp_path / "ours", tmp_path / "hub"),
             ("--from", tmp_path / "hub", tmp_path / "ours2")]
    for flag, source, output in steps:
        args = parser.parse_args(["convert", flag, "native", "--input", str(source), "--output", str(output),
                                  "--verify", "--verify-dtype", "float32"])
        args.func(args)
        diff = re.search(r"max \|logit difference\| between source and converted model on the sample: (\S+)",
                         capsys.readouterr().out)
        assert diff and float(diff.group(1)) <= TOLERANCE
    assert any(k.startswith(NATIVE_SIGLIP_OUT) for k in (s.name for s in CheckpointReader(tmp_path / "hub").specs()))
    assert (tmp_path / "ours2" / "README.md").is_file() and not (tmp_path / "hub" / "README.md").exists()
