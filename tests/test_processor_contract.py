"""The processor keywords transformers' `ProcessorMixin` / `apply_chat_template`, the pipelines and TRL pass."""

from __future__ import annotations

import pytest
import torch
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import ProcessorInputError

from tests.conftest import make_image


def _dialogue(image):
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, quite sure."}]},
    ]


def _expected_mask(processor, ids: list[int]) -> list[int]:
    """Independently of offsets: 1 from the token after each "Assistant:" (found by decoding prefixes) through
    the EOS that closes that answer."""
    eos = processor.tokenizer.eos_token_id
    mask, inside = [], False
    for i, token in enumerate(ids):
        mask.append(int(inside))
        if inside and token == eos:
            inside = False
        elif not inside and processor.tokenizer.decode(ids[: i + 1]).endswith("Assistant:"):
            inside = True
    return mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_assistant_tokens_mask_token_by_token(tiny_pair, padding_side):
    _, processor = tiny_pair
    image = make_image(64, 48)
    conversations = [_dialogue(image), _dialogue(image)[:2]]
    out = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": padding_side, "add_special_tokens": False},
    )
    for row in range(2):
        keep = out["attention_mask"][row].bool()
        ids = out["input_ids"][row][keep].tolist()
        mask = out["assistant_masks"][row][keep].tolist()
        assert mask == _expected_mask(processor, ids)
        assert ids[0] == processor.tokenizer.bos_token_id  # BOS once, even with add_special_tokens=False
        assert out["assistant_masks"][row][~keep].sum() == 0
    answers = processor.tokenizer.decode(out["input_ids"][0][out["assistant_masks"][0].bool()])
    assert answers == " A red square.<｜end▁of▁sentence｜> Yes, quite sure.<｜end▁of▁sentence｜>"


def test_trl_collator_keywords_are_accepted(tiny_pair):
    """The exact keyword set TRL's vision collator passes (through `processor_kwargs` on 5.x)."""
    _, processor = tiny_pair
    out = processor.apply_chat_template(
        [_dialogue(make_image(40, 40))], tokenize=True, return_dict=True, return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "pad_to_multiple_of": 16, "truncation": False,
                          "max_length": None, "add_special_tokens": False},
    )
    assert out["input_ids"].shape[1] % 16 == 0
    assert out["assistant_masks"].shape == out["input_ids"].shape


def test_padding_max_length_and_multiple(tiny_pair):
    _, processor = tiny_pair
    out = processor(text=["a b c", "<image_placeholder> d"], images=[make_image(30, 30)],
                    padding="max_length", max_length=100)
    assert out["input_ids"].shape == (2, 100) and out["attention_mask"].shape == (2, 100)
    assert out["attention_mask"][0].sum() < 10 and out["attention_mask"][0, -1] == 1  # left padding
    right = processor(text=["a b c", "d"], padding=True, pad_to_multiple_of=8, padding_side="right")
    assert right["input_ids"].shape[1] == 8 and right["attention_mask"][0, 0] == 1
    with pytest.raises(ProcessorInputError, match="padding='max_length' needs max_length"):
        processor.tokenizer.model_max_length, saved = int(1e30), processor.tokenizer.model_max_length
        try:
            processor(text="a", padding="max_length")
        finally:
            processor.tokenizer.model_max_length = saved


def test_optional_outputs(tiny_pair):
    _, processor = tiny_pair
    text = "look <image_placeholder> here"
    out = processor(text=[text, "x"], images=[make_image(30, 30)], return_offsets_mapping=True,
                    return_mm_token_type_ids=True, return_text_replacement_offsets=True, return_length=True)
    image_positions = out["input_ids"][0] == processor.image_token_id
    assert torch.equal(out["mm_token_type_ids"][0].bool(), image_positions)
    start = text.index("<image_placeholder>")
    spans = out["offset_mapping"][0][image_positions]
    assert spans.tolist() == [[start, start + len("<image_placeholder>")]] * processor.num_image_tokens
    assert out["length"].tolist() == [int(out["attention_mask"][0].sum()), int(out["attention_mask"][1].sum())]
    assert out["text_replacement_offsets"].numel() == 0
    no_mask = processor(text="x", return_attention_mask=False)
    assert "attention_mask" not in no_mask


def test_nested_kwarg_groups_are_flattened(tiny_pair):
    _, processor = tiny_pair
    flat = processor(text=["a", "a b c d"], padding_side="right")
    nested = processor(text=["a", "a b c d"], text_kwargs={"padding_side": "right"}, common_kwargs={"return_tensors": "pt"})
    assert torch.equal(flat["input_ids"], nested["input_ids"])


def test_unknown_or_unsupported_keywords_are_clear_errors(tiny_pair):
    _, processor = tiny_pair
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['colour'\] for DeepseekVLHFProcessor"):
        processor(text="a", colour="red")
    with pytest.raises(ProcessorInputError, match="return_token_type_ids=True is not supported"):
        processor(text="a", return_token_type_ids=True)
    with pytest.raises(ProcessorInputError, match="padding must be"):
        processor(text="a", padding="sideways")
