"""Image preprocessing to 1024 per image (JPEG decode + resize + pad + rescale/normalise), ours against the
native DeepSeek-VL-Hybrid image processors (torchvision "fast" and PIL backends).

What each side computes: ours makes only the [0, 1] 1024x1024 tensor (the model normalises it and makes the
384 SigLIP input inside); the native processors make the normalised 1024 SAM input *and* the normalised 384
SigLIP input. The "ours + 384" contender adds what our model does inside (resize to 384, both normalisations),
which gives the like-for-like figure.
"""

from __future__ import annotations

from deepseek_vl_hf.conversion.native import native_image_processor, native_pixel_inputs
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import DeepseekVLHFImageProcessor

from deepseek_vl_hf.presets import preset_config

from .fixtures import decode, photo_jpeg
from .harness import Row, Target, interleaved, time_row

TITLE = "Image preprocessing to 1024, per image"
SIZES = {"1920x1080": (1920, 1080), "4000x3000": (4000, 3000)}
SMOKE_SIZES = {"320x180": (320, 180)}
TARGETS = (Target("at least 2x native fast, single-threaded, like for like", "ours + 384 vs native fast", 0.5),)


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


def run(mode: str) -> list[Row]:
    """ms per image for each photo size, one image and batches of 8."""
    config, ours, fast, pil = _processors()
    repeats = {"full": 7, "quick": 3, "smoke": 1}[mode]
    rows = []
    for size_name, (width, height) in (SMOKE_SIZES if mode == "smoke" else SIZES).items():
        photos = [photo_jpeg(width, height, seed=seed) for seed in range(8)]
        for batch in (1, 8):
            data = photos[:batch]
            contenders = {
                "ours": lambda data=data: ours(data, return_tensors="pt")["pixel_values"],
                "ours+384": lambda data=data: native_pixel_inputs(ours(data)["pixel_values"], config),
                "fast": lambda data=data: fast([decode(d) for d in data], return_tensors="pt"),
                "pil": lambda data=data: pil([decode(d) for d in data], return_tensors="pt"),
            }
            if batch > 1:
                contenders["ours-2w"] = lambda data=data: ours(data, num_workers=2)["pixel_values"]
            t = interleaved(contenders, repeats=repeats, warmup=1)
            case = f"{size_name} JPEG, batch {batch}"
            per_image = 1000.0 / batch
            rows += [  # ours alone makes only the 1024 input: not like for like
                time_row(f"{case}: ours vs native fast", t["ours"], t["fast"], "ms/img", per_image,
                         like_for_like=False),
                time_row(f"{case}: ours vs native PIL", t["ours"], t["pil"], "ms/img", per_image, like_for_like=False),
                time_row(
                    f"{case}: ours + 384 vs native fast", t["ours+384"], t["fast"], "ms/img", per_image,
                    note="like for like: both make the normalised 1024 and 384 inputs",
                ),
            ]
            if batch > 1:
                rows.append(
                    time_row(f"{case}: ours num_workers=2 vs native fast", t["ours-2w"], t["fast"], "ms/img", per_image,
                             like_for_like=False)
                )
    return rows
