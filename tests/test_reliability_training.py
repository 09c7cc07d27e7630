"""Reliability of the writing commands (issue 15): `train`, `convert` and `merge` SIGKILLed in the middle of a save
lose nothing and finish bit-identically when run again; bad-record counts survive resume and loader workers;
`card` reads what `train` writes (a full stage and a LoRA run).

The kills land exactly mid-save through the test pause points of `deepseek_vl_hf.atomic.pause_point`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepseek_vl_hf.cli import main as cli_main
from deepseek_vl_hf.training.checkpoints import COMPLETE_MARKER
from tests.test_reliability import kill_when_paused

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "tiny"
STAGE1 = str(REPO / "recipes" / "tiny" / "stage1.yaml")
CLI = [sys.executable, "-m", "deepseek_vl_hf.cli"]
BAD_RECORDS = {"captions": {"missing image": 2}}  # what 2 steps of 2 examples meet (seed 0), one per step


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny captions with three records naming missing images and one without an image."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").symlink_to(DATA / "images")
    bad = [{"image": f"images/missing{i}.png", "text": "x"} for i in range(3)] + [{"text": "no image"}]
    lines = (DATA / "pairs.jsonl").read_text().splitlines() + [json.dumps(record) for record in bad]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def train_args(output: Path, data: Path, *extra: str) -> list[str]:
    sets = {
        "train.output_dir": str(output), "train.max_steps": 2, "train.save_steps": 1, "train.logging_steps": 1,
        "train.per_device_batch_size": 2, "data.eval": {}, "data.max_length": 96,
        "data.sources": [{"name": "captions", "kind": "pairs", "path": str(data)}],
    }
    return ["train", STAGE1, *(arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")), *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for path in sorted(folder.glob("*.safetensors")) for name, t in load_file(str(path)).items()}


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert [name for name in wa if not torch.equal(wa[name], wb[name])] == []


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-step stage-1 run (fp32, CPU, no loader workers): the reference."""
    out = tmp_path_factory.mktemp("reference") / "stage1"
    cli_main(train_args(out, data))
    return out


def test_train_killed_mid_checkpoint_resumes_bit_identical(stage1, data, tmp_path, caplog):
    """SIGKILL while `train` writes checkpoint-2 (weights written, optimizer/RNG/state not): --resume skips it,
    says why, continues from checkpoint-1 and ends with the reference's exact weights and bad-record counts,
    here with 2 loader workers (their counts summed)."""
    out = tmp_path / "run"
    args = train_args(out, data, "--set", "train.dataloader_num_workers=2")
    kill_when_paused([*CLI, *args], "trainer-checkpoint checkpoint-2", REPO, log_dir=tmp_path)
    checkpoints = tmp_path / "run-checkpoints"
    assert (checkpoints / "checkpoint-1" / COMPLETE_MARKER).is_file()
    assert (checkpoints / "checkpoint-2" / "model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-2" / COMPLETE_MARKER).exists() and not out.exists()
    state = json.loads((checkpoints / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["BadRecordCounter"]["attributes"]["counts"] == {"captions": {"missing image": 1}}

    caplog.set_level(logging.INFO, logger="deepseek_vl_hf")
    cli_main([*args, "--resume"])
    assert (f"--resume: skipping {checkpoints / 'checkpoint-2'}: no {COMPLETE_MARKER} (the save was interrupted)"
            in caplog.messages)
    assert f"--resume: continuing from {checkpoints / 'checkpoint-1'}" in caplog.messages
    assert f"bad records skipped over the run, by source and reason: {BAD_RECORDS}" in caplog.messages
    assert_bit_identical(stage1, out)
    meta = json.loads((out / "training_metadata.json").read_text())
    reference = json.loads((stage1 / "training_metadata.json").read_text())
    assert meta["resumed_from"] == str(checkpoints / "checkpoint-1") and meta["steps"] == 2
    assert meta["bad_records"] == reference["bad_records"] == BAD_RECORDS
    assert (checkpoints / "checkpoint-2" / COMPLETE_MARKER).is_file()  # saved again, complete


def test_a_partly_deleted_checkpoint_is_not_resumed_from(stage1, data, tmp_path, caplog):
    """A checkpoint whose manifest no longer matches its files (killed while being rotated away) is skipped."""
    checkpoints = tmp_path / "run-checkpoints"
    shutil.copytree(stage1.parent / "stage1-checkpoints", checkpoints)
    (checkpoints / "checkpoint-2" / "optimizer.pt").unlink()
    caplog.set_level(logging.INFO, logger="deepseek_vl_hf")
    cli_main([*train_args(tmp_path / "run", data), "--resume"])
    assert f"--resume: skipping {checkpoints / 'checkpoint-2'}: optimizer.pt is missing" in caplog.messages
    assert_bit_identical(stage1, tmp_path / "run")


def test_card_reads_what_train_writes_full_stage_and_lora(stage1, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the LoRA recipe's data paths are relative to the repository
    cli_main(["card", "--model", str(stage1)])
    card = (stage1 / "README.md").read_text()
    assert "Recipe: **tiny-stage1**" in card
    assert "| tiny-stage1 (stage 1) | aligner, sam_new_layers | 2 |" in card
    assert "| captions | 1.0 |" in card and "| learning_rate |" in card

    adapter = tmp_path / "lora"
    cli_main(["train", str(REPO / "recipes" / "lora_sft_tiny.yaml"), "--set", f"model.init_from={stage1}",
              "--set", f"train.output_dir={adapter}", "--set", "train.max_steps=1", "--set", "data.eval={}",
              "--set", "train.per_device_batch_size=2"])
    meta = json.loads((adapter / "training_metadata.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["tiny-stage1 (stage 1)", "tiny-lora-sft (stage 3)"]
    (adapter / "README.md").unlink()
    cli_main(["card", "--model", str(adapter)])
    assert f"wrote {adapter / 'README.md'}" in capsys.readouterr().out
    text = (adapter / "README.md").read_text()
    assert str(stage1) in text and "tiny-lora-sft" in text and "r=8, alpha=16" in text


def test_convert_killed_mid_write_then_rerun(tiny_pair, tmp_path):
    from tests.conversion_fixtures import tiny_official_overrides, write_official_folder

    model, processor = tiny_pair
    source = write_official_folder(model, processor, tmp_path / "official", shards=1)
    sets = [arg for key, value in tiny_official_overrides("tiny").items() for arg in ("--set", f"{key}={value}")]
    args = ["convert", "--from", "official", "--input", str(source), *sets]
    kill_when_paused([*CLI, *args, "--output", str(tmp_path / "ours")], "before-rename ours", tmp_path)
    assert not (tmp_path / "ours").exists() and list(tmp_path.glob(".ours.tmp-*"))
    cli_main([*args, "--output", str(tmp_path / "ours")])
    cli_main([*args, "--output", str(tmp_path / "uninterrupted")])
    assert not list(tmp_path.glob(".ours.*"))
    assert_bit_identical(tmp_path / "uninterrupted", tmp_path / "ours")


def test_merge_killed_mid_write_then_rerun(stage1, tmp_path):
    from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM

    from deepseek_vl_hf.lora import PeftSettings, apply_lora, save_adapter

    settings = PeftSettings(enabled=True, preset="llm-attention", r=4)
    model = apply_lora(DeepseekVLHFForCausalLM.from_pretrained(stage1), settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    adapter = save_adapter(model, tmp_path / "adapter", base_model=str(stage1))
    args = ["merge", "--base", str(stage1), "--adapter", str(adapter)]
    kill_when_paused([*CLI, *args, "--output", str(tmp_path / "merged")], "before-rename merged", tmp_path)
    assert not (tmp_path / "merged").exists() and list(tmp_path.glob(".merged.tmp-*"))
    cli_main([*args, "--output", str(tmp_path / "merged")])
    cli_main([*args, "--output", str(tmp_path / "uninterrupted")])
    assert not list(tmp_path.glob(".merged.*"))
    assert_bit_identical(tmp_path / "uninterrupted", tmp_path / "merged")
    base, merged = weights(stage1), weights(tmp_path / "merged")
    assert any(not torch.equal(base[name], merged[name]) for name in base)  # the adapter was folded in
