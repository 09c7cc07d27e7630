"""Distributed training on CPU with 2 processes (gloo): real FSDP2 sharding, the Trainer's FSDP wiring, and a
torchrun run of `deepseek-vl-hf train`.

On CPU, accelerate does not switch the Trainer to FSDP (it stays `MULTI_CPU` and wraps the model in DDP), so
sharding itself is tested with torch's `fully_shard` directly (tests/fsdp_worker.py) and the Trainer's FSDP
set-up by the arguments the runner produces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deepseek_vl_hf.training import load_recipe
from deepseek_vl_hf.training.runner import FSDP_WRAP_CLASSES, parse_data, training_arguments

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_fully_shard_step_matches_one_process_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    torchrun("tests/fsdp_worker.py", str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    # Every parameter is a DTensor shard; 2 decoder layers + 2 SigLIP blocks + 2 SAM blocks are FSDP units.
    assert result["world_size"] == 2 and result["fsdp_units"] == 6 and result["dtensor_parameters"] > 0
    # Gradients equal the one-process ones up to float summation order (the batch is split across ranks) ...
    assert result["max_relative_grad_diff"] < 1e-5
    # ... so the weights after one AdamW step agree to a tiny fraction of the step (lr 1e-3): not bitwise, a
    # few elements with a gradient near Adam's eps differ by ~1e-6.
    assert result["max_abs_diff"] < 1e-2 * result["lr"]
    # Stage 3 freezing under FSDP: SAM-B gets no gradient and does not move.
    assert result["moved"] == result["grad_names"]
    assert not any(".sam.blocks." in name or ".sam.patch_embed." in name for name in result["grad_names"])

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp", trust_remote_code=True)
    reference = load_file(str(tmp_path / "reference.safetensors"))
    state = model.state_dict()
    assert max((state[k] - v).abs().max().item() for k, v in reference.items()) == result["max_abs_diff"]


def test_trainer_fsdp_arguments_shard_the_blocks_with_fsdp2():
    recipe = load_recipe(REPO / "recipes" / "7b" / "stage2.yaml")
    assert recipe.train.fsdp and recipe.train.gradient_checkpointing
    args = training_arguments(recipe, parse_data(recipe)[0])
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"].split(",") == FSDP_WRAP_CLASSES
    assert set(FSDP_WRAP_CLASSES) == {"LlamaDecoderLayer", "DeepseekVLSiglipBlock", "DeepseekVLSamBlock"}
    assert plugin["reshard_after_forward"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["activation_checkpointing"] is True and not args.activation_checkpointing  # FSDP's own
    assert args.accelerator_config.dispatch_batches is False  # each rank reads its own slice of the stream


@pytest.mark.parametrize(
    "config", sorted((REPO / "recipes" / "accelerate").glob("fsdp*.yaml")), ids=lambda p: p.name
)
def test_accelerate_configs_wrap_the_same_blocks(config):
    fsdp = yaml.safe_load(config.read_text())
    assert fsdp["distributed_type"] == "FSDP"
    settings = fsdp["fsdp_config"]
    assert settings["fsdp_version"] == 2 and settings["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert settings["fsdp_transformer_layer_cls_to_wrap"].split(",") == FSDP_WRAP_CLASSES


def test_torchrun_two_processes_train_and_save_a_folder_that_loads_in_one(tmp_path):
    """torchrun + the CLI on CPU: the Trainer falls back from FSDP to DDP over gloo (logged), trains, and the
    main process writes the stage folder."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "s2"
    schedule = "{'start_language_share': 0.5, 'target_language_share': 0.5, 'warmup_steps': 0}"
    result = torchrun(
        "-m",
        "deepseek_vl_hf.cli",
        "train",
        "recipes/tiny/stage2.yaml",
        "--set",
        "model.init_from=None",
        "--set",
        "model.preset=tiny",
        "--set",
        f"train.output_dir={out}",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.per_device_batch_size=2",
        "--set",
        "data.max_length=96",
        "--set",
        "train.fsdp=true",
        "--set",
        "data.eval={}",
        "--set",
        f"data.schedule={schedule}",
    )
    assert "did not enable FSDP" in result.stderr + result.stdout
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 4 and meta["data_mix"]["examples_per_step"] == 4
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
