"""Named model configurations: `tiny` for tests and the CPU demo, `1.3b` and `7b` for the released shapes."""

from __future__ import annotations

from typing import Any

from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig

# The released DeepSeek-LLM shapes (Llama architecture, untied head, vocabulary 102400).
_LLM_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=16384, rms_norm_eps=1e-6, vocab_size=102400,
)
_LLM_1_3B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-6, vocab_size=102400,
)
_SAM_B = dict(
    image_size=1024, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, window_size=14, global_attn_indexes=[2, 5, 8, 11], neck_channels=256,
    downsample_channels=[512, 1024], hd_block_index=2,
)
_SIGLIP_L_384 = dict(
    image_size=384, patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, select_layer=-1,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Test size (shapes of the "A" probe in shared/spec/cpu-feasibility.md): 36 image tokens per image.
    "tiny": dict(
        sam_config=dict(
            image_size=256, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, window_size=8, global_attn_indexes=[1], neck_channels=32,
            downsample_channels=[64, 64], hd_block_index=1,
        ),
        siglip_config=dict(
            image_size=96, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256,
        ),
        text_config=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, vocab_size=2048,
        ),
        aligner_type="hybrid_split_mlp",
    ),
    "tiny-siglip": dict(
        sam_config=None,
        siglip_config=dict(
            image_size=96, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256,
        ),
        text_config=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, vocab_size=2048,
        ),
        aligner_type="mlp",
    ),
    "1.3b": dict(sam_config=None, siglip_config=_SIGLIP_L_384, text_config=_LLM_1_3B, aligner_type="mlp"),
    "7b": dict(sam_config=_SAM_B, siglip_config=_SIGLIP_L_384, text_config=_LLM_7B, aligner_type="hybrid_split_mlp"),
}


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `tree["a"]["b"] = value` for `dotted_key` "a.b", creating missing levels."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[leaf] = value


def preset_config(name: str, overrides: dict[str, Any] | None = None, **config_kwargs: Any) -> DeepseekVLHFConfig:
    """Build the config of preset `name`; `overrides` maps dotted keys (e.g. `text_config.num_hidden_layers`)
    to values, which is how a random-weight 7b-shape model gets a small LLM."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return DeepseekVLHFConfig(**tree, **config_kwargs)
