"""Training data cost at the 7B image shape: what one example costs to decode, preprocess and encode (a
1920x1080 JPEG caption pair and a 4096-token text document), the tiny model's training step on this machine,
and what per-rank sharding saves: one rank's data work per optimizer step at 4 ranks, its own slots only
(sharded) against every slot of the step (each rank's work before per-rank sharding).

`costs(mode)` returns the measured inputs of the scale model (`python -m bench.scaling_model`); `run(mode)` the
benchmark rows. The processor is the 7B configuration's (1024 px hybrid input) with a locally trained
tokenizer, not DeepSeek's 100k-vocabulary one (tokenisation cost per token is of the same order).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import load_image

from deepseek_vl_hf.checkpoint import build_processor, build_random_model
from deepseek_vl_hf.data import MixtureDataset, Source, VLCollator, encode_record
from deepseek_vl_hf.presets import preset_config
from deepseek_vl_hf.tokenizer import build_tokenizer

from .fixtures import photo_jpeg
from .harness import Row, interleaved, time_row

TITLE = "Training data cost, 7B image shape (1920x1080 JPEG pairs): one rank's data work per step at 4 ranks"
LABELS = ("sharded", "unsharded")
RANKS, PER_DEVICE = 4, 2
CAPTION = "A wide photograph of a harbour at dusk: fishing boats, a stone pier, gulls and warm lights " * 2
# (image width, height, repeats, text-document words) per mode; smoke uses small images and one repeat
PLANS = {"full": (1920, 1080, 7, 3000), "quick": (1920, 1080, 3, 3000), "smoke": (320, 180, 1, 200)}


def processor_7b():
    """The 7B configuration's processor (1024 px images, 576 image tokens) with a local tokenizer."""
    config = preset_config("7b")
    tokenizer = build_tokenizer(vocab_size=8000)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    return build_processor(config, tokenizer)


def _median_ms(timings, name: str) -> float:
    return statistics.median(timings[name].walls) * 1000


def costs(mode: str = "full") -> dict[str, Any]:
    """Per-example data costs (ms, one process, 1 thread of work each) and the tiny train step (s)."""
    width, height, repeats, words = PLANS[mode]
    processor = processor_7b()
    jpeg = photo_jpeg(width, height, seed=1)
    image = load_image(jpeg)
    document = {"text": " ".join(f"word{i % 997}" for i in range(words))}
    pair = {"image": jpeg, "text": CAPTION}
    text_tokens = len(encode_record(document, "text", processor, None, "all")["input_ids"])
    contenders = {
        "decode": lambda: load_image(jpeg),
        "preprocess": lambda: processor.image_processor([image], return_tensors="pt"),
        "encode pair": lambda: encode_record(pair, "pairs", processor, 4096, "all"),
        "encode text": lambda: encode_record(document, "text", processor, None, "all"),
    }
    timings = interleaved(contenders, repeats)
    model, tiny = build_random_model("tiny")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = VLCollator(tiny.tokenizer.eos_token_id, tiny.image_processor)(
        [encode_record({"image": jpeg, "text": CAPTION}, "pairs", tiny, 256, "all")] * PER_DEVICE
    )

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    step = interleaved({"step": train_step}, repeats)
    return {
        "image": f"{width}x{height} JPEG ({len(jpeg) // 1024} KiB)",
        "decode_ms": _median_ms(timings, "decode"),
        "preprocess_ms": _median_ms(timings, "preprocess"),
        "encode_pair_ms": _median_ms(timings, "encode pair"),  # decode + tokenise
        "encode_text_ms": _median_ms(timings, "encode text"),
        "text_tokens": text_tokens,
        "tiny_step_s": statistics.median(step["step"].walls),
        "tiny_step_batch": PER_DEVICE,
        "cpu_wall": timings["decode"].cpu_wall,
    }


def _rank_batch(dataset: MixtureDataset, collator: VLCollator, examples: int) -> dict[str, torch.Tensor]:
    """One step's data work of rank 0: encode `examples` slots from the start, batch the rank's first ones."""
    dataset.load_state_dict({"position": 0})
    return collator(list(islice(dataset, examples))[:PER_DEVICE])


def run(mode: str) -> list[Row]:
    width, height, repeats, _ = PLANS[mode]
    processor = processor_7b()
    collator = VLCollator(processor.tokenizer.eos_token_id, processor.image_processor)
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for index in range(RANKS * PER_DEVICE):
            (Path(folder) / f"{index}.jpg").write_bytes(photo_jpeg(width, height, seed=index))
            rows.append(json.dumps({"image": f"{index}.jpg", "text": f"{CAPTION} {index}"}))
        (Path(folder) / "pairs.jsonl").write_text("\n".join(rows) + "\n")
        source = [Source("photos", "pairs", str(Path(folder) / "pairs.jsonl"))]
        step = RANKS * PER_DEVICE
        sharded = MixtureDataset(source, processor, examples_per_step=step, rank=0, world_size=RANKS,
                                 micro_batch_size=PER_DEVICE, max_length=4096)
        unsharded = MixtureDataset(source, processor, examples_per_step=step, max_length=4096)
        timings = interleaved(
            {
                "sharded": lambda: _rank_batch(sharded, collator, PER_DEVICE),
                "unsharded": lambda: _rank_batch(unsharded, collator, step),
            },
            repeats,
        )
    same = all(torch.equal(timings["sharded"].result[k], timings["unsharded"].result[k])
               for k in ("input_ids", "labels", "pixel_values"))
    note = (f"rank 0 of {RANKS}, {PER_DEVICE} examples per device, {step} per step; check: the rank's batch is "
            "identical (ids, labels, pixels)")
    return [time_row(f"one rank's data work per step ({width}x{height} JPEG pairs)", timings["sharded"],
                     timings["unsharded"], note=note, correct=same)]
