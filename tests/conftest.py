"""Shared fixtures: tiny random-weight models built locally (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine a spinning thread that waits for a
# descheduled sibling makes a step up to ~60x slower (measured: tiny training step 0.05 s -> 4 s under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pair():
    """(model, processor) of the tiny hybrid preset, fp32, eval mode."""
    from deepseek_vl_hf.checkpoint import build_random_model

    return build_random_model("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_siglip_pair():
    from deepseek_vl_hf.checkpoint import build_random_model

    return build_random_model("tiny-siglip", seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny_pair, tmp_path_factory):
    """A checkpoint folder of the tiny model, written by `save_checkpoint`."""
    from deepseek_vl_hf.checkpoint import save_checkpoint

    model, processor = tiny_pair
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("ckpt") / "tiny")


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (photo-like gradients plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], axis=-1).astype(np.float32)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def images():
    return [make_image(320, 240, 1), make_image(200, 300, 2), make_image(64, 64, 3)]
