"""SFT label encoding: ms per conversation with the chat template's `{% generation %}` marks (one render and one
tokenisation with offsets) vs the same template without them (the fallback: render and tokenise the conversation
up to every answer), on the demo's multi-turn visual dialogues.

Both contenders encode the same records in one process, interleaved; labels must be equal (checked). Images
are decoded by both alike (the records' PNGs), so the figures are what a training step's data loading pays.

    python -m bench.sft_encoding [--records 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from deepseek_vl_hf.data import encode_record, open_records
from deepseek_vl_hf.data.encoding import GENERATION_TAG
from deepseek_vl_hf.demo.synthetic import generate_dataset, tokenizer_corpus

from .harness import THREADS, combined_cpu_wall, interleaved, machine_info, setup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=64, help="dialogues encoded per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    setup(THREADS)
    from deepseek_vl_hf.checkpoint import build_random_model

    _, marked = build_random_model("tiny", tokenizer_corpus=tokenizer_corpus(0))
    unmarked = copy.copy(marked)
    unmarked.chat_template = GENERATION_TAG.sub("", marked.chat_template).replace("{% endgeneration %}", "")
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, seed=0, train_per_category=max(8, args.records // 5), eval_per_kind=1)
        table = open_records(Path(tmp) / "stage3_conversations.jsonl", "conversations")
        records = [table[i] for i in range(min(args.records, len(table)))]
        turns = sum(len(r["messages"]) for r in records) / 2 / len(records)

        def encode(processor):
            return [encode_record(r, "conversations", processor, 512, "assistant")["labels"] for r in records]

        timings = interleaved({"marked": lambda: encode(marked), "prefix": lambda: encode(unmarked)}, args.repeats)
    assert timings["marked"].result == timings["prefix"].result, "the two label paths disagree"
    per = {name: t.median * 1000 / len(records) for name, t in timings.items()}
    print(machine_info())
    print(f"\n{len(records)} dialogues, {turns:.1f} turns each on average, {args.repeats} interleaved repeats\n")
    print("| labels from | ms per dialogue |\n|---|---|")
    print(f"| rendering up to every answer (templates without marks) | {per['prefix']:.2f} |")
    print(f"| the template's {{% generation %}} marks | {per['marked']:.2f} |")
    print(f"\nSpeed-up: **{per['prefix'] / per['marked']:.2f}x** "
          f"(cpu/wall {combined_cpu_wall(*timings.values()):.2f}); labels identical")


if __name__ == "__main__":
    main()
