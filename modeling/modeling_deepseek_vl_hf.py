"""DeepSeek-VL for causal LM: hybrid SAM-B + SigLIP-L vision encoder, MLP adapter and a Llama LLM.

Hub remote code: imports only torch, timm, transformers and the config beside it; works on transformers
4.57.x and 5.x. The vision backbones are built from timm's blocks, the LLM is transformers' `LlamaModel`,
so the attention implementations of the LLM (eager / sdpa / flash_attention_2) come from transformers.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import struct
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
import transformers
from timm.layers import LayerNorm2d, PatchEmbed
from timm.models.vision_transformer import Block as TimmViTBlock
from timm.models.vision_transformer_sam import Attention as TimmSamAttention
from timm.models.vision_transformer_sam import Block as TimmSamBlock
from timm.models.vision_transformer_sam import get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, LlamaModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)

from .configuration_deepseek_vl_hf import DeepseekVLHFConfig, DeepseekVLSamConfig, DeepseekVLSiglipConfig

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

# transformers 5 renamed `past_key_values` to `cache` in forward signatures and outputs.
_LLM_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _return_dict(config: PretrainedConfig, return_dict: bool | None) -> bool:
    """`return_dict` as given, else the config's default."""
    return bool(return_dict if return_dict is not None else getattr(config, "return_dict", True))


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _context_limit(text_config: PretrainedConfig) -> int | None:
    """The longest sequence the LLM's positions support: `max_position_embeddings`, extended by rope scaling
    (linear / yarn / longrope: times `factor`; dynamic NTK: no fixed limit -> `None`)."""
    limit = text_config.max_position_embeddings
    scaling = getattr(text_config, "rope_scaling", None) or getattr(text_config, "rope_parameters", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return limit
    if rope_type == "dynamic":
        return None
    base = scaling.get("original_max_position_embeddings") or limit
    return max(limit, int(base * float(scaling.get("factor", 1.0))))


def _normalize(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """[0, 1] pixels -> (x - mean) / std per channel, in the input's dtype."""
    mean_t = torch.tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
    return torch.sub(pixel_values, mean_t).div_(std_t)  # one new tensor, the same values as `(x - mean) / std`


def _resize_fp32(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """Bilinear resize computed in float32 (no bf16 antialias kernel on CPU), returned in the input dtype."""
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return out.to(x.dtype)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file, the key(s) and the fix."""


_REDOWNLOAD = "re-download or re-convert the checkpoint"
_CHECK_CONFIG = "check that config.json belongs to these weights, or re-convert the checkpoint"


def _listed(keys: list[str], limit: int = 5) -> str:
    """`a, b, c` or `a, b, c, ... (12 in all)`: enough keys to find the problem, without flooding."""
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header (8-byte little-endian length + JSON), data unread.

    Raises `CheckpointError` when the file is shorter than its header says (truncated) or the header is not
    valid safetensors JSON (corrupt).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: the file is truncated or corrupt ({size} bytes, too short for the safetensors header "
                f"length it starts with); {_REDOWNLOAD}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in entries.items()}
        ends = {k: int(v["data_offsets"][1]) for k, v in entries.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: the safetensors header is corrupt ({type(err).__name__}: {err}); {_REDOWNLOAD}"
        ) from err
    data_size = size - 8 - header_len
    cut = [key for key, end in ends.items() if end > data_size]
    if cut:
        raise CheckpointError(
            f"{path}: the file is truncated ({size} bytes, its header needs {8 + header_len + max(ends.values())}); "
            f"tensors cut off: {_listed(cut)}; {_REDOWNLOAD}"
        )
    return shapes


def _checkpoint_tensors(folder: str) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """{key: (shape, file)} of a local safetensors checkpoint (single file or index + shards); None if neither."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index_path):
        single = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(single):
            return None
        return {key: (shape, single) for key, shape in _safetensors_shapes(single).items()}
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{index_path}: the index is corrupt ({type(err).__name__}: {err}); {_REDOWNLOAD}") from err
    missing = sorted(shard for shard in shards if not os.path.isfile(os.path.join(folder, shard)))
    if missing:
        keys = [key for shard in missing for key in shards[shard]]
        raise CheckpointError(
            f"{folder}: shard(s) {', '.join(missing)} named in model.safetensors.index.json are missing (they hold "
            f"{_listed(keys)}); the download or conversion is incomplete: {_REDOWNLOAD}"
        )
    tensors = {}
    for shard, keys in shards.items():
        path = os.path.join(folder, shard)
        shapes = _safetensors_shapes(path)
        absent = [key for key in keys if key not in shapes]
        if absent:
            raise CheckpointError(
                f"{path}: model.safetensors.index.json places {_listed(absent)} in this shard but it does not hold "
                f"them; the shards and the index do not belong together: {_REDOWNLOAD}"
            )
        tensors.update({key: (shapes[key], path) for key in keys})
    return tensors


class _CheckpointedBlocks(nn.Module):
    """Runs `self.blocks` in order, through activation checkpointing when enabled and training."""

    gradient_checkpointing = False

    def _run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            fn = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            return fn(block.__call__, hidden)
        return block(hidden)


class DeepseekVLSiglipBlock(TimmViTBlock):
    """timm ViT block (pre-norm, exact GELU); a named subclass so FSDP auto-wrap can target it."""

    def attention_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block's softmax attention `[B, heads, T, T]` for its input `hidden` `[B, T, C]` (eager maths)."""
        attn = self.attn
        batch, tokens, _ = hidden.shape
        qkv = attn.qkv(self.norm1(hidden)).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)


# Bytes of SAM's relative-position attention bias built at a time. The full bias of a global block is
# [heads, 4096, 4096] (805 MB in fp32): built whole it is written to freshly mapped pages every block (page faults
# cost more than the arithmetic) and read back from memory. Built in chunks, one reused buffer stays in cache.
_SAM_BIAS_CHUNK_BYTES = 8 * 2**20


def _chunk_steps(groups: int, heads: int, rows: int, row_bytes: int) -> tuple[int, int, int]:
    """(groups, heads, query rows) per chunk so that one chunk of the bias holds at most `_SAM_BIAS_CHUNK_BYTES`."""
    problem = rows * row_bytes  # one group, one head, all query rows
    if problem > _SAM_BIAS_CHUNK_BYTES:
        return 1, 1, max(1, _SAM_BIAS_CHUNK_BYTES // row_bytes)
    head_step = min(heads, _SAM_BIAS_CHUNK_BYTES // problem)
    group_step = max(1, _SAM_BIAS_CHUNK_BYTES // (problem * heads)) if head_step == heads else 1
    return min(groups, group_step), head_step, rows


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention` as its CPU math path computes it (in fp32; same values and gradients), less
    `_safe_softmax`'s three extra passes over the scores for fully masked rows, which a finite bias never has."""
    dtype, scale = q.dtype, math.sqrt(1 / math.sqrt(q.shape[-1]))
    q, k, v, attn_mask = (t.float() for t in (q, k, v, attn_mask))
    scores = torch.matmul(q * scale, k.transpose(-2, -1) * scale).add_(attn_mask)
    return torch.matmul(torch.softmax(scores, -1), v).to(dtype)


def _rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    grid: int,
    eager: bool = False,
) -> torch.Tensor:
    """SAM attention with decomposed relative positions over `grid` x `grid` tokens, `[G, heads, grid^2, dim]`.

    Equals `softmax(q k^T / sqrt(dim) + bias) v` with `bias[i, j] = q_i . R_h[row_i, row_j] + q_i . R_w[col_i,
    col_j]` (timm's `get_decomposed_rel_pos_bias`), with the bias built and used chunk by chunk. `eager` always
    takes the written-out math path (the model's "eager" attention implementation).
    """
    groups, heads, tokens, dim = q.shape
    r_q = q.reshape(groups, heads, grid, grid, dim)
    rel_h = torch.einsum("gnhwc,hkc->gnhwk", r_q, get_rel_pos(grid, grid, rel_pos_h)).contiguous()
    rel_w = torch.einsum("gnhwc,wkc->gnhwk", r_q, get_rel_pos(grid, grid, rel_pos_w)).contiguous()
    steps = _chunk_steps(groups, heads, grid, grid * tokens * q.element_size())
    track_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_pos_h, rel_pos_w))
    # On CPU, SDPA with a bias that needs gradients takes its math path: written out, it skips three passes.
    math_path = eager or (track_grad and q.device.type == "cpu")
    attention = _math_attention if math_path else F.scaled_dot_product_attention

    def attend(gs: slice, hs: slice, rows: slice, buffer: torch.Tensor | None) -> torch.Tensor:
        """Attention of query rows `rows`, groups `gs`, heads `hs`; the bias goes into `buffer` when one is given."""
        terms = (rel_h[gs, hs, rows, :, :, None], rel_w[gs, hs, rows, :, None, :])
        if buffer is None:
            bias = torch.add(*terms)
        else:
            bias = torch.add(*terms, out=buffer[: terms[0].shape[0], : terms[0].shape[1], : terms[0].shape[2]])
        queries = slice(rows.start * grid, rows.stop * grid)
        bias = bias.reshape(bias.shape[0], bias.shape[1], -1, tokens)
        return attention(q[gs, hs, queries], k[gs, hs], v[gs, hs], attn_mask=bias)

    if steps == (groups, heads, grid):  # one chunk: the whole bias, and no output buffer to copy into
        return attend(slice(0, groups), slice(0, heads), slice(0, grid), None)
    group_step, head_step, row_step = steps
    # Without autograd one bias buffer serves every chunk; autograd needs an out-of-place bias per chunk.
    buffer = None if track_grad else q.new_empty(group_step, head_step, row_step, grid, grid, grid)
    out = q.new_empty(groups, heads, tokens, dim)
    for g in range(0, groups, group_step):
        for h in range(0, heads, head_step):
            for r in range(0, grid, row_step):
                rows = slice(r, r + row_step)
                out[g : g + group_step, h : h + head_step, r * grid : (r + row_step) * grid] = attend(
                    slice(g, g + group_step), slice(h, h + head_step), rows, buffer
                )
    return out


class DeepseekVLSamAttention(TimmSamAttention):
    """timm's SAM attention, reorganised for speed: the relative-position bias is built in chunks
    (`_rel_pos_attention`), and windowed attention projects q/k/v and the output on the unpadded tokens only.

    Its parameters are read inside its own `forward` (and the qkv bias through `qkv`), so accelerate's offload
    hooks load each of them before use when a `device_map` places the block on another device or on disk.
    """

    def forward(self, x: torch.Tensor, window_size: int = 0, eager: bool = False) -> torch.Tensor:
        """`[B, H, W, C]` normalised tokens -> attention output after `proj`; `window_size` 0 is global attention,
        `eager` forces the written-out math path."""
        batch, height, width, channels = x.shape
        qkv = self.qkv(x)
        if window_size == 0:  # global attention over the (square) token grid
            q, k, v = qkv.view(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            out = _rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, height, eager=eager)
            out = out.transpose(1, 2).reshape(batch, height, width, channels)
        else:
            out = self._window_attention(qkv, window_size, eager)
        return self.proj(out)

    def _window_attention(self, qkv: torch.Tensor, size: int, eager: bool) -> torch.Tensor:
        """Attention within `size` x `size` windows of the `[B, H, W, 3C]` projections -> `[B, H, W, C]`.

        timm pads the normalised tokens with zeros before projecting; the projection of a zero token is the
        qkv bias, so padding the projections with it gives the same windows.
        """
        batch, height, width, channels3 = qkv.shape
        heads = self.num_heads
        padded_h, padded_w = -(-height // size) * size, -(-width // size) * size
        if (padded_h, padded_w) != (height, width):
            fill = self.qkv(qkv.new_zeros(1, channels3 // 3))[0]  # exactly the bias (zeros without one)
            padded = fill.expand(batch, padded_h, padded_w, channels3).clone()
            padded[:, :height, :width] = qkv
            qkv = padded
        rows, cols = padded_h // size, padded_w // size
        windows = qkv.view(batch, rows, size, cols, size, 3, heads, -1).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = windows.reshape(3, batch * rows * cols, heads, size * size, -1).unbind(0)
        out = _rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, size, eager=eager)
        out = out.view(batch, rows, cols, heads, size, size, -1).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, padded_h, padded_w, channels3 // 3)[:, :height, :width]


class DeepseekVLSamBlock(TimmSamBlock):
    """timm SAM block (windowed or global attention with decomposed relative positions), for FSDP auto-wrap,
    with `DeepseekVLSamAttention` (same parameters as timm's). `eager_attention` (set by the encoder from its
    config's attention implementation) forces the math path."""

    eager_attention = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn.__class__ = DeepseekVLSamAttention  # a subclass adding no state: the same parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.window_size, self.eager_attention)
        return x + self.mlp(self.norm2(x))


class DeepseekVLSiglipEncoder(_CheckpointedBlocks):
    """SigLIP ViT trunk: patch embedding, learned positions, the kept blocks and the final LayerNorm.

    Input `[B, 3, S, S]` normalised pixels (S = `config.image_size`); output `[B, (S/patch)^2, hidden]`.
    """

    def __init__(self, config: DeepseekVLSiglipConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, 3, config.hidden_size, bias=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2, config.hidden_size))
        norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            DeepseekVLSiglipBlock(
                dim=config.hidden_size,
                num_heads=config.num_attention_heads,
                mlp_ratio=config.intermediate_size / config.hidden_size,
                qkv_bias=True,
                norm_layer=norm_layer,
                act_layer=nn.GELU,
            )
            for _ in range(config.num_kept_layers)
        )
        self.norm = norm_layer(config.hidden_size)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutputWithPast:
        """`last_hidden_state [B, T, C]` after the final LayerNorm; `hidden_states` (embeddings + each kept block)
        and `attentions` (`[B, heads, T, T]` per block) when asked for. `config._attn_implementation == "eager"`
        runs timm's unfused attention, anything else its SDPA path."""
        fused = getattr(self.config, "_attn_implementation", None) != "eager"
        hidden = self.patch_embed(pixel_values) + self.pos_embed.to(pixel_values.device)
        all_hidden = [hidden] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for block in self.blocks:
            block.attn.fused_attn = fused
            if output_attentions:
                all_attentions.append(block.attention_weights(hidden))
            hidden = self._run_block(block, hidden)
            if output_hidden_states:
                all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


class DeepseekVLSamEncoder(_CheckpointedBlocks):
    """SAM-B image encoder with its neck, resampled and downsampled to the SigLIP token grid.

    Input `[B, 3, S, S]` normalised pixels (S = `config.image_size`); output `[B, grid^2, downsample_channels[-1]]`
    where `grid = output_grid`. `neck -> bilinear resize to grid * 2^n -> n stride-2 convs`; when `hd_block_index`
    is set, that block's output goes through `neck_hd` and the same convs, scaled by `hd_alpha_downsamples`.
    """

    def __init__(self, config: DeepseekVLSamConfig, output_grid: int):
        super().__init__()
        self.config = config
        self.output_grid = output_grid
        grid = config.image_size // config.patch_size
        self.patch_embed = PatchEmbed(
            config.image_size, config.patch_size, 3, config.hidden_size, bias=True, output_fmt="NHWC"
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size))
        norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            DeepseekVLSamBlock(
                dim=config.hidden_size,
                num_heads=config.num_attention_heads,
                mlp_ratio=config.intermediate_size / config.hidden_size,
                qkv_bias=True,
                norm_layer=norm_layer,
                act_layer=nn.GELU,
                use_rel_pos=True,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                input_size=(grid, grid),
            )
            for i in range(config.num_hidden_layers)
        )
        self.neck = self._build_neck(config)
        self.neck_hd = self._build_neck(config) if config.hd_block_index is not None else None
        channels = [config.neck_channels, *config.downsample_channels]
        self.downsamples = nn.Sequential(
            *(
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
                for c_in, c_out in zip(channels[:-1], channels[1:])
            )
        )
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1)) if config.hd_block_index is not None else None

    @staticmethod
    def _build_neck(config: DeepseekVLSamConfig) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(config.hidden_size, config.neck_channels, kernel_size=1, bias=False),
            LayerNorm2d(config.neck_channels, eps=config.layer_norm_eps),
            nn.Conv2d(config.neck_channels, config.neck_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.neck_channels, eps=config.layer_norm_eps),
        )

    def _downsample(self, neck_out: torch.Tensor) -> torch.Tensor:
        size = self.output_grid * 2 ** len(self.downsamples)
        return self.downsamples(_resize_fp32(neck_out, size, antialias=False))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The encoder's own parameters (pos_embed, hd_alpha_downsamples) follow the activations explicitly: with a
        # device_map that splits the encoder, its submodules (and their outputs) may sit on other devices.
        hidden = self.patch_embed(pixel_values)
        hidden = hidden + self.pos_embed.to(hidden.device)
        hd_hidden = None
        eager = getattr(self.config, "_attn_implementation", None) == "eager"
        for index, block in enumerate(self.blocks):
            block.eager_attention = eager
            hidden = self._run_block(block, hidden)
            if index == self.config.hd_block_index:
                hd_hidden = hidden
        features = self._downsample(self.neck(hidden.permute(0, 3, 1, 2)))
        if hd_hidden is not None:
            hd_features = self._downsample(self.neck_hd(hd_hidden.permute(0, 3, 1, 2))).to(features.device)
            features = features + hd_features * self.hd_alpha_downsamples.to(features.device)
        return features.flatten(2).transpose(1, 2)


class DeepseekVLVisionEncoder(nn.Module):
    """The vision tower: SigLIP alone, or SAM-B (high resolution) + SigLIP (low resolution) on one image.

    Takes `[N, 3, S, S]` pixels in [0, 1] and normalises each branch with its own mean/std. Returns the SigLIP
    tokens `[N, T, C_low]` and, for the hybrid tower, the SAM tokens `[N, T, C_high]` (else `None`).
    """

    def __init__(self, config: DeepseekVLHFConfig):
        super().__init__()
        self.config = config
        self.siglip = DeepseekVLSiglipEncoder(config.siglip_config)
        self.sam = (
            DeepseekVLSamEncoder(config.sam_config, config.siglip_config.grid_size) if config.is_hybrid else None
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        low, high = self.encode(pixel_values)
        return low.last_hidden_state, high

    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> tuple[BaseModelOutputWithPast, torch.Tensor | None]:
        """The SigLIP branch's outputs (with its hidden states / attentions when asked for) and the SAM tokens."""
        # Resize and normalise in fp32, then cast to the towers' dtype: [0, 1] pixels cast to bf16 first lose
        # precision that the normalisation then amplifies (as a processor that normalises in fp32 does not).
        dtype, pixels = self.siglip.pos_embed.dtype, pixel_values.float()
        siglip_cfg = self.config.siglip_config
        low_input = pixels
        if pixels.shape[-1] != siglip_cfg.image_size:
            low_input = _resize_fp32(pixels, siglip_cfg.image_size, antialias=True)
        low = self.siglip(  # through __call__, so accelerate's offload hooks on the encoder run
            _normalize(low_input, siglip_cfg.image_mean, siglip_cfg.image_std).to(dtype),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        high = None
        if self.sam is not None:
            sam_cfg = self.config.sam_config
            high = self.sam(_normalize(pixels, sam_cfg.image_mean, sam_cfg.image_std).to(dtype))
        return low, high


class DeepseekVLAligner(nn.Module):
    """The VL adapter: vision tokens -> LLM embeddings `[N, T, hidden]`.

    `hybrid_split_mlp`: `high_up_proj` (SAM) and `low_up_proj` (SigLIP) to hidden/2 each, concatenated [high, low],
    then (depth-1) x [GELU, Linear]. `mlp`: Linear(SigLIP width, hidden) then (depth-1) x [GELU, Linear].
    """

    def __init__(self, config: DeepseekVLHFConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.aligner_type = config.aligner_type
        layers: list[nn.Module] = []
        if config.aligner_type == "hybrid_split_mlp":
            self.high_up_proj = nn.Linear(config.sam_config.output_channels, hidden // 2)
            self.low_up_proj = nn.Linear(config.siglip_config.hidden_size, hidden - hidden // 2)
        else:
            layers.append(nn.Linear(config.siglip_config.hidden_size, hidden))
        for _ in range(config.aligner_depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.layers = nn.Sequential(*layers)

    def forward(self, low: torch.Tensor, high: torch.Tensor | None = None) -> torch.Tensor:
        if self.aligner_type == "hybrid_split_mlp":
            if high is None:
                raise ValueError("the hybrid_split_mlp adapter needs the SAM branch's tokens")
            low = torch.cat([self.high_up_proj(high), self.low_up_proj(low)], dim=-1)
        return self.layers(low)


@dataclass
class DeepseekVLHFModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` of the LLM plus `image_hidden_states`: the adapter outputs `[num_images, T, hidden]`
    of the images merged in this call (`None` when there were none)."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class DeepseekVLHFCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `image_hidden_states`: the adapter outputs `[num_images, T, hidden]`."""

    image_hidden_states: torch.FloatTensor | None = None


class DeepseekVLHFPreTrainedModel(PreTrainedModel):
    config_class = DeepseekVLHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "DeepseekVLSiglipBlock", "DeepseekVLSamBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_attention_backend = True
    _supports_cache_class = True
    _supports_static_cache = True
    _supports_flex_attn = True
    # The forward has no data-dependent Python branches once compiling (the input checks run eagerly only).
    _can_compile_fullgraph = True
    input_modalities = ("image", "text")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs
    ) -> DeepseekVLHFPreTrainedModel:
        """`PreTrainedModel.from_pretrained`, after checking a local folder's safetensors headers against the config.

        Truncated or corrupt files, missing shards, missing or unexpected keys and wrong shapes raise a
        `CheckpointError` naming the file and key, instead of a bare deserialisation error or random weights.
        """
        folder = pretrained_model_name_or_path
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
            folder = os.path.normpath(os.path.join(folder, kwargs.get("subfolder", "")))
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                config = cls.config_class.from_pretrained(config or folder)
            cls.check_checkpoint(folder, config, kwargs.get("ignore_mismatched_sizes", False))
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = cls._with_quantization_skips(kwargs["quantization_config"])
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # Quantizing loaders (TorchAoConfig, BitsAndBytesConfig) convert only the language model's linear layers: the
    # vision towers and the adapter keep the compute dtype, as does the LM head (transformers' own default, which an
    # explicit list replaces). Both name forms: the causal LM's (`model.`-prefixed) and the base model's.
    _quantization_skip_modules = ("model.vision_model", "model.aligner", "vision_model", "aligner", "lm_head")

    @classmethod
    def _with_quantization_skips(cls, quantization_config: object) -> object:
        """A copy of a quantization config object whose unset skip list becomes `_quantization_skip_modules`."""
        for field in ("modules_to_not_convert", "llm_int8_skip_modules"):
            if hasattr(quantization_config, field) and getattr(quantization_config, field) is None:
                quantization_config = copy.copy(quantization_config)
                setattr(quantization_config, field, list(cls._quantization_skip_modules))
                break
        return quantization_config

    @classmethod
    def check_checkpoint(
        cls, folder: str | os.PathLike, config: DeepseekVLHFConfig, ignore_mismatched_sizes: bool = False
    ) -> None:
        """Compare a local folder's tensors (safetensors headers only) with the state dict `cls(config)` has.

        Raises `CheckpointError`; the model skeleton is built on the meta device, so nothing is allocated.
        """
        found = _checkpoint_tensors(folder)
        if found is None or getattr(config, "quantization_config", None) is not None:
            return  # no safetensors here, or a quantizer's own tensor layout: transformers reports what it finds
        with torch.device("meta"):
            skeleton = cls(copy.deepcopy(config))
        expected = {key: tuple(t.shape) for key, t in skeleton.state_dict().items()}
        prefix = cls.base_model_prefix + "."
        head_model = hasattr(skeleton, cls.base_model_prefix)
        prefixed = any(key.startswith(prefix) for key in found)
        if head_model and not prefixed:  # a base-model checkpoint loaded with a head
            found = {prefix + key: value for key, value in found.items()}
        elif not head_model and prefixed:  # a full checkpoint loaded as the base model: the head is left out
            found = {key[len(prefix) :]: value for key, value in found.items() if key.startswith(prefix)}
        # Missing tensors are initialised and unexpected ones dropped by transformers, which reports both (its load
        # report; `missing_keys` / `unexpected_keys` with `output_loading_info=True`), e.g. a base-model save loaded
        # with a head to train.
        wrong = [key for key, shape in expected.items() if key in found and found[key][0] != shape]
        if wrong and not ignore_mismatched_sizes:
            details = "; ".join(
                f"{key} is {list(found[key][0])} in {found[key][1]}, config.json implies {list(expected[key])}"
                for key in sorted(wrong)[:3]
            )
            raise CheckpointError(f"{len(wrong)} tensor shape(s) do not match: {details}; {_CHECK_CONFIG}")

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, (DeepseekVLSiglipEncoder, DeepseekVLSamEncoder)):
            init.trunc_normal_(module.pos_embed, std=std)
        if isinstance(module, DeepseekVLSamEncoder) and module.hd_alpha_downsamples is not None:
            init.zeros_(module.hd_alpha_downsamples)
        if isinstance(module, DeepseekVLSamBlock):
            init.zeros_(module.attn.rel_pos_h)
            init.zeros_(module.attn.rel_pos_w)


class DeepseekVLHFModel(DeepseekVLHFPreTrainedModel):
    """Vision encoder + adapter + `LlamaModel`, without the LM head."""

    def __init__(self, config: DeepseekVLHFConfig):
        super().__init__(config)
        self.vision_model = DeepseekVLVisionEncoder(config)
        self.aligner = DeepseekVLAligner(config)
        self.language_model = LlamaModel._from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode images: `[N, 3, S, S]` pixels in [0, 1] -> `BaseModelOutputWithPooling` whose `pooler_output` holds
        the adapter outputs `[N, num_image_tokens, hidden]` (what replaces the image tokens), `last_hidden_state` the
        SigLIP tokens `[N, T, C]`, and `hidden_states` / `attentions` of the SigLIP tower when asked for."""
        expected = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (expected, expected):
            raise ValueError(
                f"pixel_values must have shape [num_images, 3, {expected}, {expected}], got {tuple(pixel_values.shape)}; "
                "prepare images with this model's image processor"
            )
        low, high = self.vision_model.encode(
            pixel_values,
            output_hidden_states=bool(output_hidden_states if output_hidden_states is not None
                                      else self.config.output_hidden_states),
            output_attentions=bool(output_attentions if output_attentions is not None
                                   else self.config.output_attentions),
        )
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=low.last_hidden_state,
            pooler_output=self.aligner(low.last_hidden_state, high),
            hidden_states=low.hidden_states,
            attentions=low.attentions,
        )
        return outputs if _return_dict(self.config, return_dict) else outputs.to_tuple()

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, L]` True at image tokens: from `input_ids`, or (without them) where `inputs_embeds` equals the
        image token's embedding, as `generate(inputs_embeds=...)` and TRL pass them."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(-1)

    def _merge_image_features(
        self,
        image_mask: torch.Tensor,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor,
        **image_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each image's adapter outputs over its image tokens, in text order."""
        per_image, n_images = self.config.num_image_tokens, pixel_values.shape[0]
        if not _is_compiling():
            n_tokens = int(image_mask.sum())
            if n_tokens != n_images * per_image:
                raise ValueError(
                    f"the inputs contain {n_tokens} image tokens but {n_images} image(s) were given, which need "
                    f"{n_images} x {per_image} = {n_images * per_image}; every <image_placeholder> in the prompt must "
                    "match one image, expanded by the processor"
                )
        image_features = self.get_image_features(pixel_values, return_dict=True, **image_kwargs).pooler_output
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features.reshape(-1, inputs_embeds.shape[-1])), image_features

    def _check_inputs(self, image_mask: torch.Tensor | None, pixel_values, past: int, new: int) -> None:
        """Clear errors for real mistakes, run outside compilation only: over-long sequences, and image tokens
        in a prompt with neither images nor a cache that already holds them."""
        limit = _context_limit(self.config.text_config)
        if limit is not None and past + new > limit:
            raise ValueError(
                f"the sequence is {past + new} tokens ({past} cached + {new} new), over the model's context length "
                f"{limit} (max_position_embeddings, with rope scaling if configured); shorten the prompt (the "
                "processor's max_length/truncation) or generate fewer new tokens"
            )
        if pixel_values is None and not past and image_mask is not None and bool(image_mask.any()):
            raise ValueError(
                f"the inputs contain {int(image_mask.sum())} image tokens (id {self.config.image_token_id}) but no "
                "pixel_values were given; pass the images the processor prepared"
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DeepseekVLHFModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`[B, L]`): token ids; each image is `num_image_tokens` consecutive `image_token_id`s.
            pixel_values (`[N, 3, S, S]`): the images in [0, 1], in the order their tokens appear (row by row).
            inputs_embeds (`[B, L, hidden]`): instead of `input_ids`; image positions are where the embedding
                equals the image token's.

        Returns: `DeepseekVLHFModelOutputWithPast` (`last_hidden_state [B, L, hidden]`, the cache, the LLM's
        `hidden_states` / `attentions` when asked for, `image_hidden_states [N, T, hidden]`), or its tuple when
        `return_dict=False`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = None
        if pixel_values is not None or input_ids is not None:
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        if not _is_compiling():
            # caches without a length (transformers' paged cache for continuous batching) skip the length guard
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            self._check_inputs(image_mask, pixel_values, past, inputs_embeds.shape[1])
        image_features = None
        if pixel_values is not None:
            inputs_embeds, image_features = self._merge_image_features(image_mask, inputs_embeds, pixel_values)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{_LLM_CACHE_ARG: cache},
            **kwargs,
        )
        result = DeepseekVLHFModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD, None)},
        )
        return result if _return_dict(self.config, return_dict) else result.to_tuple()


class DeepseekVLHFForCausalLM(DeepseekVLHFPreTrainedModel, GenerationMixin):
    """DeepSeek-VL: images and text in, next-token logits out; `generate` works like any causal LM.

    Example:
    ```python
    >>> model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    >>> inputs = processor(text="<image_placeholder>Describe the image.", images=[image], return_tensors="pt")
    >>> out = model.generate(**inputs, max_new_tokens=32)
    ```
    """

    # transformers 5 maps tied parameters to their source; 4.x lists them (tied when `tie_word_embeddings`).
    _tied_weights_keys = (
        {"lm_head.weight": "model.language_model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config: DeepseekVLHFConfig):
        super().__init__(config)
        self.model = DeepseekVLHFModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling | tuple:
        """The base model's `get_image_features`: `pooler_output` holds the adapter outputs `[N, T, hidden]`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DeepseekVLHFCausalLMOutput | tuple:
        r"""
        Args:
            input_ids (`[B, L]`): token ids; each image is `num_image_tokens` consecutive `image_token_id`s.
            pixel_values (`[N, 3, S, S]`): the images in [0, 1], in the order their tokens appear (row by row).
            labels (`[B, L]`): next-token targets (shifted inside), -100 where ignored.
            logits_to_keep: compute logits only for the last `logits_to_keep` positions (0 = all).

        Returns: `DeepseekVLHFCausalLMOutput` with `logits [B, L, vocab]`, the loss when labels are given, the
        cache, the LLM's hidden states / attentions when asked for, and `image_hidden_states [N, T, hidden]`; its
        tuple when `return_dict=False`.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        result = DeepseekVLHFCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD, None)},
        )
        return result if _return_dict(self.config, return_dict) else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, inputs_embeds=None, **kwargs):
        """Pixel values go to the model on the prefill step only (the first iteration, or any call whose cache is
        still empty, as assisted decoding makes); later steps read the image from the cache."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = bool(kwargs.get("is_first_iteration")) or cache is None or cache.get_seq_length() == 0
        if prefill or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        else:
            model_inputs.pop("pixel_values", None)
        return model_inputs


DeepseekVLHFModel.register_for_auto_class("AutoModel")
DeepseekVLHFForCausalLM.register_for_auto_class("AutoModelForCausalLM")  # the config adds the other Auto classes
# transformers' generation loop reads `forward`'s signature at every step for remote-code models: a precomputed
# signature makes that lookup free (it was ~2% of a decode step with a small LLM).
DeepseekVLHFForCausalLM.forward.__signature__ = inspect.signature(DeepseekVLHFForCausalLM.forward)

__all__ = [
    "CheckpointError",
    "DeepseekVLAligner",
    "DeepseekVLHFCausalLMOutput",
    "DeepseekVLHFForCausalLM",
    "DeepseekVLHFModel",
    "DeepseekVLHFModelOutputWithPast",
    "DeepseekVLHFPreTrainedModel",
    "DeepseekVLSamEncoder",
    "DeepseekVLSiglipEncoder",
    "DeepseekVLVisionEncoder",
]
