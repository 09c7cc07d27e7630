"""Stage 0 of the demo: the stand-in for the pretrained weights DeepSeek-VL starts from.

The paper begins with a pretrained SigLIP, SAM-B and DeepSeek-LLM; the demo may download nothing, so a short
warm-up gives the random tiny model what those weights would: the vision towers learn to encode the synthetic
images (attention-pooling probes over their standardised tokens predict the answer to every question the
generator knows about each training image; their answer vocabulary comes from the training split only), and the
LLM learns language by next-token prediction: the text task's stage-0 corpus (`text_warmup.jsonl`: names that
neither later stages nor the retention probe use), and the training images' descriptions as plain text (a pretrained LLM knows how captions and
answers read; it is the images it has never seen).
The adapter is not touched. This is not one of the paper's stages; stages 1-3 then run the recipes.

The SAM branch trains at a tenth of the others' learning rate: at theirs its neck (convolutions between
LayerNorms) collapses and its tokens stop carrying small text (measured on the OCR images).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from deepseek_vl_hf.data import VLCollator, encode_record
from deepseek_vl_hf.demo.synthetic import pretraining_text

IGNORE = -100


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class VisionProbe(nn.Module):
    """Per question, an attention-pooling classifier over the standardised tokens: `[B, T, C] -> [B, questions,
    max_answers]`, the answer slots a question does not use masked out.

    A query per question weighs the tokens and a classifier reads their weighted mean, which is how the language
    model will read them (attention from the answer position), so the towers learn features the LLM can find.
    A linear read-out of all tokens at once learns faster here, but the features it draws out are harder for the
    LLM to read (measured with one added: document and geometry answers 12-21 points lower after stage 3).
    Standardising (a BatchNorm without affine terms) makes the small differences text leaves in the tokens as
    visible as colours.
    """

    def __init__(self, channels: int, answers: dict[str, list[str]]):
        super().__init__()
        self.questions = sorted(answers)
        self.answers = {q: sorted(answers[q]) for q in self.questions}
        self.width = max(len(a) for a in self.answers.values())
        self.norm = nn.BatchNorm1d(channels, affine=False)
        self.queries = nn.Parameter(torch.randn(len(self.questions), channels) * channels**-0.5)
        self.weight = nn.Parameter(torch.randn(len(self.questions), channels, self.width) * channels**-0.5)
        self.bias = nn.Parameter(torch.zeros(len(self.questions), self.width))
        mask = torch.full((len(self.questions), self.width), float("-inf"))
        for row, question in enumerate(self.questions):
            mask[row, : len(self.answers[question])] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def knows(self, question: str, answer: str) -> bool:
        """Whether the probe can answer `answer` to `question` (both in its training vocabulary)."""
        return answer in self.answers.get(question, ())

    def targets(self, qa_lists: list[list[list[str]]]) -> torch.Tensor:
        """`[B, questions]` answer indices, IGNORE where a question was not asked about the image."""
        out = torch.full((len(qa_lists), len(self.questions)), IGNORE, dtype=torch.long)
        index = {q: i for i, q in enumerate(self.questions)}
        for row, qa in enumerate(qa_lists):
            for _, question, answer in qa:
                out[row, index[question]] = self.answers[question].index(answer)
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens.flatten(0, 1)).view_as(tokens)
        weights = torch.einsum("btc,qc->bqt", x, self.queries).softmax(-1)
        pooled = torch.einsum("bqt,btc->bqc", weights, x)
        return torch.einsum("bqc,qcw->bqw", pooled, self.weight) + self.bias + self.mask


def probe_vocabulary(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Every question of the training rows (`images_train.jsonl`) with the answers it has there: the probes'
    vocabulary, from the training split only, so no held-out answer leaks into stage 0."""
    answers: dict[str, set[str]] = {}
    for row in rows:
        for _, question, answer in row["qa"]:
            answers.setdefault(question, set()).add(answer)
    return {question: sorted(values) for question, values in answers.items()}


def vision_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision towers' tokens, concatenated per token (SigLIP, then SAM when hybrid): `[N, T, C]`."""
    low, high = model.model.vision_model(pixel_values)
    return low if high is None else torch.cat([low, high], dim=-1)


def fold_statistics(model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold `(tokens - mean) / std` (per channel: SigLIP's, then SAM's) into the adapter's input projections,
    so that the adapter starts out seeing standardised tokens, as the probes did."""
    aligner = model.model.aligner
    low = model.config.siglip_config.hidden_size
    if model.config.aligner_type == "hybrid_split_mlp":
        parts = [(aligner.low_up_proj, slice(0, low)), (aligner.high_up_proj, slice(low, None))]
    else:
        parts = [(aligner.layers[0], slice(0, low))]
    with torch.no_grad():
        for linear, channels in parts:
            linear.bias -= linear.weight @ (mean[channels] / std[channels])
            linear.weight /= std[channels]


def standardize_adapter_output(model: nn.Module, pixel_values: torch.Tensor) -> None:
    """Fold centring and per-channel scaling of the adapter's output (over `pixel_values`' tokens) into its last
    linear layer, so each image-token channel varies around zero on the scale of the word embeddings.

    Uncentred, the channels the images share dominate every image token and the language model learns to read
    only what changes many tokens at once (counts, rows); centred, it also learns angles, positions and text.
    """
    last = model.model.aligner.layers[-1]
    with torch.no_grad():
        low, high = model.model.vision_model(pixel_values)
        out = model.model.aligner(low, high).flatten(0, 1)
        mean, std = out.mean(0), out.std(0) + 1e-6
        factor = model.get_input_embeddings().weight.std() / std
        last.bias.sub_(mean).mul_(factor)
        last.weight.mul_(factor[:, None])


def probe_accuracy(
    model: nn.Module, probe: VisionProbe, processor, rows: list[dict], data_dir: Path
) -> dict[str, float]:
    """The probes' accuracy on held-out images (rows of `eval.jsonl`, one question each), per question kind; a
    question or answer outside the probes' (training) vocabulary counts as a miss."""
    model.eval()
    probe.eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            images = [Image.open(data_dir / r["image"]).convert("RGB") for r in chunk]
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            known = [probe.knows(r["question"], r["answer"]) for r in chunk]
            targets = probe.targets([[[r["kind"], r["question"], r["answer"]]] if k else [] for r, k in zip(chunk, known)])
            predicted = probe(vision_tokens(model, pixel_values)).argmax(-1)
            for row, target, guess, ok in zip(chunk, targets, predicted, known):
                asked = target != IGNORE
                hits.setdefault(row["kind"], []).append(ok and bool((guess[asked] == target[asked]).all()))
    return {kind: sum(h) / len(h) for kind, h in sorted(hits.items())}


def warm_up(
    model: nn.Module,
    processor,
    data_dir: str | Path,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    sam_lr: float = 1e-4,
    category_weights: dict[str, float] | None = None,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
    resize: Callable[[int, float], int] | None = None,
    timed_steps: int = 8,
) -> dict[str, Any]:
    """Train the vision towers (through the probes) and the LLM (on `text_warmup.jsonl` and, as text, the training
    images' descriptions) for `steps` steps.

    Each step takes one image batch (categories drawn by `category_weights`, default equal) and one text batch
    (half text task, half descriptions);
    learning rates decay linearly to zero. `resize(steps_done, seconds_per_step)`, called once after `timed_steps`
    steps (timed after one untimed first step), returns the new total (the time budget's calibration; the decay
    follows the new total from there). Returns the loss history and the probes' held-out accuracy per question kind.
    """
    data_dir = Path(data_dir)
    rows = read_jsonl(data_dir / "images_train.jsonl")
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    categories = sorted(by_category)
    weights = [(category_weights or {}).get(c, 1.0) for c in categories]
    held_out = [r for r in read_jsonl(data_dir / "eval.jsonl") if r["image"] is not None]
    torch.manual_seed(seed)
    config = model.config
    width = config.siglip_config.hidden_size + (config.sam_config.output_channels if config.is_hybrid else 0)
    probe = VisionProbe(width, probe_vocabulary(rows))
    facts = [encode_record(t, "text", processor, None, "all") for t in read_jsonl(data_dir / "text_warmup.jsonl")]
    descriptions = [
        encode_record({"text": pretraining_text(r["caption"], r["qa"])}, "text", processor, None, "all") for r in rows
    ]
    collator = VLCollator(pad_token_id=processor.tokenizer.eos_token_id, image_processor=processor.image_processor)

    vision = model.model.vision_model
    sam = list(vision.sam.parameters()) if vision.sam is not None else []
    others = [*vision.siglip.parameters(), *model.model.language_model.parameters(), *model.lm_head.parameters()]
    model.requires_grad_(False)
    for param in [*sam, *others]:
        param.requires_grad_(True)
    groups = [{"params": [*others, *probe.parameters()], "lr": learning_rate}]
    if sam:
        groups.append({"params": sam, "lr": sam_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    rng = random.Random(f"{seed}-warmup")
    history: list[dict[str, float]] = []
    model.train()
    probe.train()
    step, clock = 0, 0.0
    while step < steps:
        if step == 1:
            clock = time.perf_counter()
        if resize is not None and step == 1 + timed_steps:
            steps = max(step, resize(step, (time.perf_counter() - clock) / timed_steps))
            if step >= steps:
                break
        batch_rows = [rng.choice(by_category[c]) for c in rng.choices(categories, weights, k=batch_size)]
        images = [Image.open(data_dir / r["image"]).convert("RGB") for r in batch_rows]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        targets = probe.targets([r["qa"] for r in batch_rows])
        logits = probe(vision_tokens(model, pixel_values))
        vision_loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        half = batch_size // 2
        text_batch = rng.sample(facts, min(half, len(facts))) + rng.sample(descriptions, min(half, len(descriptions)))
        text_loss = model(**collator(text_batch)).loss
        optimizer.zero_grad(set_to_none=True)
        (vision_loss + text_loss).backward()
        for group, base in zip(optimizer.param_groups, base_lrs):
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
            group["lr"] = base * (1 - step / steps)
        optimizer.step()
        record = {"step": step + 1, "vision_loss": vision_loss.item(), "text_loss": text_loss.item()}
        history.append(record)
        if on_step:
            on_step(record)
        step += 1
    model.requires_grad_(True)
    fold_statistics(model, probe.norm.running_mean, (probe.norm.running_var + probe.norm.eps).sqrt())
    model.eval()
    sample = random.Random(f"{seed}-adapter").sample(rows, min(len(rows), 256))
    standardize_adapter_output(model, processor.image_processor(
        [Image.open(data_dir / r["image"]).convert("RGB") for r in sample], return_tensors="pt")["pixel_values"])
    return {"steps": steps, "history": history, "probe_accuracy": probe_accuracy(model, probe, processor, held_out, data_dir)}
