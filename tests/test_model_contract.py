"""transformers' generic model contract, as its common model / generation tests check it for a VLM.

Written from reading `tests/test_modeling_common.py` and `tests/generation/test_utils.py` (what they check, not
their code). Each test names the behaviour; where a generic check cannot apply, the docstring says why.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import (
    DeepseekVLHFCausalLMOutput,
    DeepseekVLHFForCausalLM,
    DeepseekVLHFModel,
    DeepseekVLHFModelOutputWithPast,
)
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from deepseek_vl_hf.checkpoint import save_checkpoint
from deepseek_vl_hf.presets import preset_config


def _inputs(model, n_images: int = 1, text_ids=(7, 8, 9), batch: int = 1, seed: int = 0):
    cfg = model.config
    ids = [cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.num_image_tokens * n_images + list(text_ids)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(n_images * batch, 3, cfg.image_size, cfg.image_size, generator=generator)
    return torch.tensor([ids] * batch), pixel_values if n_images else None


def _fresh(preset: str = "tiny", seed: int = 0, **overrides) -> DeepseekVLHFForCausalLM:
    config = preset_config(preset, overrides or None)
    config.image_token_id = 5
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = 1, 2, 2
    torch.manual_seed(seed)
    return DeepseekVLHFForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return _fresh()


# --- outputs ---------------------------------------------------------------------------------------------------


def test_base_model_returns_a_model_output_and_tuples_on_request(model):
    input_ids, pixel_values = _inputs(model)
    with torch.no_grad():
        out = model.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        as_tuple = model.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, return_dict=False)
        lm_tuple = model(input_ids=input_ids, pixel_values=pixel_values, return_dict=False)
        lm_out = model(input_ids=input_ids, pixel_values=pixel_values)
    assert isinstance(out, DeepseekVLHFModelOutputWithPast)
    assert out.last_hidden_state.shape == (1, input_ids.shape[1], model.config.text_config.hidden_size)
    assert out.past_key_values.get_seq_length() == input_ids.shape[1]
    assert out.image_hidden_states.shape == (1, model.config.num_image_tokens, model.config.text_config.hidden_size)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    assert isinstance(lm_tuple, tuple) and torch.equal(lm_tuple[0], lm_out.logits)
    assert isinstance(lm_out, DeepseekVLHFCausalLMOutput)


def test_config_return_dict_false_gives_tuples():
    model = _fresh(return_dict=False)
    input_ids, pixel_values = _inputs(model)
    with torch.no_grad():
        assert isinstance(model(input_ids=input_ids, pixel_values=pixel_values), tuple)
        assert isinstance(model.model(input_ids=input_ids, pixel_values=pixel_values), tuple)


def test_hidden_states_and_attentions_count_and_shape():
    model = _fresh(attn_implementation="eager")
    input_ids, pixel_values = _inputs(model)
    layers, length = model.config.text_config.num_hidden_layers, input_ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (1, length, model.config.text_config.hidden_size) for h in out.hidden_states)
    assert len(out.attentions) == layers
    heads = model.config.text_config.num_attention_heads
    assert all(a.shape == (1, heads, length, length) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, heads, length))
    with torch.no_grad():
        plain = model(input_ids=input_ids, pixel_values=pixel_values)
    assert plain.hidden_states is None and plain.attentions is None


def test_get_image_features_follows_the_v5_vlm_contract():
    model = _fresh(attn_implementation="eager")
    _, pixel_values = _inputs(model, n_images=2)
    with torch.no_grad():
        out = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
        merged = model(*_inputs(model, n_images=2)).image_hidden_states
        as_tuple = model.get_image_features(pixel_values, return_dict=False)
    siglip = model.config.siglip_config
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (2, model.config.num_image_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(out.pooler_output, merged)
    assert out.last_hidden_state.shape == (2, siglip.grid_size**2, siglip.hidden_size)
    assert len(out.hidden_states) == siglip.num_kept_layers + 1
    assert len(out.attentions) == siglip.num_kept_layers
    assert out.attentions[0].shape == (2, siglip.num_attention_heads, siglip.grid_size**2, siglip.grid_size**2)
    torch.testing.assert_close(out.hidden_states[-1], model.model.vision_model.siglip.blocks[-1](out.hidden_states[-2]))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.pooler_output)


def test_vision_attention_implementation_follows_each_sub_config(model):
    """eager and sdpa agree; the eager vision path really runs the unfused timm attention."""
    input_ids, pixel_values = _inputs(model)
    eager = copy.deepcopy(model)
    eager.config.siglip_config._attn_implementation = "eager"
    eager.config.sam_config._attn_implementation = "eager"
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
        got = eager(input_ids=input_ids, pixel_values=pixel_values).logits
    assert all(not block.attn.fused_attn for block in eager.model.vision_model.siglip.blocks)
    assert all(block.eager_attention for block in eager.model.vision_model.sam.blocks)
    assert all(block.attn.fused_attn for block in model.model.vision_model.siglip.blocks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_from_pretrained_attn_implementation_per_sub_config(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = DeepseekVLHFForCausalLM.from_pretrained(
        tmp_path, attn_implementation={"text_config": "sdpa", "siglip_config": "eager", "sam_config": "eager", "": "sdpa"}
    )
    assert loaded.config.siglip_config._attn_implementation == "eager"
    assert loaded.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        loaded(*_inputs(loaded))
    assert not loaded.model.vision_model.siglip.blocks[0].attn.fused_attn


# --- inputs_embeds ----------------------------------------------------------------------------------------------


def test_inputs_embeds_equal_input_ids_with_and_without_images(model):
    for n_images in (0, 1):
        input_ids, pixel_values = _inputs(model, n_images=n_images)
        embeds = model.get_input_embeddings()(input_ids)
        with torch.no_grad():
            by_ids = model(input_ids=input_ids, pixel_values=pixel_values).logits
            by_embeds = model(inputs_embeds=embeds, pixel_values=pixel_values).logits
        torch.testing.assert_close(by_embeds, by_ids, atol=0, rtol=0)


def test_generate_from_inputs_embeds_with_pixels(model):
    input_ids, pixel_values = _inputs(model)
    embeds = model.get_input_embeddings()(input_ids)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        from_ids = model.generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        from_embeds = model.generate(inputs_embeds=embeds, pixel_values=pixel_values, **kwargs)
    assert torch.equal(from_embeds, from_ids[:, input_ids.shape[1] :])


def test_image_tokens_without_pixels_are_still_a_clear_error(model):
    input_ids, _ = _inputs(model)
    with pytest.raises(ValueError, match="contain 36 image tokens .* but no pixel_values were given"):
        model(input_ids=input_ids)


# --- weights: tying, resizing, loading --------------------------------------------------------------------------


def test_tie_word_embeddings_builds_and_ties():
    model = _fresh(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    untied = _fresh()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_resize_token_embeddings_updates_config_and_loss():
    model = _fresh()
    old = model.config.text_config.vocab_size
    model.resize_token_embeddings(old + 13)
    assert model.config.text_config.vocab_size == old + 13
    input_ids, pixel_values = _inputs(model, text_ids=(old + 12, 7))
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
    assert out.logits.shape[-1] == old + 13 and torch.isfinite(out.loss)
    model.resize_token_embeddings(old - 16)
    assert model.lm_head.weight.shape[0] == old - 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_save_load_round_trip(tmp_path, model, dtype):
    model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = DeepseekVLHFForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.dtype == dtype
    reference = model.state_dict()
    assert reference.keys() == loaded.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())


def test_base_model_save_loads_into_the_lm_class_with_a_reported_new_head(tmp_path, model):
    """Training a new head on a base model: transformers initialises the missing head and reports it."""
    model.model.save_pretrained(tmp_path)
    loaded, info = DeepseekVLHFForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all("lm_head" in key for key in info["missing_keys"])
    assert torch.equal(loaded.model.aligner.layers[1].weight, model.model.aligner.layers[1].weight)
    base, info = DeepseekVLHFModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and isinstance(base, DeepseekVLHFModel)


def test_auto_map_covers_every_auto_class(tmp_path, tiny_pair):
    folder = save_checkpoint(*tiny_pair, tmp_path / "ckpt")
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_deepseek_vl_hf.DeepseekVLHFForCausalLM"
    assert auto_map["AutoModel"] == "modeling_deepseek_vl_hf.DeepseekVLHFModel"
    assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)).__name__ == (
        "DeepseekVLHFForCausalLM"
    )
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "DeepseekVLHFModel"
    assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__ == "DeepseekVLHFForCausalLM"


# --- context length and rope scaling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scaling", "allowed"),
    [(None, False), ({"rope_type": "linear", "factor": 2.0}, True), ({"rope_type": "dynamic", "factor": 2.0}, True)],
)
def test_context_guard_follows_rope_scaling(scaling, allowed):
    text = {"max_position_embeddings": 64}
    if scaling is not None:
        text["rope_scaling"] = scaling
        text["rope_parameters"] = {"rope_theta": 10000.0, **scaling}
    model = _fresh(text_config={**preset_config("tiny").text_config.to_dict(), **text})
    long_ids = torch.randint(6, 100, (1, 100))
    if allowed:
        with torch.no_grad():
            assert model(input_ids=long_ids).logits.shape[1] == 100
    else:
        with pytest.raises(ValueError, match="100 tokens .* over the model's context length 64"):
            model(input_ids=long_ids)


# --- batching and generation ------------------------------------------------------------------------------------


def test_left_padding_does_not_change_the_logits(model):
    input_ids, pixel_values = _inputs(model)
    padded = torch.cat([torch.full((1, 5), 2), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(input_ids)], dim=1)
    with torch.no_grad():
        plain = model(input_ids=input_ids, pixel_values=pixel_values).logits
        left = model(input_ids=padded, pixel_values=pixel_values, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(left, plain, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one(model):
    a, pa = _inputs(model, seed=1)
    b, pb = _inputs(model, seed=2, text_ids=(11, 12, 13))
    with torch.no_grad():
        batch = model(input_ids=torch.cat([a, b]), pixel_values=torch.cat([pa, pb])).logits
        single = torch.cat([model(input_ids=a, pixel_values=pa).logits, model(input_ids=b, pixel_values=pb).logits])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def _greedy(model, **kwargs):
    input_ids, pixel_values = _inputs(model)
    defaults = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        return model.generate(input_ids=input_ids, pixel_values=pixel_values, **{**defaults, **kwargs})


def test_greedy_generation_equals_a_manual_argmax_loop(model):
    input_ids, pixel_values = _inputs(model)
    ids = input_ids
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=ids, pixel_values=pixel_values).logits[:, -1]
            logits[:, 2] = -torch.inf  # min_new_tokens keeps EOS out
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(_greedy(model), ids)


def test_sampling_beam_search_and_num_return_sequences(model):
    torch.manual_seed(0)
    sampled = _greedy(model, do_sample=True, top_k=5, num_return_sequences=3)
    assert sampled.shape == (3, _inputs(model)[0].shape[1] + 5)
    beams = _greedy(model, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 2
    top_beam = _greedy(model, num_beams=3)
    assert torch.equal(beams[0], top_beam[0])


def test_assisted_decoding_with_itself_equals_greedy(model):
    """Assisted generation calls the target on the prompt and candidates with an empty cache: the images must
    go in on that call too."""
    assistant = copy.deepcopy(model)
    no_min = {"min_new_tokens": None}  # transformers 4.57 refuses a minimum length with assisted decoding
    assert torch.equal(_greedy(model, assistant_model=assistant, **no_min), _greedy(model, **no_min))


def test_generate_without_cache_recomputes_the_images(model):
    assert torch.equal(_greedy(model, use_cache=False), _greedy(model))


def test_static_cache_generation_equals_dynamic(model):
    assert torch.equal(_greedy(model, cache_implementation="static"), _greedy(model))


def test_decode_step_compiles_in_one_graph(model):
    """`_can_compile_fullgraph`: a decode step with a cache traces without graph breaks (the input checks run
    only outside compilation). The `eager` backend keeps this test fast; the graph is the same one inductor gets."""
    input_ids, pixel_values = _inputs(model)
    with torch.no_grad():
        prefill = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        cache = prefill.past_key_values
        next_ids = prefill.logits[:, -1:].argmax(-1)
        expected = model(input_ids=next_ids, past_key_values=copy.deepcopy(cache)).logits
        torch._dynamo.reset()
        step = torch.compile(lambda ids, c: model(input_ids=ids, past_key_values=c).logits, backend="eager",
                             fullgraph=True)
        got = step(next_ids, cache)
    torch.testing.assert_close(got, expected)
    assert model._can_compile_fullgraph


def test_cache_class_is_a_transformers_cache(model):
    input_ids, pixel_values = _inputs(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
    assert isinstance(out.past_key_values, DynamicCache)


# --- placement and training -------------------------------------------------------------------------------------


def test_device_map_auto_loads_and_matches(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = DeepseekVLHFForCausalLM.from_pretrained(tmp_path, device_map="auto")
    input_ids, pixel_values = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids, pixel_values=pixel_values).logits,
            model(input_ids=input_ids, pixel_values=pixel_values).logits,
        )


def test_training_with_and_without_labels():
    model = _fresh().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids, pixel_values = _inputs(model, batch=2)
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
    out.loss.backward()
    assert model.model.vision_model.siglip.patch_embed.proj.weight.grad is not None
    assert model.lm_head.weight.grad is not None
    no_labels = model(input_ids=input_ids, pixel_values=pixel_values)
    assert no_labels.loss is None
    no_labels.logits.float().mean().backward()
    assert model.model.vision_model.sam.patch_embed.proj.weight.grad.abs().sum() > 0
