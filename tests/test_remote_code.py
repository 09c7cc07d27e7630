"""A saved folder loads with the Auto classes + trust_remote_code where this package cannot be imported,
on the installed transformers 5.x and on transformers 4.57.x (a second environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.compat import compat_pythonpath

# Runs in a fresh interpreter: blocks `deepseek_vl_hf`, loads the folder with the Auto classes, checks logits
# against the in-process reference and greedy tokens, and reports what it loaded.
SCRIPT = r"""
import importlib.abc, json, sys, os
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepseek_vl_hf":
            raise ImportError("deepseek_vl_hf is blocked in this test")
sys.meta_path.insert(0, _Block())
import torch, transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor
folder, ref = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
expected = load_file(ref)
from PIL import Image
import numpy as np
img = Image.fromarray((np.arange(64 * 48 * 3) % 251).astype("uint8").reshape(48, 64, 3))
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    add_generation_prompt=True, tokenize=False)
inputs = processor(text=prompt, images=[img], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
gen = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
try:
    import deepseek_vl_hf  # noqa
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({
    "transformers": transformers.__version__,
    "module": type(model).__module__,
    "processor": type(processor).__name__,
    "blocked": blocked,
    "input_ids_equal": bool(torch.equal(inputs["input_ids"], expected["input_ids"])),
    "max_logit_diff": float((logits - expected["logits"]).abs().max()),
    "tokens_equal": bool(torch.equal(gen, expected["generated"])),
}))
"""


def _reference(model, processor, folder: Path, tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.arange(64 * 48 * 3) % 251).astype("uint8").reshape(48, 64, 3))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = processor(text=prompt, images=[img], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref = tmp_path / "reference.safetensors"
    save_file({"input_ids": inputs["input_ids"], "logits": logits, "generated": generated}, str(ref))
    return ref


def _run(folder: Path, ref: Path, tmp_path: Path, extra_pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    if extra_pythonpath:
        env["PYTHONPATH"] = extra_pythonpath
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(ref)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_folder_holds_remote_code_and_auto_map(tiny_dir):
    files = {p.name for p in Path(tiny_dir).iterdir()}
    for name in ("configuration_deepseek_vl_hf.py", "modeling_deepseek_vl_hf.py", "processing_deepseek_vl_hf.py",
                 "image_processing_deepseek_vl_hf.py", "model.safetensors", "tokenizer.json"):
        assert name in files, name
    config = json.loads((Path(tiny_dir) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek_vl_hf.DeepseekVLHFForCausalLM"
    assert config["model_type"] == "deepseek_vl_hf"
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in Path(tiny_dir).iterdir())


def test_loads_without_the_package(tiny_pair, tiny_dir, tmp_path):
    model, processor = tiny_pair
    ref = _reference(model, processor, tiny_dir, tmp_path)
    report = _run(tiny_dir, ref, tmp_path)
    assert report["blocked"] and report["module"].startswith("transformers_modules")
    assert report["processor"] == "DeepseekVLHFProcessor"
    assert report["input_ids_equal"] and report["tokens_equal"]
    assert report["max_logit_diff"] == 0.0


@pytest.mark.compat
def test_loads_and_generates_on_transformers_4_57(tiny_pair, tiny_dir, tmp_path):
    model, processor = tiny_pair
    ref = _reference(model, processor, tiny_dir, tmp_path)
    report = _run(tiny_dir, ref, tmp_path, extra_pythonpath=compat_pythonpath())
    assert report["transformers"].startswith("4.57.")
    assert report["blocked"] and report["module"].startswith("transformers_modules")
    assert report["input_ids_equal"] and report["tokens_equal"]
    assert report["max_logit_diff"] < 1e-5
