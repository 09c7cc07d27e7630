"""Our SAM block (chunked relative-position bias, windows projected unpadded) against timm's own forward."""

from __future__ import annotations

import pytest
import torch
from deepseek_vl_hf.modeling import modeling_deepseek_vl_hf as modeling
from timm.models.vision_transformer_sam import Block as TimmSamBlock


def _block(window: int, grid: int, dim: int = 64, heads: int = 4) -> modeling.DeepseekVLSamBlock:
    torch.manual_seed(0)
    block = modeling.DeepseekVLSamBlock(
        dim=dim, num_heads=heads, qkv_bias=True, use_rel_pos=True, window_size=window, input_size=(grid, grid)
    )
    with torch.no_grad():  # non-zero relative positions and biases, so that the bias and the padding matter
        for name in ("rel_pos_h", "rel_pos_w"):
            getattr(block.attn, name).normal_(0, 0.5)
        block.attn.qkv.bias.normal_()
    return block


@pytest.mark.parametrize(
    ("window", "grid", "chunk_bytes"),
    [(0, 16, 8 * 2**20), (0, 16, 4096), (0, 16, 2**19), (6, 16, 8 * 2**20), (6, 16, 2**14), (8, 16, 2**20)],
    ids=["global", "global-row-chunks", "global-head-chunks", "window-padded", "window-chunks", "window-exact"],
)
def test_block_matches_timm_forward_and_gradients(monkeypatch, window, grid, chunk_bytes):
    monkeypatch.setattr(modeling, "_SAM_BIAS_CHUNK_BYTES", chunk_bytes)
    block = _block(window, grid)
    x = torch.randn(2, grid, grid, 64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), TimmSamBlock.forward(block, x), rtol=0, atol=1e-5)
    x.requires_grad_(True)
    ours = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
    reference = torch.autograd.grad(TimmSamBlock.forward(block, x).square().sum(), [x, *block.parameters()])
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_block_bfloat16_close_to_timm():
    block = _block(6, 16).to(torch.bfloat16)
    x = torch.randn(1, 16, 16, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), TimmSamBlock.forward(block, x), rtol=0.02, atol=0.05)
