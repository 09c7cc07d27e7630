"""The processor: placeholder expansion, batching, truncation, chat template."""

from __future__ import annotations

import pytest
import torch
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DEFAULT_SYSTEM_PROMPT, ProcessorInputError

EOS = "<｜end▁of▁sentence｜>"


def test_placeholders_expand_to_image_tokens(tiny_pair, images):
    _, processor = tiny_pair
    out = processor(text="<image_placeholder>What is this?", images=images[:1])
    ids = out["input_ids"][0].tolist()
    t = processor.num_image_tokens
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids[1 : 1 + t] == [processor.image_token_id] * t
    assert ids[1 + t :] == processor.tokenizer("What is this?", add_special_tokens=False)["input_ids"]
    assert out["pixel_values"].shape == (1, 3, 256, 256)
    assert out["attention_mask"].tolist() == [[1] * len(ids)]


@pytest.mark.parametrize(
    ("text", "n_images", "message"),
    [
        ("<image_placeholder> and <image_placeholder>", 1, r"2 <image_placeholder> placeholder\(s\).*1 image"),
        ("no placeholder here", 1, r"0 <image_placeholder> placeholder\(s\).*1 image"),
        ("<image_placeholder>", 0, r"1 <image_placeholder> placeholder\(s\).*0 image"),
    ],
)
def test_placeholder_image_mismatch_is_a_clear_error(tiny_pair, images, text, n_images, message):
    _, processor = tiny_pair
    with pytest.raises(ProcessorInputError, match=message):
        processor(text=text, images=images[:n_images] or None)


def test_nested_images_must_match_each_text(tiny_pair, images):
    _, processor = tiny_pair
    texts = ["<image_placeholder>a", "b <image_placeholder><image_placeholder>"]
    flat = processor(text=texts, images=images)
    nested = processor(text=texts, images=[[images[0]], images[1:]])
    assert torch.equal(flat["input_ids"], nested["input_ids"])
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])
    with pytest.raises(ProcessorInputError, match="text 0 has 1"):
        processor(text=texts, images=[[], images])


def test_left_padding_with_eos_when_no_pad_token(tiny_pair, images):
    _, processor = tiny_pair
    assert processor.tokenizer.pad_token_id is None
    out = processor(text=["<image_placeholder>short", "a much longer text without any image at all"], images=images[:1])
    ids, mask = out["input_ids"], out["attention_mask"]
    shorter = int(mask.sum(1).argmin())
    n_pad = int((mask[shorter] == 0).sum())
    assert n_pad > 0 and mask[shorter, :n_pad].sum() == 0 and mask[shorter, n_pad:].all()
    assert (ids[shorter, :n_pad] == processor.tokenizer.eos_token_id).all()


def test_length_limit_errors_or_truncates_before_an_image(tiny_pair, images):
    _, processor = tiny_pair
    text = "hello <image_placeholder> world <image_placeholder> end"
    full = processor(text=text, images=images[:2])["input_ids"].shape[1]
    with pytest.raises(ProcessorInputError, match=f"{full} tokens long.*max_length=50.*truncation=True"):
        processor(text=text, images=images[:2], max_length=50)
    t = processor.num_image_tokens
    cut = processor(text=text, images=images[:2], max_length=t + 10, truncation=True)
    ids = cut["input_ids"][0].tolist()
    assert len(ids) <= t + 10
    assert ids.count(processor.image_token_id) == t  # the second image would not fit whole: dropped
    assert cut["pixel_values"].shape[0] == 1


def _two_turn_two_images():
    return [
        {"role": "user", "content": [{"type": "text", "text": "Hello! Who are you?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "I am a helpful assistant."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is written on the banner?"},
                {"type": "image"},
                {"type": "text", "text": "Read it with"},
                {"type": "image"},
                {"type": "text", "text": "."},
            ],
        },
    ]


def test_chat_template_text(tiny_pair):
    _, processor = tiny_pair
    prompt = processor.apply_chat_template(_two_turn_two_images(), add_generation_prompt=True, tokenize=False)
    assert prompt == (
        f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: Hello! Who are you?\n\nAssistant: I am a helpful assistant.{EOS}"
        "User: What is written on the banner?<image_placeholder>Read it with<image_placeholder>.\n\nAssistant:"
    )
    no_gen = processor.apply_chat_template(_two_turn_two_images(), add_generation_prompt=False, tokenize=False)
    assert no_gen == prompt[: -len("\n\nAssistant:")]
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}]
    assert processor.apply_chat_template(custom, tokenize=False) == f"Be brief.\n\nUser: Hi\n\nAssistant: Hello.{EOS}"


def test_chat_template_tokens(tiny_pair, images):
    """Token by token: BOS, the text between special tokens, EOS after the answer, 36 image ids per image."""
    _, processor = tiny_pair
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(_two_turn_two_images(), add_generation_prompt=True, tokenize=False)
    ids = processor(text=prompt, images=images[:2])["input_ids"][0].tolist()

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    image = [processor.image_token_id] * processor.num_image_tokens
    expected = (
        [tok.bos_token_id]
        + enc(f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: Hello! Who are you?\n\nAssistant: I am a helpful assistant.")
        + [tok.eos_token_id]
        + enc("User: What is written on the banner?")
        + image
        + enc("Read it with")
        + image
        + enc(".\n\nAssistant:")
    )
    assert ids == expected


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "robot", "content": "hi"}], "unknown role robot"),
        ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}], "images go in user"),
        ([{"role": "system", "content": "see <image_placeholder>"}], "images go in user"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
        ([{"role": "user", "content": [{"type": "video"}]}], "unsupported type video"),
    ],
)
def test_chat_template_rejects_bad_conversations(tiny_pair, messages, message):
    _, processor = tiny_pair
    with pytest.raises(Exception, match=message):
        processor.apply_chat_template(messages, tokenize=False)


def test_empty_text_gives_bos_only(tiny_pair):
    _, processor = tiny_pair
    out = processor(text="")
    assert out["input_ids"].tolist() == [[processor.tokenizer.bos_token_id]]
    assert "pixel_values" not in out


def test_apply_chat_template_tokenizes_with_embedded_images(tiny_pair, images):
    """transformers' tokenize=True path: images inside the content parts reach the image processor."""
    _, processor = tiny_pair
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What?"}]}]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    direct = processor(text=prompt, images=[images[0]])
    assert torch.equal(out["input_ids"], direct["input_ids"])
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    with pytest.raises(ProcessorInputError, match="not videos or audio"):
        processor(text="hi", videos=[object()])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['colour'\]"):
        processor(text="hi", colour="red")
