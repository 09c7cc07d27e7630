"""The model: shapes, image/token merging, generation, attention implementations, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM, DeepseekVLVisionEncoder

from deepseek_vl_hf.presets import preset_config


def _inputs(model, n_images: int, text_ids=(7, 8, 9), batch: int = 1):
    cfg = model.config
    ids = [cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.num_image_tokens * n_images + list(text_ids)
    input_ids = torch.tensor([ids] * batch)
    pixel_values = torch.rand(n_images * batch, 3, cfg.image_size, cfg.image_size) if n_images else None
    return input_ids, pixel_values


@pytest.mark.parametrize("fixture", ["tiny_pair", "tiny_siglip_pair"])
def test_forward_shapes(fixture, request):
    model, _ = request.getfixturevalue(fixture)
    cfg = model.config
    input_ids, pixel_values = _inputs(model, n_images=2, batch=2)
    out = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
    assert out.logits.shape == (2, input_ids.shape[1], cfg.text_config.vocab_size)
    assert out.image_hidden_states.shape == (4, cfg.num_image_tokens, cfg.text_config.hidden_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    features = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(features, out.image_hidden_states)


def test_image_features_replace_image_token_embeddings(tiny_pair):
    """Changing the image changes logits after the image tokens only; the text-only prefix is unaffected."""
    model, _ = tiny_pair
    input_ids, pixel_values = _inputs(model, n_images=1)
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixel_values).logits
        b = model(input_ids=input_ids, pixel_values=torch.rand_like(pixel_values)).logits
    assert torch.equal(a[:, 0], b[:, 0])  # BOS position sees no image
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_image_token_count_mismatch_is_a_clear_error(tiny_pair):
    model, _ = tiny_pair
    input_ids, pixel_values = _inputs(model, n_images=2)
    with pytest.raises(ValueError, match=r"72 image tokens but 1 image\(s\) were given"):
        model(input_ids=input_ids, pixel_values=pixel_values[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[num_images, 3, 256, 256\]"):
        model(input_ids=input_ids, pixel_values=torch.rand(2, 3, 64, 64))


def test_7b_preset_vision_tower_gives_576_tokens():
    """The released hybrid shapes: SAM-B on 1024 + SigLIP-L on 384 -> 576 tokens, each 1024 wide."""
    config = preset_config("7b")
    assert config.num_image_tokens == 576
    tower = DeepseekVLVisionEncoder(config).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in tower.parameters())
    # SAM branch 96,356,609 (with neck_hd, downsamples, alpha) + SigLIP without its unused MAP head 303,688,704.
    assert n_params == 96_356_609 + 316_283_904 - 12_595_200
    with torch.inference_mode():
        low, high = tower(torch.rand(1, 3, 1024, 1024, dtype=torch.bfloat16))
    assert low.shape == (1, 576, 1024) and high.shape == (1, 576, 1024)
    assert torch.isfinite(low.float()).all() and torch.isfinite(high.float()).all()


def test_7b_adapter_width():
    config = preset_config("7b", {"text_config.num_hidden_layers": 1, "text_config.vocab_size": 128})
    model = DeepseekVLHFForCausalLM(config)
    aligner = model.model.aligner
    assert aligner.high_up_proj.weight.shape == (2048, 1024) and aligner.low_up_proj.weight.shape == (2048, 1024)
    assert aligner.layers[1].weight.shape == (4096, 4096)
    assert sum(p.numel() for p in aligner.parameters()) == 20_979_712


def test_sdpa_and_eager_agree(tiny_pair):
    model, _ = tiny_pair
    input_ids, pixel_values = _inputs(model, n_images=1)
    eager = DeepseekVLHFForCausalLM._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    assert eager.model.language_model.config._attn_implementation == "eager"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixel_values).logits
        b = eager(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_attention_without_flash_attn_is_a_clear_error(tiny_pair):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    with pytest.raises((ImportError, ValueError), match="FlashAttention2.*(not installed|doesn.t seem to be installed)"):
        DeepseekVLHFForCausalLM._from_config(copy.deepcopy(tiny_pair[0].config), attn_implementation="flash_attention_2")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pair):
    base, _ = tiny_pair
    input_ids, pixel_values = _inputs(base, n_images=1)

    def grads(model):
        model.train()
        model.zero_grad()
        model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = copy.deepcopy(base)
    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.model.vision_model.sam.gradient_checkpointing and ckpt.model.vision_model.siglip.gradient_checkpointing
    g_plain, g_ckpt = grads(plain), grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys()
    assert any(".sam.blocks." in n for n in g_ckpt) and any(".siglip.blocks." in n for n in g_ckpt)
    for name in g_plain:
        torch.testing.assert_close(g_plain[name], g_ckpt[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_split_modules_name_real_classes(tiny_pair):
    model, _ = tiny_pair
    names = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= names


def test_resize_token_embeddings(tiny_pair):
    model = copy.deepcopy(tiny_pair[0])
    old = model.config.text_config.vocab_size
    model.resize_token_embeddings(old + 8)
    assert model.get_input_embeddings().weight.shape[0] == old + 8
    assert model.lm_head.weight.shape[0] == old + 8
    input_ids, pixel_values = _inputs(model, n_images=1, text_ids=(old + 3,))
    assert model(input_ids=input_ids, pixel_values=pixel_values).logits.shape[-1] == old + 8


def test_generate_uses_pixels_only_on_prefill(tiny_pair, monkeypatch):
    model, _ = tiny_pair
    input_ids, pixel_values = _inputs(model, n_images=1)
    calls = []
    original = model.model.get_image_features

    def spy(pv, **kwargs):
        calls.append(pv.shape[0])
        return original(pv, **kwargs)

    monkeypatch.setattr(model.model, "get_image_features", spy)
    out = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=4, min_new_tokens=4, do_sample=False,
    )
    assert out.shape[1] == input_ids.shape[1] + 4
    assert calls == [1]


def test_decode_step_may_produce_the_image_token(tiny_pair):
    """A generated token that happens to be the image token id is text on the next step, not a missing image."""
    model, _ = tiny_pair
    input_ids, pixel_values = _inputs(model, n_images=1)
    with torch.no_grad():
        prefill = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        step = model(input_ids=torch.tensor([[model.config.image_token_id]]), past_key_values=prefill.past_key_values)
    assert step.logits.shape == (1, 1, model.config.text_config.vocab_size)
