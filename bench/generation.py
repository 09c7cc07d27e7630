"""Full forward (vision + LLM, logits) and greedy generation with a small LLM (tiny towers, 4 x 512 Llama),
batch 1 and batch 8 left-padded, ours against the native model with the same weights and token inputs.

Prefill = `generate(max_new_tokens=1)`; decode speed = the extra tokens of `generate(max_new_tokens=N)` over the
extra time it takes (both medians of the same interleaved run; every sequence makes exactly N tokens).
"""

from __future__ import annotations

import torch

from .fixtures import build_ours, chat_batch, native_inputs, to_native
from .harness import Row, Target, combined_cpu_wall, interleaved, time_row

TITLE = "Full forward and greedy generation, small LLM (fp32)"
TARGETS = (
    Target("full forward no slower than native", ": forward", 1.0),
    Target("prefill no slower than native", ": prefill", 1.0),
    Target("decode tokens/s at least native's", ": decode", 1.0),
)
LOGIT_TOLERANCE = 1e-4  # max abs logit difference, ours vs native, fp32


def generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    """Greedy generation of exactly `tokens` new tokens per sequence."""
    return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


def run(mode: str) -> list[Row]:
    """Forward ms, prefill ms and decode tokens/s per batch size, with output agreement in the notes."""
    ours, processor = build_ours("tiny" if mode == "smoke" else "small-llm")
    native = to_native(ours)
    # smoke: enough decode steps and repeats that the decode time (a difference of two medians) stands clear of
    # timing noise; with 4 tokens and one repeat it came out negative once in CI
    new_tokens = {"full": 32, "quick": 16, "smoke": 16}[mode]
    repeats = {"full": 5, "quick": 3, "smoke": 3}[mode]
    rows = []
    for batch in (1, 2) if mode == "smoke" else (1, 8):
        ours_in = dict(chat_batch(processor, batch))
        native_in = native_inputs(ours_in, ours)

        with torch.inference_mode():
            t = interleaved(
                {
                    "ours:forward": lambda i=ours_in: ours(**i).logits,
                    "native:forward": lambda i=native_in: native(**i).logits,
                    "ours:prefill": lambda i=ours_in: generate(ours, i, 1),
                    "native:prefill": lambda i=native_in: generate(native, i, 1),
                    "ours:generate": lambda i=ours_in: generate(ours, i, new_tokens),
                    "native:generate": lambda i=native_in: generate(native, i, new_tokens),
                },
                repeats=repeats,
                warmup=1,
            )
        length = ours_in["input_ids"].shape[1]
        diff = (t["ours:forward"].result - t["native:forward"].result).abs().max().item()
        same = torch.equal(t["ours:generate"].result, t["native:generate"].result)
        case = f"batch {batch} ({length} tokens{', left-padded' if batch > 1 else ''})"
        rows.append(time_row(f"{case}: forward", t["ours:forward"], t["native:forward"],
                             note=f"max abs logit diff {diff:.1e} (<= {LOGIT_TOLERANCE:g} wanted)",
                             correct=diff <= LOGIT_TOLERANCE))
        rows.append(time_row(f"{case}: prefill", t["ours:prefill"], t["native:prefill"]))
        speeds = {}
        for side in ("ours", "native"):
            extra = t[f"{side}:generate"].median - t[f"{side}:prefill"].median
            speeds[side] = batch * (new_tokens - 1) / extra
        cpu_wall = combined_cpu_wall(*(t[f"{side}:generate"] for side in ("ours", "native")))
        rows.append(Row(f"{case}: decode", "tokens/s", speeds["ours"], speeds["native"], cpu_wall,
                        higher_is_better=True, note=f"{new_tokens} new tokens, same tokens: {'yes' if same else 'NO'}",
                        correct=same))
    return rows
