"""LoRA fine-tuning: presets target exactly the modules they name, training moves only the adapter's weights,
the adapter reloads in a fresh process without this package, the merged checkpoint matches base + adapter,
and gradients reach LoRA weights of checkpointed layers."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.conftest import make_image

peft = pytest.importorskip("peft")

from deepseek_vl_hf import lora  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "enabled": True,
    "preset": "llm+adapter",
    "train_adapter_fully": True,
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
}
ANSWERS = ["a red square", "two blue circles on grey", "a green line", "one small yellow star"]


def _batch(processor, image_token_id: int) -> dict[str, torch.Tensor]:
    """Four image + answer chats; labels are the input ids with image tokens and padding masked."""
    chats = [
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        for answer in ANSWERS
    ]
    prompts = [processor.apply_chat_template(chat, tokenize=False) for chat in chats]
    images = [make_image(64 + 16 * i, 48, seed=10 + i) for i in range(len(ANSWERS))]
    batch = dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))
    labels = batch["input_ids"].clone()
    labels[(labels == image_token_id) | (batch["attention_mask"] == 0)] = -100
    return {**batch, "labels": labels}


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _lora_targets(peft_model) -> set[str]:
    """Names (in the base model) of the modules that got LoRA weights."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and len(module.lora_A)
    }


@pytest.fixture(scope="module")
def trained(tiny_dir):
    """A LoRA model trained 30 steps on the fixed batch; the base is the tiny folder (trust_remote_code)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True)
    batch = _batch(processor, base.config.image_token_id)
    model = lora.apply_lora(base, SETTINGS)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return {"model": model.eval(), "batch": batch, "before": before, "losses": losses}


def test_training_lowers_loss_and_changes_only_adapter_weights(trained):
    losses, model = trained["losses"], trained["model"]
    assert losses[-1] < 0.75 * losses[0], losses
    changed, unchanged = [], []
    for name, param in model.named_parameters():
        (unchanged if torch.equal(param, trained["before"][name]) else changed).append(name)
        assert param.requires_grad == ("lora_" in name or ".modules_to_save." in name), name
    assert changed and all("lora_" in n or ".modules_to_save." in n for n in changed), changed
    # Every LoRA B matrix (zero at the start) and the fully trained adapter copy moved.
    assert all(n in changed for n in trained["before"] if "lora_B" in n or ".modules_to_save." in n)
    assert any(".aligner.original_module." in n for n in unchanged)


# Runs in a fresh interpreter where `deepseek_vl_hf` cannot be imported: the base from its folder with
# trust_remote_code, the adapter with PeftModel.from_pretrained, the merged folder with the Auto classes;
# then a plain `get_peft_model` (config read from the adapter folder) trained 2 steps by the HF Trainer.
SCRIPT = r"""
import json, sys
sys.modules["deepseek_vl_hf"] = None  # `import deepseek_vl_hf` raises ImportError from here on
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
base_dir, adapter_dir, merged_dir, ref_path, out_dir = sys.argv[1:]
ref = load_file(ref_path)
inputs = {k: ref[k] for k in ("input_ids", "attention_mask", "pixel_values")}

def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()

def max_diff(model):
    with torch.no_grad():
        return float((model(**inputs).logits - ref["logits"]).abs().max())

adapted = PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
report = {"adapter_diff": max_diff(adapted), "merged_diff": max_diff(load(merged_dir)),
          "base_diff": max_diff(load(base_dir)), "module": type(adapted.get_base_model()).__module__}

config = LoraConfig.from_pretrained(adapter_dir)
config.inference_mode = False  # saved adapters are marked for inference
model = get_peft_model(load(base_dir), config)
before = {n: p.detach().clone() for n, p in model.named_parameters()}
keys = ("input_ids", "attention_mask", "labels")
rows = [{**{k: ref[k][i] for k in keys}, "pixel_values": ref["pixel_values"][i : i + 1]}
        for i in range(len(ref["input_ids"]))]

def collate(items):
    return {**{k: torch.stack([x[k] for x in items]) for k in keys},
            "pixel_values": torch.cat([x["pixel_values"] for x in items])}

args = TrainingArguments(out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=5e-3,
                         save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
                         disable_tqdm=True)
result = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
adapter_only = bool(moved) and all("lora_" in n or "modules_to_save" in n for n in moved)
report.update(trainer_loss=result.training_loss, trainer_moved_lora=any("lora_B" in n for n in moved),
              trainer_moved_only_adapter=adapter_only)
try:
    import deepseek_vl_hf  # noqa: F401
    report["blocked"] = False
except ImportError:
    report["blocked"] = True
print(json.dumps(report))
"""


def test_adapter_reloads_without_the_package_and_merge_matches(trained, tiny_dir, tmp_path):
    from deepseek_vl_hf.cli import main

    model, batch = trained["model"], trained["batch"]
    recipe = {
        "name": "test-lora",
        "data": {"sources": [{"name": "chats", "kind": "conversations", "path": "c.jsonl"}]},
    }
    adapter = lora.save_adapter(
        model,
        tmp_path / "adapter",
        base_model=str(tiny_dir),
        recipe=recipe,
        metrics={"train_loss": trained["losses"][-1]},
    )
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    card = (adapter / "README.md").read_text()
    assert f"base_model: {tiny_dir}" in card and "`chats`: conversations from `c.jsonl`" in card
    assert "name: test-lora" in card and "modules_to_save: `['aligner']`" in card

    merged = tmp_path / "merged"
    main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter), "--output", str(merged)])
    assert {"model.safetensors", "config.json", "processor_config.json", "modeling_deepseek_vl_hf.py"} <= {
        p.name for p in merged.iterdir()
    }

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ref = tmp_path / "reference.safetensors"
    save_file({**batch, "logits": logits}, str(ref))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    folders = (tiny_dir, adapter, merged, ref, tmp_path / "trainer")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, folders)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["blocked"] and report["module"].startswith("transformers_modules"), report
    assert report["adapter_diff"] <= 1e-5, report
    assert report["merged_diff"] <= 1e-4, report
    assert report["base_diff"] > 1e-2, report  # the adapter does change the model
    assert report["trainer_moved_only_adapter"] and report["trainer_moved_lora"], report
    assert math.isfinite(report["trainer_loss"]), report


def _expected(linear: list[str], preset: str, adapter_fully: bool = False) -> set[str]:
    """The modules a preset names, picked from the model's Linear layers by component (not by the regexes)."""
    llm = [n for n in linear if n.startswith("model.language_model.layers.")]
    picks = {n for n in llm if n.split(".")[-2] == "self_attn"}
    if preset != "llm-attention":
        picks |= {n for n in llm if n.split(".")[-2] == "mlp"}
    if preset.startswith("llm+adapter") and not adapter_fully:
        picks |= {n for n in linear if n.startswith("model.aligner.")}
    if preset == "llm+adapter+sam":
        picks |= {n for n in linear if n.startswith("model.vision_model.sam.blocks.")}
    return picks


@pytest.mark.parametrize("preset", sorted(lora.PRESETS))
@pytest.mark.parametrize("pair", ["tiny_pair", "tiny_siglip_pair"])
def test_each_preset_targets_exactly_its_modules(preset, pair, request):
    model = copy.deepcopy(request.getfixturevalue(pair)[0])
    linear = _linear_names(model)
    peft_model = lora.apply_lora(model, {"preset": preset})
    targets = _lora_targets(peft_model)
    assert targets == _expected(linear, preset)
    assert not any(".siglip." in n for n in targets)
    assert targets <= set(linear)  # Linear layers only (never the adapter's GELUs)


def test_adapter_trained_fully_is_saved_not_lora(tiny_pair):
    model = copy.deepcopy(tiny_pair[0])
    linear = _linear_names(model)
    peft_model = lora.apply_lora(model, {"preset": "llm+adapter+sam", "train_adapter_fully": True})
    assert _lora_targets(peft_model) == _expected(linear, "llm+adapter+sam", adapter_fully=True)
    assert peft_model.peft_config["default"].modules_to_save == ["aligner"]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable and all(".aligner.modules_to_save.default." in n for n in trainable)


def test_free_target_modules_and_settings_errors(tiny_pair):
    model = copy.deepcopy(tiny_pair[0])
    peft_model = lora.apply_lora(
        model, {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    )
    assert {n.rsplit(".", 1)[1] for n in _lora_targets(peft_model)} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="unknown key"):
        lora.PeftSettings.from_mapping({"preset": "llm-attention", "rank": 8})
    with pytest.raises(ValueError, match="either preset or target_modules"):
        lora.PeftSettings(preset="llm-attention", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="peft.preset must be one of"):
        lora.PeftSettings(preset="everything")
    with pytest.raises(ValueError, match="set a preset"):
        lora.lora_config(model, lora.PeftSettings())


def test_gradient_checkpointing_passes_gradients_to_lora(tiny_pair):
    processor = tiny_pair[1]
    model = lora.apply_lora(copy.deepcopy(tiny_pair[0]), {"preset": "llm+adapter+sam", "dropout": 0.0})
    for name, param in model.named_parameters():  # non-zero B, so that every LoRA A gets a gradient too
        if "lora_B" in name:
            nn.init.normal_(param, std=0.02)
    batch = {k: v[:1] for k, v in _batch(processor, model.config.image_token_id).items()}  # one image
    model.train()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    lora.enable_gradient_checkpointing(model)
    calls: list[str] = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False):
            func = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, _f=func, _n=name, **k: (
                calls.append(_n) or _f(*a, **k)
            )
    checkpointed = grads()
    assert any(".language_model.layers." in n for n in calls) and any(".sam" in n for n in calls), calls
    lora_names = {n for n, p in model.named_parameters() if "lora_" in n}
    assert any(".sam.blocks." in n for n in lora_names)
    assert set(checkpointed) == set(reference) == lora_names
    for name in lora_names:
        assert checkpointed[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "has_bnb,has_cuda,missing",
    [
        (False, False, ["bitsandbytes", "CUDA GPU"]),
        (True, False, ["CUDA GPU"]),
        (False, True, ["bitsandbytes"]),
    ],
)
def test_qlora_without_its_requirements_names_what_is_missing(
    tiny_pair, monkeypatch, has_bnb, has_cuda, missing
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if has_bnb else None) if name == "bitsandbytes" else find_spec(name, *a),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    settings = {"preset": "llm-attention", "qlora": True}
    assert lora.base_loading_kwargs({**settings, "qlora": False}) == {}
    for attempt in (
        lambda: lora.base_loading_kwargs(settings),
        lambda: lora.apply_lora(tiny_pair[0], settings),
    ):
        with pytest.raises(lora.QLoRAUnavailableError) as info:
            attempt()
        message = str(info.value)
        for what in ["bitsandbytes", "CUDA GPU"]:
            assert (what in message) == (what in missing), message


@pytest.mark.parametrize("name", ["lora_sft_tiny", "lora_sft_7b"])
def test_recipes_parse(name):
    from deepseek_vl_hf.training.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.stage == 3 and recipe.model.init_from
    assert recipe.peft.enabled and recipe.peft.preset in lora.PRESETS


def test_readme_lora_flow_init_train_merge(tiny_dir, tmp_path, monkeypatch):
    """The README's LoRA section: `train recipes/lora_sft_tiny.yaml` on a base folder writes an adapter folder
    (card + metadata) in which only LoRA weights moved; `merge` gives a folder with base + adapter's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deepseek_vl_hf.cli import main
    from deepseek_vl_hf.training.recipe import RecipeError, load_recipe

    monkeypatch.chdir(REPO)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    main(["train", "recipes/lora_sft_tiny.yaml", "--set", f"model.init_from={tiny_dir}",
          "--set", f"train.output_dir={adapter}", "--set", "train.max_steps=4", "--set", "train.save_steps=4",
          "--set", "train.eval_steps=0"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_metadata.json"} <= {
        p.name for p in adapter.iterdir()
    }
    metadata = json.loads((adapter / "training_metadata.json").read_text())
    assert metadata["trainable_groups"] == ["lora"] and metadata["steps"] == 4
    assert str(tiny_dir) in (adapter / "README.md").read_text()
    main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter), "--output", str(merged)])

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    moved = [n for n, t in with_adapter.named_parameters() if "lora_B" in n and t.abs().sum() > 0]
    assert moved, "training left every LoRA B matrix at zero"
    full = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        diff = (with_adapter(input_ids=ids).logits - full(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff

    with pytest.raises(RecipeError, match="peft needs model.init_from"):
        load_recipe(REPO / "recipes" / "lora_sft_tiny.yaml", {"model.init_from": None, "model.preset": "tiny"})
