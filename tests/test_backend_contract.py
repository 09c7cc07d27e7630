"""transformers' documented rules for serving engines' "transformers backend" (vLLM, SGLang), one test per API point.

The engines replace the LLM's attention through transformers' attention interface, pass their own keyword
arguments down through `forward`, ask the processor how many placeholder tokens each image needs, and fetch the
image embeddings with `get_image_features`. No GPU is lent here: vLLM itself is untested on this code (README).
"""

from __future__ import annotations

import torch
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.conftest import make_image


def test_model_declares_attention_backend_support():
    assert DeepseekVLHFForCausalLM._supports_attention_backend is True
    assert DeepseekVLHFForCausalLM.base_model_prefix == "model"


def test_attention_goes_through_the_interface_with_forward_kwargs_passed_down(tiny_pair):
    """An engine registers its attention and passes per-call metadata as forward kwargs: every LLM layer must
    call the registered function, with those kwargs, and its output must be what the model uses."""
    model, processor = tiny_pair
    seen = []

    def probe_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("engine_metadata")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("dsvl_probe", probe_attention)
    inputs = processor(text="<image_placeholder>hi", images=[make_image(40, 30)], return_tensors="pt")
    previous = model.config.text_config._attn_implementation
    try:
        model.set_attn_implementation({"text_config": "dsvl_probe"})
        with torch.no_grad():
            probed = model(**inputs, engine_metadata="slot-7").logits
    finally:
        model.set_attn_implementation({"text_config": previous})
    with torch.no_grad():
        plain = model(**inputs).logits
    layers = model.config.text_config.num_hidden_layers
    assert seen == [(index, "slot-7") for index in range(layers)]
    torch.testing.assert_close(probed, plain)


def test_processor_reports_placeholder_tokens_per_image(tiny_pair):
    _, processor = tiny_pair
    sizes = [(30, 40), (1080, 1920), (4000, 30)]
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert data.num_image_tokens == [processor.num_image_tokens] * 3
    assert data.num_image_patches == [1, 1, 1]
    images = [make_image(w, h) for h, w in sizes]
    out = processor(text="<image_placeholder>" * 3, images=images, return_tensors="pt")
    assert int((out["input_ids"] == processor.image_token_id).sum()) == sum(data.num_image_tokens)
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()


def test_multimodal_token_ids_agree(tiny_pair):
    model, processor = tiny_pair
    assert processor.image_token == "<image_placeholder>"
    assert processor.image_token_id == model.config.image_token_id
    out = processor(text="a <image_placeholder> b", images=[make_image(20, 20)], return_mm_token_type_ids=True)
    assert torch.equal(out["mm_token_type_ids"].bool(), out["input_ids"] == model.config.image_token_id)


def test_image_embeddings_for_the_engine_are_what_the_model_merges(tiny_pair):
    model, processor = tiny_pair
    inputs = processor(text="<image_placeholder> x", images=[make_image(50, 20)], return_tensors="pt")
    with torch.no_grad():
        embeddings = model.get_image_features(inputs["pixel_values"]).pooler_output
        merged = model.model(**inputs).image_hidden_states
    assert embeddings.shape == (1, processor.num_image_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(embeddings, merged)
    assert model.config.get_text_config() is model.config.text_config
