"""SFT label encoding: ms per conversation with the chat template's `{% generation %}` marks (one render and one
tokenisation with offsets) vs the same template without them (the fallback: render and tokenise the conversation
up to every answer), on the demo's multi-turn visual dialogues.

Both contenders encode the same records in one process, interleaved; labels must be equal (the row's check).
Images are decoded by both alike (the records' PNGs), so the figures are what a training step's data loading pays.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from deepseek_vl_hf.data import encode_record, open_records
from deepseek_vl_hf.data.encoding import GENERATION_TAG
from deepseek_vl_hf.demo.synthetic import generate_dataset, tokenizer_corpus

from .harness import Row, interleaved, time_row

TITLE = "SFT label encoding, the demo's multi-turn visual dialogues (ms per dialogue)"
LABELS = ("generation marks", "prefix rendering")
PLANS = {"full": (64, 7), "quick": (64, 3), "smoke": (6, 1)}  # (dialogues, repeats)


def run(mode: str) -> list[Row]:
    """ms per dialogue with the marked template against prefix rendering; the labels must agree."""
    from deepseek_vl_hf.checkpoint import build_random_model

    count, repeats = PLANS[mode]
    _, marked = build_random_model("tiny", tokenizer_corpus=tokenizer_corpus(0))
    unmarked = copy.copy(marked)
    unmarked.chat_template = GENERATION_TAG.sub("", marked.chat_template).replace("{% endgeneration %}", "")
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, seed=0, train_per_category=max(8, count // 5), eval_per_kind=1)
        table = open_records(Path(tmp) / "stage3_conversations.jsonl", "conversations")
        records = [table[i] for i in range(min(count, len(table)))]
        turns = sum(len(r["messages"]) for r in records) / 2 / len(records)

        def encode(processor):
            return [encode_record(r, "conversations", processor, 512, "assistant")["labels"] for r in records]

        t = interleaved({"marked": lambda: encode(marked), "prefix": lambda: encode(unmarked)}, repeats)
    same = t["marked"].result == t["prefix"].result
    return [time_row(
        f"{len(records)} dialogues, {turns:.1f} turns on average", t["marked"], t["prefix"], "ms/dialogue",
        1000.0 / len(records), note=f"labels identical: {'yes' if same else 'NO'}; single-threaded Python",
        correct=same,
    )]
