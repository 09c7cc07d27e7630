"""Held-out evaluation of the demo model: exact-match answers per question kind, with and without the image.

Every held-out question (`eval.jsonl`) is asked in the chat format the model is fine-tuned on and answered
greedily; an answer counts when it equals the known answer (case, spaces and a final full stop ignored). The
blind baseline asks the same model the same question without the image: what it gets right from the question
and its priors alone. Chance is 1 / (number of possible answers) of each question kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from deepseek_vl_hf.demo.synthetic import CATEGORIES, KINDS


def normalize_answer(text: str) -> str:
    """The form answers are compared in: lower case, outer spaces and a final full stop removed."""
    return text.strip().rstrip(".").strip().lower()


def _messages(question: str, with_image: bool) -> list[dict[str, Any]]:
    content = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def generate_answers(
    model: torch.nn.Module,
    processor,
    questions: list[dict[str, Any]],
    data_dir: str | Path,
    with_image: bool,
    batch_size: int = 32,
    max_new_tokens: int = 6,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to `questions` (rows of `eval.jsonl`), each with its image when `with_image` and it has one."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts, images = [], []
        for row in chunk:
            show = with_image and row["image"] is not None
            prompt = processor.apply_chat_template(_messages(row["question"], show), add_generation_prompt=True,
                                                   tokenize=False)
            prompts.append(prompt)
            images.append([Image.open(Path(data_dir) / row["image"]).convert("RGB")] if show else [])
        inputs = processor(text=prompts, images=images if any(images) else None, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new_tokens, skip_special_tokens=True)
        if on_batch:
            on_batch(len(chunk))
    return answers


def score(questions: list[dict[str, Any]], answers: list[str]) -> dict[str, dict[str, float]]:
    """Per question kind: number of questions, exact-match accuracy and chance."""
    table: dict[str, dict[str, float]] = {}
    for row, answer in zip(questions, answers):
        entry = table.setdefault(row["kind"], {"n": 0, "correct": 0})
        entry["n"] += 1
        entry["correct"] += normalize_answer(answer) == normalize_answer(row["answer"])
    return {
        kind: {"n": e["n"], "accuracy": e["correct"] / e["n"], "chance": KINDS[kind].chance}
        for kind, e in sorted(table.items())
    }


def by_category(kinds: dict[str, dict[str, float]], field: str) -> dict[str, float]:
    """Question-weighted mean of `field` over each category's kinds (categories in the generator's order)."""
    out = {}
    for category in sorted({KINDS[k].category for k in kinds}, key=CATEGORIES.index):
        members = [k for k in kinds if KINDS[k].category == category]
        total = sum(kinds[k]["n"] for k in members)
        out[category] = sum(kinds[k][field] * kinds[k]["n"] for k in members) / total
    return out


def evaluate_visual(
    model: torch.nn.Module,
    processor,
    questions: list[dict[str, Any]],
    data_dir: str | Path,
    on_batch: Callable[[int], None] | None = None,
    blind: bool = True,
) -> dict[str, Any]:
    """Accuracy with the image, blind accuracy (no image; left out when not `blind`) and chance, per kind and per
    category, and the question-weighted mean accuracy over all kinds (`overall`)."""
    seen = generate_answers(model, processor, questions, data_dir, True, on_batch=on_batch)
    kinds = score(questions, seen)
    if blind:
        unseen = generate_answers(model, processor, questions, data_dir, False, on_batch=on_batch)
        for kind, entry in score(questions, unseen).items():
            kinds[kind]["blind"] = entry["accuracy"]
    else:
        unseen = [""] * len(questions)
    fields = {field: by_category(kinds, field) for field in ("accuracy", "blind", "chance") if blind or field != "blind"}
    categories = {category: {f: values[category] for f, values in fields.items()} for category in fields["chance"]}
    examples = [
        {"image": q["image"], "question": q["question"], "answer": q["answer"], "with_image": s.strip(),
         "blind": b.strip()}
        for q, s, b in list(zip(questions, seen, unseen))[:: max(1, len(questions) // 10)]
    ]
    overall = {field: sum(k[field] * k["n"] for k in kinds.values()) / len(questions) for field in fields}
    return {"kinds": kinds, "categories": categories, "examples": examples, "overall": overall}


def evaluate_text(
    model: torch.nn.Module, processor, questions: list[dict[str, Any]], data_dir: str | Path
) -> dict[str, Any]:
    """Accuracy on the text task's held-out questions (the language-retention measure), per kind and overall."""
    kinds = score(questions, generate_answers(model, processor, questions, data_dir, False))
    total = sum(e["n"] for e in kinds.values())
    return {"kinds": kinds, "accuracy": sum(e["accuracy"] * e["n"] for e in kinds.values()) / total}
