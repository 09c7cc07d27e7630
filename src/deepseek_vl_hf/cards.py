"""Hub model cards (README.md) for checkpoint folders, rendered from `model_cards/README.template.md`.

The card has YAML front matter (license, `library_name`, `pipeline_tag`, `base_model` when known, tags), a usage
snippet with the Auto classes that runs as written against the folder, the architecture summary read from the
config and the weight headers, and the training sections when the folder holds a `training_metadata.json`.

The training sections come from `training_metadata.json` as `deepseek-vl-hf train` writes it, read by the one
reader, `deepseek_vl_hf.training.metadata.read_metadata` (its docstring has the format): the recipe, the
stage history (`stages`), the data mix of the last stage, its hyper-parameters and final metrics. A LoRA
adapter folder (what `train` writes with `peft`) gets the adapter card (`deepseek_vl_hf.lora.adapter_card`).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from deepseek_vl_hf.conversion.shards import CheckpointReader
from deepseek_vl_hf.modeling.configuration_deepseek_vl_hf import DeepseekVLHFConfig
from deepseek_vl_hf.training.metadata import TrainingMetadataError, read_metadata

__all__ = ["TrainingMetadataError", "format_count", "parameter_counts", "render_card", "write_card"]

TEMPLATE = Path(str(importlib.resources.files("deepseek_vl_hf.model_cards") / "README.template.md"))
TAGS = ["deepseek-vl", "deepseek-vl-hf", "vision-language", "multimodal", "custom_code"]
DEEPSEEK_MODEL_LICENSE = "https://github.com/deepseek-ai/DeepSeek-VL/blob/main/LICENSE-MODEL"
_COMPONENTS = (
    ("model.vision_model.sam.", "vision, high resolution"),
    ("model.vision_model.siglip.", "vision, low resolution"),
    ("model.aligner.", "adapter"),
    ("model.language_model.", "language model"),
    ("lm_head.", "language model"),
)

SNIPPET = """\
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM, AutoProcessor

path = "{model_id}"
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto").eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)

image = Image.new("RGB", (640, 480), "white")
ImageDraw.Draw(image).ellipse((200, 120, 440, 360), fill="red")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(text=prompt, images=[image], return_tensors="pt").to(model.device)
with torch.inference_mode():
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])"""


def format_count(count: int) -> str:
    """1_234_567 -> '1.23 M', 7_343_990_017 -> '7.34 B'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def _pairs(mapping: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (mapping or {}).items()) or "-"


def parameter_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Parameters per component (and 'total'), from the weight files' headers (no tensor is loaded)."""
    counts = dict.fromkeys([label for _, label in _COMPONENTS] + ["total"], 0)
    for spec in CheckpointReader(folder).specs():
        numel = 1
        for size in spec.shape:
            numel *= size
        label = next((lab for prefix, lab in _COMPONENTS if spec.name.startswith(prefix)), None)
        if label is not None:
            counts[label] += numel
        counts["total"] += numel
    return counts


def _architecture(config: DeepseekVLHFConfig, counts: dict[str, int]) -> list[dict[str, str]]:
    rows = []
    if config.is_hybrid:
        sam = config.sam_config
        rows.append({"component": "vision, high resolution", "parameters": format_count(counts["vision, high resolution"]),
                     "details": f"SAM-B-style ViT on {sam.image_size}px: width {sam.hidden_size}, {sam.num_hidden_layers} "
                                f"blocks, {sam.num_attention_heads} heads, global attention in blocks "
                                f"{sam.global_attn_indexes}, neck {sam.neck_channels} -> convs {sam.downsample_channels}"})
    siglip = config.siglip_config
    rows.append({"component": "vision, low resolution", "parameters": format_count(counts["vision, low resolution"]),
                 "details": f"SigLIP ViT on {siglip.image_size}px, patch {siglip.patch_size}: width {siglip.hidden_size}, "
                            f"{siglip.num_kept_layers} blocks, {siglip.num_attention_heads} heads"})
    rows.append({"component": "adapter", "parameters": format_count(counts["adapter"]),
                 "details": f"{config.aligner_type} (depth {config.aligner_depth}), {config.num_image_tokens} "
                            "image tokens per image"})
    text = config.text_config
    rows.append({"component": "language model", "parameters": format_count(counts["language model"]),
                 "details": f"Llama: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
                            f"{text.num_attention_heads} heads ({text.num_key_value_heads} KV), vocabulary "
                            f"{text.vocab_size}"})
    rows.append({"component": "**total**", "details": "", "parameters": f"**{format_count(counts['total'])}**"})
    return rows


_HYPERPARAMETERS = ("learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                    "max_grad_norm", "max_steps", "per_device_batch_size", "gradient_accumulation_steps", "bf16")


def _rounded(mapping: dict[str, Any] | None) -> list[tuple[str, Any]]:
    return [(k, round(v, 4) if isinstance(v, float) else v) for k, v in (mapping or {}).items()]


def _training(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """The card's training sections from `train`'s metadata (format: `deepseek_vl_hf.training.metadata`)."""
    if metadata is None:
        return None
    stages = [
        {"name": s["name"], "trainable": ", ".join(s.get("trainable") or []) or "-",
         "steps": s.get("steps") or "-", "learning_rate": s.get("learning_rate") or "-",
         "batch_size": s.get("batch_size") or "-", "data_mix": _pairs(s.get("data_mix")), "metrics": _pairs(s.get("metrics"))}
        for s in metadata.get("stages") or []
    ]
    train = (metadata.get("recipe") or {}).get("train") or {}
    hyperparameters = metadata.get("hyperparameters") or {
        "optimizer": "adamw", **{key: train[key] for key in _HYPERPARAMETERS if key in train}}
    history = metadata.get("stages") or [{}]
    return {
        "recipe": metadata["recipe_name"], "base_model": metadata.get("base_model"), "stages": stages,
        "data_mix": list((history[-1].get("data_mix") or {}).items()),  # the last stage's
        "hyperparameters": _rounded(hyperparameters), "final_metrics": _rounded(metadata.get("final_metrics")),
    }


def render_card(
    folder: str | os.PathLike,
    *,
    base_model: str | None = None,
    model_id: str | None = None,
    title: str | None = None,
    license_id: str | None = None,
    template: str | os.PathLike = TEMPLATE,
) -> str:
    """The README text for the checkpoint in `folder`.

    `model_id` is the path or Hub id the snippet loads (default: the folder's name), `title` the card's heading
    (default: `model_id`); `base_model` the Hub id of the
    weights it comes from (default: the training metadata's); `license_id` defaults to DeepSeek's model license for
    `deepseek-ai/...` base models, else MIT.
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    if (folder / "adapter_config.json").is_file():
        from deepseek_vl_hf.lora import adapter_folder_card

        return adapter_folder_card(folder, base_model=base_model, metadata=metadata)
    config = DeepseekVLHFConfig.from_pretrained(folder)
    preprocessor = json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    base_model = base_model or (metadata or {}).get("base_model")
    if license_id is None:
        license_id = "other" if base_model and base_model.startswith("deepseek-ai/") else "mit"
    front: dict[str, Any] = {"license": license_id}
    if license_id == "other":
        front.update(license_name="deepseek", license_link=DEEPSEEK_MODEL_LICENSE)
    front.update(library_name="transformers", pipeline_tag="image-text-to-text")
    if base_model:
        front["base_model"] = base_model
    front["tags"] = TAGS
    variant = "hybrid SAM-B + SigLIP vision encoder" if config.is_hybrid else "SigLIP-only vision encoder"
    background = preprocessor.get("background_color") or [int(m * 255) for m in preprocessor.get("image_mean", [])]
    context = {
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True),
        "title": title or model_id or folder.name,
        "intended_use": (metadata or {}).get("intended_use"),
        "summary": f"A DeepSeek-VL vision-language model ({variant}, {config.num_image_tokens} image tokens per image, "
                   f"Llama language model) that answers questions about images in a chat.",
        "provenance": f"Weights derived from [`{base_model}`](https://huggingface.co/{base_model})." if base_model else "",
        "snippet": SNIPPET.format(model_id=model_id or folder.name),
        "image_tokens": config.num_image_tokens,
        "architecture": _architecture(config, parameter_counts(folder)),
        "image_size": config.image_size,
        "background": tuple(background),
        "dtype": str(getattr(config, "dtype", None) or "float32").replace("torch.", ""),
        "training": _training(metadata),
        "license_text": (f"The weights are under the [DeepSeek model license]({DEEPSEEK_MODEL_LICENSE}); the code "
                         "files are MIT." if license_id == "other" else f"`{license_id}` (weights and code)."),
    }
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return re.sub(r"\n{3,}", "\n\n", env.from_string(Path(template).read_text()).render(**context))


def write_card(folder: str | os.PathLike, output: str | os.PathLike | None = None, **kwargs: Any) -> Path:
    """Render the card for `folder` and write it (default `folder/README.md`); kwargs as for `render_card`."""
    path = Path(output) if output is not None else Path(folder) / "README.md"
    path.write_text(render_card(folder, **kwargs))
    return path
