"""Batched, left-padded greedy generation equals one-by-one generation."""

from __future__ import annotations

import torch

PROMPTS = [
    ("Tell me a story about numbers and colors.", 0),
    ("<image_placeholder>What is in the image?", 1),
    ("Compare <image_placeholder> with <image_placeholder>, which bar is the largest?", 2),
]


def _generate(model, processor, texts, images):
    inputs = processor(text=texts, images=images or None, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def test_batched_left_padded_generate_matches_single(tiny_pair, images):
    model, processor = tiny_pair
    pool = iter(images)
    per_prompt_images = [[next(pool) for _ in range(n)] for _, n in PROMPTS]
    singles = [
        _generate(model, processor, [text], imgs)[0] for (text, _), imgs in zip(PROMPTS, per_prompt_images)
    ]
    batched = _generate(model, processor, [t for t, _ in PROMPTS], [i for imgs in per_prompt_images for i in imgs])
    lengths = processor(text=[t for t, _ in PROMPTS], images=images)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # really different lengths, so padding is exercised
    for row, single in enumerate(singles):
        assert torch.equal(batched[row], single), f"prompt {row}"
