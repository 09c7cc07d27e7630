"""Training steps (forward + backward + AdamW, all parameters, fp32, batch 8) of the tiny and the mid-size
configuration, with and without gradient checkpointing, ours against the native model with the same weights.

Each (configuration, checkpointing, model) case runs in a fresh process so that its peak RSS (`ru_maxrss`) is
its own; ours and native alternate case by case (their order flips every round), and the medians over rounds
are compared. Peak RSS includes the imports (torch, transformers, timm); the delta is over the RSS high-water
mark before the first step (activations, gradients, optimizer state).
"""

from __future__ import annotations

import statistics
import time

import torch

from .fixtures import build_ours, chat_batch, native_inputs, to_native
from .harness import Row, isolated, peak_rss_mib

TITLE = "Training step, batch 8, fp32 (samples/s; peak RSS per process)"
BATCH = 8


def step_case(config: str, native: bool, checkpointing: bool, steps: int, warmup: int) -> dict[str, float]:
    """Time `steps` optimizer steps in this process (run through `isolated`): median seconds, cpu/wall, RSS."""
    model, processor = build_ours(config)
    inputs = dict(chat_batch(processor, BATCH))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    inputs["labels"] = labels.masked_fill(labels == model.config.image_token_id, -100)
    if native:
        inputs = native_inputs(inputs, model)
        model = to_native(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rss_before = peak_rss_mib()
    walls, cpus = [], []
    for index in range(warmup + steps):
        cpu, wall = time.process_time(), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()
        if index >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {"step_s": statistics.median(walls), "cpu_wall": sum(cpus) / sum(walls), "rss_before_mib": rss_before}


def run(mode: str) -> list[Row]:
    """samples/s and peak RSS for each case, ours against native."""
    plans = {
        "full": {"tiny": (2, 20), "mid": (1, 8)},
        "quick": {"tiny": (2, 8), "mid": (1, 3)},
        "smoke": {"tiny": (0, 1)},
    }[mode]
    options = (True,) if mode == "smoke" else (False, True)
    cases = [(config, checkpointing) for config in plans for checkpointing in options]
    results: dict[tuple[str, bool, bool], list[dict[str, float]]] = {}
    for round_index in range(3 if mode == "full" else 1):
        for config, checkpointing in cases:
            warmup, steps = plans[config]
            for native in (False, True) if round_index % 2 == 0 else (True, False):
                result = isolated("bench.training:step_case", config=config, native=native,
                                  checkpointing=checkpointing, steps=steps, warmup=warmup)
                results.setdefault((config, checkpointing, native), []).append(result)
    rows = []
    for config, checkpointing in cases:
        ours, native = results[(config, checkpointing, False)], results[(config, checkpointing, True)]
        case = f"{config}, {'with' if checkpointing else 'no'} gradient checkpointing"
        cpu_wall = statistics.mean(r["cpu_wall"] for r in ours + native)
        rows.append(Row(f"{case}: speed", "samples/s", BATCH / _median(ours, "step_s"),
                        BATCH / _median(native, "step_s"), cpu_wall, higher_is_better=True))
        deltas = [max(r["peak_rss_mib"] - r["rss_before_mib"] for r in side) for side in (ours, native)]
        rows.append(Row(f"{case}: peak RSS", "MiB", max(r["peak_rss_mib"] for r in ours),
                        max(r["peak_rss_mib"] for r in native), cpu_wall,
                        note=f"memory ratio; growth during training ours {deltas[0]:.0f} / native {deltas[1]:.0f} MiB"))
    return rows


def _median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)
