"""Hub model cards: front matter, a usage snippet that runs as written, architecture and training sections."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from deepseek_vl_hf.cards import TrainingMetadataError, format_count, render_card, write_card
from deepseek_vl_hf.commands import card as card_command

METADATA = {  # the format `deepseek-vl-hf train` writes (deepseek_vl_hf.training.metadata), the fields the card uses
    "format_version": 1,
    "recipe_name": "tiny-3stage",
    "recipe": {"train": {"learning_rate": 1e-3, "weight_decay": 0.0}},
    "base_model": "deepseek-ai/deepseek-vl-1.3b-base",
    "stages": [
        {"name": "stage1", "trainable": ["aligner"], "steps": 200, "learning_rate": 1e-3, "batch_size": 8,
         "data_mix": {"captions": 0.5, "ocr": 0.5}, "metrics": {"loss": 2.31}},
        {"name": "stage3", "trainable": ["language_model", "aligner", "siglip"], "steps": 100,
         "data_mix": {"language": 0.7, "multimodal": 0.3}},
    ],
    "final_metrics": {"eval_loss": 1.9, "vqa_accuracy": 0.41},
}


@pytest.fixture
def folder(tiny_dir, tmp_path):
    target = tmp_path / "tiny-card"
    shutil.copytree(tiny_dir, target)
    return target


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


def test_front_matter_and_architecture(folder, tiny_pair):
    text = render_card(folder, base_model="deepseek-ai/deepseek-vl-7b-chat")
    front = _front_matter(text)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-text-to-text"
    assert front["base_model"] == "deepseek-ai/deepseek-vl-7b-chat"
    assert front["license"] == "other" and front["license_name"] == "deepseek"
    assert {"deepseek-vl", "custom_code"} <= set(front["tags"])
    model, _ = tiny_pair
    total = sum(p.numel() for p in model.parameters())
    assert f"**{format_count(total)}**" in text
    assert "SAM-B-style ViT on 256px" in text and "36 image tokens per image" in text
    assert "## Training" not in text
    plain = _front_matter(render_card(folder))
    assert plain["license"] == "mit" and "base_model" not in plain


def test_snippet_runs_against_the_folder(folder):
    """The README's Python block, run as written (with the folder as model id) in a fresh interpreter."""
    path = write_card(folder, model_id=str(folder))
    snippet = re.search(r"```python\n(.*?)```", path.read_text(), re.S).group(1)
    assert f'path = "{folder}"' in snippet
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=300,
                          cwd=folder.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.endswith("\n")  # the decoded answer (random words from a random model)


def test_training_metadata_sections(folder):
    (folder / "training_metadata.json").write_text(json.dumps(METADATA))
    text = render_card(folder)
    assert _front_matter(text)["base_model"] == "deepseek-ai/deepseek-vl-1.3b-base"
    assert "Recipe: **tiny-3stage**" in text
    assert "| stage1 | aligner | 200 | 0.001 | 8 | captions: 0.5, ocr: 0.5 | loss: 2.31 |" in text
    assert "| stage3 | language_model, aligner, siglip | 100 | - | - | language: 0.7, multimodal: 0.3 | - |" in text
    assert "| language | 0.7 |" in text and "| optimizer | adamw |" in text and "| vqa_accuracy | 0.41 |" in text
    assert "| learning_rate | 0.001 |" in text and "| weight_decay | 0.0 |" in text


@pytest.mark.parametrize("change, message", [
    ({"recipe_name": None}, "needs a 'recipe_name'"),
    ({"format_version": 99}, "format_version 99 is not one this version reads"),
    ({"recipe": "tiny"}, "'recipe' has the wrong type str"),  # the card-only format of old
    ({"stages": [{"name": "s", "steps": "many"}]}, r"stages\[0\]: 'steps' has the wrong type"),
    ({"final_metrics": [1, 2]}, "'final_metrics' has the wrong type"),
])
def test_bad_training_metadata_is_refused(folder, change, message):
    data = {k: v for k, v in {**METADATA, **change}.items() if v is not None}
    (folder / "training_metadata.json").write_text(json.dumps(data))
    with pytest.raises(TrainingMetadataError, match=message):
        render_card(folder)


def test_card_command(folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    card_command.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "CARD.md"
    args = parser.parse_args(["card", "--model", str(folder), "--output", str(out), "--model-id", "me/tiny",
                              "--license", "apache-2.0"])
    args.func(args)
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert _front_matter(text)["license"] == "apache-2.0" and 'path = "me/tiny"' in text and "# me/tiny" in text
