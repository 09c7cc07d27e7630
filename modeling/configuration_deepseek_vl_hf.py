"""Configuration of DeepSeek-VL (hybrid SAM-B + SigLIP-L vision encoder, MLP adapter, Llama LLM).

Hub remote code: this file imports only transformers and the standard library, and works on
transformers 4.57.x and 5.x.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ALIGNER_TYPES = ("hybrid_split_mlp", "mlp")
FORMAT_VERSION = 1
# The Auto classes a saved folder maps to the remote code: `AutoModelForImageTextToText` is what
# `pipeline("image-text-to-text")` loads; `AutoModel` gives the base model (no LM head).
MODEL_AUTO_MAP = {
    "AutoModel": "modeling_deepseek_vl_hf.DeepseekVLHFModel",
    "AutoModelForCausalLM": "modeling_deepseek_vl_hf.DeepseekVLHFForCausalLM",
    "AutoModelForImageTextToText": "modeling_deepseek_vl_hf.DeepseekVLHFForCausalLM",
}


class DeepseekVLSiglipConfig(PretrainedConfig):
    r"""The low-resolution branch: a SigLIP ViT without class token or pooling head.

    Args:
        image_size (`int`): side of the square image the branch sees (384 released). In the hybrid model the
            1024 input is resized to this size inside the model.
        patch_size (`int`): ViT patch size; the branch yields `(image_size // patch_size) ** 2` tokens.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ViT width, depth, heads, MLP width.
        select_layer (`int`): which block's output is used, DeepSeek-VL semantics: `<= 0` keeps
            `depth + select_layer + 1` blocks, `> 0` keeps `select_layer` blocks; the final LayerNorm is applied
            after the last kept block either way. Released: -1 (all blocks).
        image_mean, image_std: normalisation applied inside the model to [0, 1] pixels.
    """

    model_type = "deepseek_vl_hf_siglip"

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 16,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        layer_norm_eps: float = 1e-6,
        select_layer: int = -1,
        image_mean: tuple[float, ...] | list[float] = SIGLIP_MEAN,
        image_std: tuple[float, ...] | list[float] = SIGLIP_STD,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.select_layer = select_layer
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the branch's output grid."""
        return self.image_size // self.patch_size

    @property
    def num_kept_layers(self) -> int:
        """Number of transformer blocks that run, from `select_layer`."""
        if self.select_layer <= 0:
            return min(self.num_hidden_layers, self.num_hidden_layers + self.select_layer + 1)
        return min(self.num_hidden_layers, self.select_layer)


class DeepseekVLSamConfig(PretrainedConfig):
    r"""The high-resolution branch: a SAM-B ViT with its neck, resampled and downsampled to the SigLIP grid.

    Args:
        image_size (`int`): side of the square input (1024 released).
        patch_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ViT shape.
        window_size (`int`): side of the attention windows of the non-global blocks.
        global_attn_indexes (`list[int]`): blocks with global attention (the others are windowed).
        neck_channels (`int`): output channels of the SAM neck.
        downsample_channels (`list[int]`): output channels of the stride-2 3x3 convolutions after the neck;
            the last one is the branch's token width.
        hd_block_index (`int` or `None`): block whose output feeds the second neck (`neck_hd`), scaled by the
            zero-initialised `hd_alpha_downsamples`; `None` disables that path.
        image_mean, image_std: normalisation applied inside the model to [0, 1] pixels.
    """

    model_type = "deepseek_vl_hf_sam"

    def __init__(
        self,
        image_size: int = 1024,
        patch_size: int = 16,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-6,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] | list[int] = (2, 5, 8, 11),
        neck_channels: int = 256,
        downsample_channels: tuple[int, ...] | list[int] = (512, 1024),
        hd_block_index: int | None = 2,
        image_mean: tuple[float, ...] | list[float] = CLIP_MEAN,
        image_std: tuple[float, ...] | list[float] = CLIP_STD,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.window_size = window_size
        self.global_attn_indexes = list(global_attn_indexes)
        self.neck_channels = neck_channels
        self.downsample_channels = list(downsample_channels)
        self.hd_block_index = hd_block_index
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(**kwargs)

    @property
    def output_channels(self) -> int:
        """Width of the branch's tokens."""
        return self.downsample_channels[-1]


def _as_config(value, cls, name: str):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**{k: v for k, v in value.items() if k != "model_type"})
    if isinstance(value, PretrainedConfig):
        return cls(**value.to_dict())
    raise TypeError(f"{name} must be a dict or {cls.__name__}, got {type(value).__name__}")


class DeepseekVLHFConfig(PretrainedConfig):
    r"""Configuration of [`DeepseekVLHFForCausalLM`].

    Args:
        siglip_config (`dict` or [`DeepseekVLSiglipConfig`]): the SigLIP (low-resolution) branch.
        sam_config (`dict`, [`DeepseekVLSamConfig`] or `None`): the SAM-B (high-resolution) branch; `None` builds
            the SigLIP-only variant (the 1.3B release).
        text_config (`dict` or `LlamaConfig`): the language model.
        aligner_type (`str`, *optional*): `"hybrid_split_mlp"` (two up-projections to half the LLM width,
            concatenated [high, low]) or `"mlp"` (SigLIP-only); by default the one that fits `sam_config`.
        aligner_depth (`int`): number of Linear layers after the up-projection stage counts as one (released: 2).
        image_token_id (`int`): id of the `<image_placeholder>` token; each one stands for one image token.
        format_version (`int`): version of this config layout; a newer one than this code knows is refused.
    """

    model_type = "deepseek_vl_hf"
    sub_configs = {"siglip_config": DeepseekVLSiglipConfig, "sam_config": DeepseekVLSamConfig, "text_config": LlamaConfig}

    def __init__(
        self,
        siglip_config: dict | DeepseekVLSiglipConfig | None = None,
        sam_config: dict | DeepseekVLSamConfig | None = None,
        text_config: dict | LlamaConfig | None = None,
        aligner_type: str | None = None,
        aligner_depth: int = 2,
        image_token_id: int = 100015,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint's config has format_version {format_version}, but this code reads format "
                f"versions up to {FORMAT_VERSION}. Upgrade deepseek-vl-hf (or use the remote code shipped with the "
                "checkpoint) to load it."
            )
        self.siglip_config = _as_config(siglip_config, DeepseekVLSiglipConfig, "siglip_config") or DeepseekVLSiglipConfig()
        self.sam_config = _as_config(sam_config, DeepseekVLSamConfig, "sam_config")
        if text_config is None:
            text_config = LlamaConfig()
        elif isinstance(text_config, dict):
            text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        if aligner_type is None:
            aligner_type = "mlp" if self.sam_config is None else "hybrid_split_mlp"
        if aligner_type not in ALIGNER_TYPES:
            raise ValueError(f"aligner_type must be one of {ALIGNER_TYPES}, got {aligner_type!r}")
        if aligner_type == "hybrid_split_mlp" and self.sam_config is None:
            raise ValueError("aligner_type 'hybrid_split_mlp' needs a sam_config; use 'mlp' for the SigLIP-only variant")
        if aligner_type == "mlp" and self.sam_config is not None:
            raise ValueError("aligner_type 'mlp' is the SigLIP-only adapter; use 'hybrid_split_mlp' with a sam_config")
        if aligner_depth < 1:
            raise ValueError(f"aligner_depth must be >= 1, got {aligner_depth}")
        self.aligner_type = aligner_type
        self.aligner_depth = aligner_depth
        self.image_token_id = image_token_id
        self.format_version = format_version
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        # transformers 4.x reads the text config's flag when tying the LM head to the input embeddings.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
        self._check_token_grids()
        self._complete_auto_map()

    def _complete_auto_map(self) -> None:
        """Add the model Auto classes missing from `auto_map`, with the repo prefix ("owner/name--") its other
        entries use, so a folder saved by an older version still loads with every Auto class."""
        auto_map = dict(getattr(self, "auto_map", None) or {})
        known = next(iter(auto_map.values()), "")
        known = known[0] if isinstance(known, (list, tuple)) else known
        prefix = known.split("--")[0] + "--" if "--" in (known or "") else ""
        for auto_class, reference in MODEL_AUTO_MAP.items():
            auto_map.setdefault(auto_class, prefix + reference)
        self.auto_map = auto_map

    def _check_token_grids(self) -> None:
        if self.sam_config is None:
            return
        sam_grid = self.sam_config.image_size // self.sam_config.patch_size
        if sam_grid * self.sam_config.patch_size != self.sam_config.image_size:
            raise ValueError("sam_config.image_size must be a multiple of sam_config.patch_size")
        if self.siglip_config.image_size > self.sam_config.image_size:
            raise ValueError("the SigLIP branch resizes the SAM input down: siglip image_size must be <= sam image_size")

    @property
    def image_size(self) -> int:
        """Side of the square `pixel_values` the model takes (1024 hybrid, 384 SigLIP-only)."""
        return self.sam_config.image_size if self.sam_config is not None else self.siglip_config.image_size

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image: the SigLIP grid, which the SAM branch is resampled to (576 released)."""
        return self.siglip_config.grid_size**2

    @property
    def is_hybrid(self) -> bool:
        return self.sam_config is not None

    def to_dict(self) -> dict:
        output = super().to_dict()
        for key in ("siglip_config", "sam_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if value is not None else None
        return output


DeepseekVLHFConfig.register_for_auto_class()
