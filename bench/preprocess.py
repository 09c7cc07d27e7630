"""Image preprocessing per image, like for like: JPEG bytes -> the normalised 1024 SAM input and the 384 SigLIP
input, ours against transformers' native DeepSeek-VL-Hybrid image processors, single-threaded.

Ours makes the [0, 1] 1024 tensor and our model makes the 384 input and both normalisations inside `forward`;
every "ours" contender here adds that step (`native_pixel_inputs`), so both sides produce the same outputs.
The native processors get decoded PIL images (decoding counted), as transformers' processors usually do.

Contenders: ours with the default settings (the official arithmetic, bit for bit: the check column compares
it with the reference in tests/official_reference.py), `resample_backend="torch"` (opt-in) and
`resample_backend="torch", jpeg_draft=True` (opt-in); the notes give each opt-in's difference from the
default's 1024 pixels in grey levels.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from deepseek_vl_hf.conversion.native import native_image_processor, native_pixel_inputs
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import DeepseekVLHFImageProcessor

from deepseek_vl_hf.presets import preset_config
from tests.official_reference import official_batch

from .fixtures import decode, photo_jpeg
from .harness import Row, Target, interleaved, time_row

TITLE = "Image preprocessing to the 1024 and 384 inputs, per image, single-threaded"
SIZES = {"1920x1080": (1920, 1080), "4000x3000": (4000, 3000)}
SMOKE_SIZES = {"320x180": (320, 180)}
BATCHES = (1, 8)
DEFAULT = "ours (default, exact) + 384"
OPT_INS = {
    "ours resample_backend=torch + 384": {"resample_backend": "torch"},
    "ours resample_backend=torch, jpeg_draft + 384": {"resample_backend": "torch", "jpeg_draft": True},
}
TARGETS = (
    Target("at least 2x native fast, single-threaded, like for like, default (exact) settings",
           f"{DEFAULT} vs native fast", 0.5),
    Target("at least 2x native fast, single-threaded, like for like, fastest opt-in settings",
           "jpeg_draft + 384 vs native fast", 0.5),
)


@contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _processors():
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    config = preset_config("7b")
    ours = DeepseekVLHFImageProcessor(
        image_size=config.image_size,
        image_mean=tuple(config.sam_config.image_mean),
        image_std=tuple(config.sam_config.image_std),
    )
    fast = native_image_processor(config, ours)
    settings = {k: v for k, v in fast.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    return config, ours, fast, DeepseekVLHybridImageProcessorPil(**settings)


def _levels(pixels: torch.Tensor, reference: torch.Tensor) -> str:
    """How far `pixels` are from `reference` ([0, 1] values), in 8-bit grey levels."""
    levels = ((pixels - reference).abs() * 255).round()
    return (f"vs default: max {int(levels.max())} grey levels, mean {float(levels.mean()):.3f}, "
            f"{float((levels > 0).float().mean()) * 100:.2f}% of values differ")


def preprocess_rows(mode: str) -> list[Row]:
    """The section's rows as data (ms per image): per photo size and batch, ours (default and opt-ins) + 384 vs
    native fast, and ours default + 384 vs native PIL; all like for like, all single-threaded."""
    config, ours, fast, pil = _processors()
    repeats = {"full": 7, "quick": 3, "smoke": 1}[mode]
    rows = []
    with _single_thread():
        for size_name, (width, height) in (SMOKE_SIZES if mode == "smoke" else SIZES).items():
            photos = [photo_jpeg(width, height, seed=seed) for seed in range(max(BATCHES))]
            decoded = decode(photos[0])
            reads = interleaved({"read": lambda decoded=decoded: np.asarray(decoded).copy(),
                                 "decode": lambda data=photos[0]: decode(data)}, repeats=repeats, warmup=1)
            rows.append(time_row(
                f"{size_name} JPEG: public pixel read (numpy.asarray + writable copy) vs PIL decode", reads["read"],
                reads["decode"], "ms/img", like_for_like=False,
                note="the cost of public APIs on the torch backend (the removed ctypes view read pixels in place)"))
            for batch in BATCHES:
                data = photos[:batch]
                contenders = {
                    DEFAULT: lambda data=data: native_pixel_inputs(ours(data)["pixel_values"], config),
                    **{name: lambda data=data, kw=kw: native_pixel_inputs(ours(data, **kw)["pixel_values"], config)
                       for name, kw in OPT_INS.items()},
                    "fast": lambda data=data: fast([decode(d) for d in data], return_tensors="pt"),
                    "pil": lambda data=data: pil([decode(d) for d in data], return_tensors="pt"),
                }
                t = interleaved(contenders, repeats=repeats, warmup=1)
                default = ours(data)["pixel_values"]
                exact = torch.equal(default, official_batch([decode(d) for d in data], ours.image_size, ours.fill_color))
                case = f"{size_name} JPEG, batch {batch}"
                per_image = 1000.0 / batch
                note = "the 1024 input equals the official preprocessing bit for bit" if exact else "NOT official"
                rows += [
                    time_row(f"{case}: {DEFAULT} vs native fast", t[DEFAULT], t["fast"], "ms/img", per_image,
                             note=note, correct=exact),
                    time_row(f"{case}: {DEFAULT} vs native PIL", t[DEFAULT], t["pil"], "ms/img", per_image,
                             note=note, correct=exact),
                ]
                for name, kw in OPT_INS.items():
                    rows.append(time_row(f"{case}: {name} vs native fast", t[name], t["fast"], "ms/img", per_image,
                                         note=_levels(ours(data, **kw)["pixel_values"], default)))
    return rows


def run(mode: str) -> list[Row]:
    """The bench section contract (bench/README.md)."""
    return preprocess_rows(mode)

