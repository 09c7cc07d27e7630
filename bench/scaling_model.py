"""The scale model of docs/scaling.md: the 7B stage-2 recipe on 64 nodes x 8 A100 with FSDP + FlashAttention-2.

`python -m bench.scaling_model [--quick | --smoke] [--write]` measures the per-example data costs on this
machine (`bench.data_cost.costs`), counts the 7B model's parameters (built on the meta device), projects step
time, tokens/s, MFU and the data-loader workers per GPU, prints the tables and with `--write` replaces the
generated block of docs/scaling.md. Every assumption is in `ASSUMPTIONS` with its source; the document
explains them.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
BEGIN, END = "<!-- scaling-model:begin -->", "<!-- scaling-model:end -->"

# name: (value, source)
ASSUMPTIONS: dict[str, tuple[float, str]] = {
    "gpus": (512, "issue 17 / the paper's cluster: 64 nodes x 8 A100"),
    "peak_flops": (312e12, "A100 bf16 dense tensor-core peak (NVIDIA A100 datasheet)"),
    "hardware_utilisation": (0.57, "FSDP Llama-2-7B on A100, 4096-token sequences: 57% MFU = HFU, 3,700 "
                                   "tokens/s/GPU (PyTorch blog 'Maximizing training throughput using PyTorch "
                                   "FSDP', IBM + Meta, 2024)"),
    "global_batch": (2304, "Table 4 of arXiv 2403.05525 (7B stage 2); recipes/7b/stage2.yaml"),
    "sequence_length": (4096, "Table 4 (7B stage 2); data.max_length in recipes/7b/stage2.yaml"),
    "language_share": (0.7, "section 3.2.2: language:multimodal 7:3 (after the modality warm-up)"),
    "text_tokens_per_image_packed": (75, "MMC4 (arXiv 2304.06939, Table 1): 43B tokens / 571M images"),
    "interleaved_images": (5.6, "MMC4: 571M images / 101.2M documents"),
    "interleaved_text_tokens": (425, "MMC4: 43B tokens / 101.2M documents"),
    "caption_text_tokens": (50, "assumed (short captions; Capsfusion-style captions are a few dozen words)"),
    "document_text_tokens": (300, "assumed (OCR / table / chart text per image)"),
    "worker_headroom": (2, "ours: size the loader so a worker is busy at most half the time (images per sequence "
                           "and host load vary; measured costs here are from a loaded CPU)"),
    "steps": (42000, "Table 4 (7B stage 2); train.max_steps in recipes/7b/stage2.yaml"),
    "cores_per_gpu": (16, "DGX A100: 2 x 64-core AMD EPYC 7742 for 8 GPUs (NVIDIA DGX A100 datasheet)"),
}


def value(name: str) -> float:
    return ASSUMPTIONS[name][0]


def parameter_counts() -> dict[str, int]:
    """Parameters of the 7B preset per group (`training.stages.group_of`), counted on the meta device."""
    import torch
    from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM

    from deepseek_vl_hf.presets import preset_config
    from deepseek_vl_hf.training.stages import group_of

    config = preset_config("7b")
    with torch.device("meta"):
        model = DeepseekVLHFForCausalLM(config)
    counts = Counter()
    for name, param in model.named_parameters():
        counts["embed_tokens" if "embed_tokens" in name else group_of(name)] += param.numel()
    text, sam, siglip = config.text_config, config.sam_config, config.siglip_config
    return {
        **counts,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "image_tokens": config.num_image_tokens,
        "siglip_tokens": (siglip.image_size // siglip.patch_size) ** 2,
        "siglip_layers": siglip.num_hidden_layers,
        "siglip_hidden": siglip.hidden_size,
        "sam_tokens": (sam.image_size // sam.patch_size) ** 2,
        "sam_layers": sam.num_hidden_layers,
        "sam_global_layers": len(sam.global_attn_indexes),
        "sam_hidden": sam.hidden_size,
        "sam_window": sam.window_size,
    }


def vision_forward_flops(p: dict[str, int]) -> float:
    """Forward FLOPs of both frozen towers for one image (2 x params x tokens, plus attention: 4 T^2 d per full
    layer, windows of `sam_window`^2 tokens in SAM's local layers), and the trainable adapter and SAM new
    layers (6 x params x image tokens: forward and backward)."""
    siglip = 2 * p["siglip"] * p["siglip_tokens"] + 4 * p["siglip_tokens"] ** 2 * p["siglip_hidden"] * p["siglip_layers"]
    side = int(math.isqrt(p["sam_tokens"]))
    windows = math.ceil(side / p["sam_window"]) ** 2
    local = p["sam_layers"] - p["sam_global_layers"]
    sam = 2 * p["sam_body"] * p["sam_tokens"] + 4 * p["sam_hidden"] * (
        p["sam_global_layers"] * p["sam_tokens"] ** 2 + local * windows * p["sam_window"] ** 4
    )
    trainable = 6 * (p["aligner"] + p["sam_new_layers"]) * p["image_tokens"]
    return siglip + sam + trainable


def llm_flops_per_token(p: dict[str, int], context: float, recompute: bool) -> float:
    """Training FLOPs per token of the LLM (PaLM, arXiv 2204.02311 appendix B: 6N + 12 l d T, N without the
    input embeddings); with full activation checkpointing the forward runs twice (8N + 16 l d T)."""
    matmul_params = p["language_model"]  # lm_head included; the input embedding is a lookup
    attention = p["layers"] * p["hidden"] * context
    return (8 * matmul_params + 16 * attention) if recompute else (6 * matmul_params + 12 * attention)


def multimodal_sequences(p: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(tokens, images) of a multimodal training sequence: packed as in the paper, or one record per sequence
    as this recipe trains (no packing), averaged over its three equally weighted multimodal sources."""
    length, image = value("sequence_length"), p["image_tokens"]
    per_image = image + value("text_tokens_per_image_packed")
    records = [
        (value("interleaved_images"), value("interleaved_text_tokens")),
        (1, value("caption_text_tokens")),
        (1, value("document_text_tokens")),
    ]
    unpacked = [(min(length, n * image + t + 2), n) for n, t in records]
    return {
        "packed (paper)": (length, length / per_image),
        "one record per sequence (this recipe)": (
            sum(t for t, _ in unpacked) / len(unpacked),
            sum(n for _, n in unpacked) / len(unpacked),
        ),
    }


def project(costs: dict[str, Any], p: dict[str, int], per_device: int) -> list[dict[str, Any]]:
    """Per scenario: step times, tokens/s per GPU, MFU and loader workers per GPU (sharded and not)."""
    gpus, peak, eta = value("gpus"), value("peak_flops"), value("hardware_utilisation")
    length, share = value("sequence_length"), value("language_share")
    image_ms = costs["decode_ms"] + costs["preprocess_ms"]
    token_ms = costs["encode_text_ms"] / costs["text_tokens"]
    vision = vision_forward_flops(p)
    rows = []
    for scenario, (tokens, images) in multimodal_sequences(p).items():
        kinds = {"language": (length, 0.0, share), "multimodal": (tokens, images, 1 - share)}
        step, model_flops, data, count = {}, 0.0, {}, 0.0
        for kind, (t, n, weight) in kinds.items():
            hardware = per_device * (t * llm_flops_per_token(p, t, True) + n * vision)
            step[kind] = hardware / (eta * peak)
            model_flops += weight * per_device * (t * llm_flops_per_token(p, t, False) + n * vision)
            data[kind] = per_device * (n * image_ms + t * token_ms) / 1000
            count += weight * per_device * t
        mean_step = sum(kinds[k][2] * step[k] for k in kinds)
        mean_data = sum(kinds[k][2] * data[k] for k in kinds)
        workers = max(math.ceil(data[k] / step[k]) for k in kinds)
        rows.append({
            "scenario": scenario,
            "tokens_per_multimodal_sequence": tokens,
            "images_per_multimodal_sequence": images,
            "step_s": step,
            "tokens_per_s_per_gpu": count / mean_step,
            "tokens_per_s_cluster": gpus * count / mean_step,
            "mfu": model_flops / mean_step / peak,
            "data_s": data,
            "workers_keep_up": workers,
            "workers_average": math.ceil(mean_data / mean_step),
            "workers_recommended": max(1, math.ceil(value("worker_headroom") * max(data[k] / step[k] for k in kinds))),
            "days": value("steps") * mean_step / 86400,
            "workers_unsharded": math.ceil(gpus * mean_data / mean_step),
        })
    return rows


def batch_layouts(gpus: int = 512, per_gpu_max: int = 4) -> list[str]:
    """How the paper's global batch of 2304 splits on 8-GPU nodes: (nodes, per-device batch, accumulation)."""
    batch = int(value("global_batch"))
    layouts = []
    for nodes in range(1, gpus // 8 + 1):
        for per_device in range(per_gpu_max, 0, -1):
            if batch % (nodes * 8 * per_device) == 0:
                layouts.append(f"{nodes} x 8 GPUs: {per_device} x {batch // (nodes * 8 * per_device)}")
                break
    return layouts


def render(costs: dict[str, Any], p: dict[str, int], rows: list[dict[str, Any]], mode: str) -> str:
    per_device = rows[0]["per_device"]
    lines = [
        f"Generated by `python -m bench.scaling_model{'' if mode == 'full' else ' --' + mode} --write`; do not edit "
        "by hand.",
        "",
        "Measured on this machine (one process; a shared 2-core CPU under load, cpu/wall "
        f"{costs['cpu_wall']:.2f}), 7B processor, {costs['image']}:",
        "",
        "| per-example data cost | ms |",
        "|---|---|",
        f"| decode the JPEG | {costs['decode_ms']:.1f} |",
        f"| preprocess (resize, pad, normalise to 1024 px) | {costs['preprocess_ms']:.1f} |",
        f"| encode a caption pair (decode + tokenise) | {costs['encode_pair_ms']:.1f} |",
        f"| tokenise a {costs['text_tokens']}-token text document | {costs['encode_text_ms']:.1f} |",
        f"| tiny model training step here (batch {costs['tiny_step_batch']}, fp32, s) | {costs['tiny_step_s']:.3f} |",
        "",
        f"7B parameters: LLM {p['language_model'] / 1e9:.2f} B (+ input embedding {p['embed_tokens'] / 1e9:.2f} B), "
        f"SigLIP-L {p['siglip'] / 1e6:.0f} M, SAM-B {p['sam_body'] / 1e6:.0f} M, adapter "
        f"{p['aligner'] / 1e6:.1f} M, SAM new layers {p['sam_new_layers'] / 1e6:.1f} M; vision forward per image "
        f"{vision_forward_flops(p) / 1e12:.2f} TFLOP.",
        "",
        f"Projection, {int(value('gpus'))} A100, {per_device} sequences per GPU per optimizer step "
        f"(global batch {per_device * int(value('gpus'))}), language share {value('language_share')}:",
        "",
        "| multimodal sequences | tokens, images per multimodal seq. | step s (language / multimodal) | "
        "tokens/s per GPU | tokens/s cluster | MFU | data s per step per GPU (lang. / mm.) | "
        "loader workers per GPU (keep up / average / recommended) | workers per GPU without per-rank sharding | "
        "days for the recipe's steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        step, data = row["step_s"], row["data_s"]
        lines.append(
            f"| {row['scenario']} | {row['tokens_per_multimodal_sequence']:.0f}, "
            f"{row['images_per_multimodal_sequence']:.1f} | {step['language']:.2f} / {step['multimodal']:.2f} | "
            f"{row['tokens_per_s_per_gpu']:,.0f} | {row['tokens_per_s_cluster'] / 1e6:.2f} M | "
            f"{row['mfu'] * 100:.0f}% | {data['language']:.3f} / {data['multimodal']:.3f} | "
            f"{row['workers_keep_up']} / {row['workers_average']} / {row['workers_recommended']} | "
            f"{row['workers_unsharded']:,} | {row['days']:.1f} |"
        )
    most = max(row["workers_recommended"] for row in rows)
    lines += [
        "",
        f"Host cores per GPU (`cores_per_gpu`): {value('cores_per_gpu'):g}; the recommended sharded loader has at most {most} "
        f"worker(s) per GPU: {'fits' if most < value('cores_per_gpu') else 'does NOT fit'} (one core left for the "
        "training process).",
        "",
        "The paper's global batch of 2304 on 8-GPU nodes, largest per-device batch <= 4 "
        "(nodes: per-device x accumulation): " + "; ".join(batch_layouts()) + ".",
        "",
        "Assumptions:",
        "",
    ]
    lines += [f"- `{name}` = {v:g}: {source}" for name, (v, source) in ASSUMPTIONS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_model", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true", help="small images, one repeat (checks the script runs)")
    parser.add_argument("--write", action="store_true", help=f"replace the generated block of {DOC}")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"

    from .data_cost import costs as measure_costs
    from .harness import setup

    setup(threads=1)
    costs = measure_costs(mode)
    params = parameter_counts()
    per_device = 4  # the recipe's per-device batch; 4 x 512 = 2048 (2304 does not split over 512 GPUs)
    rows = project(costs, params, per_device)
    for row in rows:
        row["per_device"] = per_device
    block = render(costs, params, rows, mode)
    print(block)
    if args.write:
        text = DOC.read_text(encoding="utf-8")
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC} has no {BEGIN} ... {END} block")
        DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
