"""Quantized inference on CPU: what int8 / int4 weight-only quantization (torchao, `--quantize`) costs and saves.

- `python -m bench --only quantization` (this section): the 7B shape (random weights, written once as a bf16
  folder): resident memory after load, prefill and decode tokens/s, bf16 vs int8 vs int4, each variant loaded
  in its own process, all in one run. `rows(mode)` returns the rows; `--smoke` runs the tiny preset.
- `python -m bench.quantization accuracy [--demo DIR] [--write-readme]`: the accuracy cost, fp32 vs bf16 vs
  int8 vs int4: greedy-answer agreement with fp32, held-out accuracy per category and logits error on a fixed
  batch; on a `deepseek-vl-hf demo` output folder when given, else on the tiny preset (random weights).
  `--write-readme` writes the table into README.md between its quantization markers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import Row, Target, isolated, setup, write_readme_block

TITLE = "Quantized inference (CPU): int8 / int4 weight-only (torchao) vs bf16, 7B shape"
LABELS = ("quantized", "bf16")
# Issue #20's goal: the 7B at int8 decodes faster than bf16 (the time ratio of the decode row below 1).
TARGETS = (Target("int8 decodes faster than bf16 (7B shape)", "int8: decode", 1.0, like_for_like_only=False),)
QUANTIZED = ("int8", "int4")
# mode -> (preset, overrides, prompt tokens, new tokens). 7B prefill in bf16 runs at a few tokens/s on 2 cores.
SHAPES: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "full": ("7b", {}, 16, 3),
    "quick": ("7b", {}, 8, 2),
    "smoke": ("tiny", {}, 8, 3),
}
CACHE = Path(os.environ.get("DEEPSEEK_VL_HF_BENCH_CACHE", Path.home() / ".cache" / "deepseek-vl-hf" / "bench"))
MEMORY_GOAL_MIB = 10 * 1024  # the 7B at int8 should fit in under 10 GiB resident
README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("<!-- quantization-accuracy:start -->", "<!-- quantization-accuracy:end -->")
VARIANTS = ("fp32", "bf16", "int8", "int4")  # int8 / int4 compute in bf16


def write_random_folder(output: Path, preset: str, overrides: dict[str, Any], seed: int = 0,
                        shard_bytes: int = 2 << 30) -> Path:
    """A bf16 random-weight checkpoint folder of `preset`, written shard by shard: the model is built on the
    meta device, so a 7B folder is written without holding 7B parameters (`deepseek-vl-hf init` holds them in
    fp32)."""
    import torch
    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import custom_object_save

    from deepseek_vl_hf.atomic import atomic_directory
    from deepseek_vl_hf.checkpoint import build_random_model

    with torch.device("meta"):
        model, processor = build_random_model(preset, overrides, seed=seed)
    model.config.dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(seed)
    # Every matrix is a stretch of one random pool (from a random start): drawing 7B normal values takes minutes.
    pool = (torch.randn(1 << 24, generator=generator) * 0.02).to(torch.bfloat16)
    with atomic_directory(output, overwrite=True) as tmp:
        custom_object_save(model, tmp, config=model.config)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}

        def flush() -> None:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard.clear()

        for key, meta in model.state_dict().items():
            if meta.ndim == 1:  # norms' scales at 1, biases at 0
                value = torch.ones(meta.shape) if "norm" in key and key.endswith("weight") else torch.zeros(meta.shape)
            else:
                start = int(torch.randint(len(pool), (1,), generator=generator))
                stretch = torch.cat([pool[start:], pool[:start]])
                value = stretch.repeat(-(-meta.numel() // len(pool)))[: meta.numel()].view(meta.shape)
            shard[key] = value.to(torch.bfloat16)
            if sum(t.numel() * 2 for t in shard.values()) >= shard_bytes:
                flush()
        if shard:
            flush()
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return output


def _folder(mode: str, scratch: Path) -> Path:
    """The mode's bf16 folder: the 7B one is written once into CACHE (14 GiB), the tiny one into `scratch`."""
    preset, overrides, _, _ = SHAPES[mode]
    folder = (CACHE if preset == "7b" else scratch) / f"{preset}-bf16-random"
    if not (folder / "model.safetensors.index.json").is_file():
        write_random_folder(folder, preset, overrides)
    return folder


def _resident_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _available_mib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


def _wait_for_memory(needed_mib: float, patience_s: float = 600) -> None:
    """Return once `needed_mib` are available (the machine may be shared); MemoryError after `patience_s`."""
    deadline = time.monotonic() + patience_s
    while _available_mib() < needed_mib:
        if time.monotonic() > deadline:
            raise MemoryError(f"{_available_mib():.0f} MiB available, {needed_mib:.0f} MiB needed: free memory first")
        time.sleep(10)


def measure(folder: str, quantize: str | None, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """In a fresh process: load `folder` in bf16 (quantized to `quantize`), then time a text prefill of
    `prompt_tokens` and `new_tokens` greedy decode steps with the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_vl_hf.quantization import load_quantized, quantized_layers

    # Shards are read into memory, not memory-mapped: a mapped bf16 model's weights are not resident until a
    # forward touches them, and a quantized load would keep the mapped bf16 pages it read in its RSS.
    start = time.perf_counter()
    if quantize:
        model = load_quantized(folder, quantize, "cpu", torch.bfloat16, disable_mmap=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                     disable_mmap=True).eval()
    load_s, resident = time.perf_counter() - start, _resident_mib()
    layers = quantized_layers(model)
    ids = torch.randint(100, 1000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # One untimed prefill + decode step of the timed shapes: compiles int8's graphs (compile_int8_linears)
        # and warms the allocator for every variant alike.
        start = time.perf_counter()
        warm = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        model(input_ids=warm.logits[:, -1:].argmax(-1), past_key_values=warm.past_key_values, use_cache=True)
        warmup_s = time.perf_counter() - start
        del warm
    cpu = time.process_time()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - start
    after_run = _resident_mib()
    llm_linears = sum(
        isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".language_model." in f".{n}."
    )
    return {
        "resident_mib": resident, "after_run_mib": after_run, "load_s": load_s, "warmup_s": warmup_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tok_s": new_tokens / decode_s, "cpu_wall": (time.process_time() - cpu) / (prefill_s + decode_s),
        "quantized": len(layers), "llm_linears": llm_linears,
        "outside_llm": sorted(n for n in layers if ".language_model." not in f".{n}."),
    }


def rows(mode: str) -> list[Row]:
    """The section's rows: per quantization, resident memory, prefill and decode speed against bf16."""
    _, _, prompt_tokens, new_tokens = SHAPES[mode]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = _folder(mode, Path(scratch))
        weights_mib = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        for name, quantize in (("bf16", None), *((q, q) for q in QUANTIZED)):
            _wait_for_memory(weights_mib)  # one model at a time, and only with room for its bf16 weights
            results[name] = isolated("bench.quantization:measure", folder=str(folder), quantize=quantize,
                                     prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    base, out = results["bf16"], []
    for q in QUANTIZED:
        r = results[q]
        # Checked: every LLM linear layer quantized, nothing in the vision towers, adapter or LM head.
        check = r["quantized"] == r["llm_linears"] and not r["outside_llm"]
        layers = f"{r['quantized']}/{r['llm_linears']} LLM linear layers quantized, {len(r['outside_llm'])} others"
        goal = ""
        if q == "int8" and SHAPES[mode][0] == "7b":
            goal = f"; goal < {MEMORY_GOAL_MIB} MiB: {'met' if r['resident_mib'] < MEMORY_GOAL_MIB else 'NOT met'}"
        cpu_wall = (r["cpu_wall"] + base["cpu_wall"]) / 2
        out += [
            Row(f"{q}: resident memory after load", "MiB", r["resident_mib"], base["resident_mib"], cpu_wall,
                note=f"after the decode {r['after_run_mib']:.0f} vs {base['after_run_mib']:.0f} MiB; load "
                f"{r['load_s']:.0f} s vs {base['load_s']:.0f} s; first (untimed) step {r['warmup_s']:.0f} s vs "
                f"{base['warmup_s']:.0f} s; {layers}{goal}", like_for_like=False,
                correct=check),
            Row(f"{q}: prefill, {prompt_tokens} tokens", "tokens/s", r["prefill_tok_s"], base["prefill_tok_s"],
                cpu_wall, higher_is_better=True, like_for_like=False, correct=check),
            Row(f"{q}: decode, {new_tokens} tokens (KV cache)", "tokens/s", r["decode_tok_s"], base["decode_tok_s"],
                cpu_wall, higher_is_better=True, like_for_like=False, correct=check),
        ]
    return out


def run(mode: str) -> list[Row]:
    """The bench section contract (bench/README.md)."""
    return rows(mode)


# ------------------------------------------------------------------------------------------------------ accuracy


def _load(folder: Path, variant: str):
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_vl_hf.quantization import load_quantized

    if variant in QUANTIZED:
        return load_quantized(folder, variant, "cpu", torch.bfloat16)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[variant]
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


def _batch_logits(model, processor, questions: list[dict[str, Any]], data_dir: Path):
    """fp32 logits of the fixed batch (the first 8 held-out questions with their images), padding dropped."""
    import torch
    from PIL import Image

    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}],
            add_generation_prompt=True, tokenize=False,
        )
        for q in questions
    ]
    images = [[Image.open(data_dir / q["image"]).convert("RGB")] for q in questions]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**inputs).logits.float()
    return logits[inputs["attention_mask"].bool()]


def accuracy(demo: str | None = None, eval_per_kind: int = 2) -> dict[str, Any]:
    """Per variant (fp32, bf16, int8, int4): greedy answers' agreement with fp32, held-out accuracy per category
    and the logits error against fp32 on a fixed batch. On `demo`'s model and held-out questions when given, else
    on the tiny preset with random weights and a small held-out set of the demo's generator."""
    from deepseek_vl_hf.demo import DEFAULT_MINUTES
    from deepseek_vl_hf.demo.evaluate import by_category, generate_answers, score
    from deepseek_vl_hf.demo.synthetic import generate_dataset
    from deepseek_vl_hf.demo.warmup import read_jsonl

    with tempfile.TemporaryDirectory() as scratch:
        if demo:
            folder, data_dir = Path(demo) / "model", Path(demo) / "data"
            metrics = json.loads((Path(demo) / "metrics.json").read_text())
            source = f"the demo's model (`{metrics['command']} --minutes {metrics['minutes']:g}`)"
            if metrics["minutes"] < DEFAULT_MINUTES:
                source += f", a shortened run (default {DEFAULT_MINUTES:g} minutes): compare with the chance row"
        else:
            folder, data_dir = Path(scratch) / "model", Path(scratch) / "data"
            write_random_folder(folder, "tiny", {})
            generate_dataset(data_dir, seed=0, train_per_category=1, eval_per_kind=eval_per_kind)
            source = "the tiny preset, random weights (accuracy is chance-level by construction)"
        questions = [row for row in read_jsonl(data_dir / "eval.jsonl") if row["image"] is not None]
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        table: dict[str, Any] = {}
        for variant in VARIANTS:
            model = _load(folder, variant)
            answers = generate_answers(model, processor, questions, data_dir, with_image=True)
            logits = _batch_logits(model, processor, questions[:8], data_dir)
            kinds = score(questions, answers)
            table[variant] = {"answers": answers, "logits": logits,
                              "categories": by_category(kinds, "accuracy")}
            del model
        chance = by_category(kinds, "chance")
    reference = table["fp32"]
    scale = float(reference["logits"].abs().max())
    results = {}
    for variant, entry in table.items():
        error = (entry["logits"] - reference["logits"]).abs()
        agree = sum(a.strip() == b.strip() for a, b in zip(entry["answers"], reference["answers"]))
        results[variant] = {
            "agreement": agree / len(questions),
            "categories": entry["categories"],
            "max_logit_error": float(error.max()) / scale,
            "mean_logit_error": float(error.mean()) / scale,
        }
    return {"source": source, "questions": len(questions), "variants": results, "chance": chance}


def accuracy_table(report: dict[str, Any]) -> str:
    """The README table of an `accuracy` report."""
    categories = list(next(iter(report["variants"].values()))["categories"])
    lines = [
        f"Measured on {report['source']}: {report['questions']} held-out questions with images, greedy answers; "
        "logits error on a fixed batch of 8 of them, relative to the largest fp32 logit. int8 / int4 quantize "
        "the language model's linear layers (torchao weight-only, bf16 compute); the vision towers, adapter and "
        "LM head stay in bf16. Written by `python -m bench.quantization accuracy --write-readme`.",
        "",
        "| variant | answers = fp32 | " + " | ".join(f"{c} acc." for c in categories)
        + " | max logit error | mean logit error |",
        "|---|---|" + "---|" * len(categories) + "---|---|",
    ]
    for variant, r in report["variants"].items():
        cells = " | ".join(f"{r['categories'][c]:.2f}" for c in categories)
        lines.append(f"| {variant} | {r['agreement']:.0%} | {cells} | {r['max_logit_error']:.4f} | "
                     f"{r['mean_logit_error']:.5f} |")
    chance = " | ".join(f"{report['chance'][c]:.2f}" for c in categories)
    lines.append(f"| chance | | {chance} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="fp32 vs bf16 vs int8 vs int4: agreement, accuracy, logits error")
    acc.add_argument("--demo", default=None, help="a `deepseek-vl-hf demo` output folder (default: tiny preset)")
    acc.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    setup()
    table = accuracy_table(accuracy(args.demo))
    print(table)
    if args.write_readme:
        write_readme_block(MARKERS, table)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
