"""Training: stage freezing, recipes, the runner end to end (CLI), kill-and-resume, SIGTERM, NaN handling."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint
from deepseek_vl_hf.cli import main as cli_main
from deepseek_vl_hf.training import GROUPS, STAGE_GROUPS, RecipeError, apply_stage, group_of, load_recipe
from deepseek_vl_hf.training.callbacks import NonFiniteLossError
from deepseek_vl_hf.training.runner import (
    TrainingInterrupted,
    resolve_attn_implementation,
    run_stage,
    step_decay_factor,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"
DATA = REPO / "examples" / "data" / "tiny"
PAIRS = {"name": "captions", "kind": "pairs", "path": str(DATA / "pairs.jsonl")}
TEXT = {"name": "text", "kind": "text", "path": str(DATA / "text.jsonl")}


def tiny_recipe(stage: int, output: Path, **overrides):
    """recipes/tiny/stage<N>.yaml made small and quick: no eval sets, batch 2, writing under `output`."""
    base = {
        "train.output_dir": str(output),
        "train.per_device_batch_size": 2,
        "train.logging_steps": 1,
        "data.eval": {},
        "data.max_length": 96,
    }
    return load_recipe(TINY / f"stage{stage}.yaml", {**base, **overrides})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    """The recipes' data paths are relative to the repository root."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory):
    """A tiny checkpoint whose hd_alpha is non-zero, so that neck_hd receives gradients (zero-init in SAM)."""
    model, processor = build_random_model("tiny", seed=0)
    with torch.no_grad():
        model.model.vision_model.sam.hd_alpha_downsamples.fill_(0.5)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("start") / "tiny")


# --- stages -------------------------------------------------------------------------------------------------


def test_every_parameter_has_exactly_one_group(tiny_pair):
    model, _ = tiny_pair
    groups = {group_of(name) for name, _ in model.named_parameters()}
    assert groups == set(GROUPS)
    assert group_of("model.vision_model.sam.neck.0.weight") == "sam_body"
    assert group_of("model.vision_model.sam.neck_hd.0.weight") == "sam_new_layers"


def test_stage_overrides_and_errors():
    model, _ = build_random_model("tiny", seed=0)
    names = apply_stage(model, 1, {"sam_new_layers": False})
    assert names and all(n.startswith("model.aligner.") for n in names)
    with pytest.raises(ValueError, match="unknown parameter group"):
        apply_stage(model, 1, {"vision": True})
    with pytest.raises(ValueError, match="stage must be"):
        apply_stage(model, 4)
    # The SigLIP-only (1.3B-style) model has no SAM groups; stage 1 trains just the adapter.
    siglip_model = build_random_model("tiny-siglip", seed=0)[0]
    assert all(n.startswith("model.aligner.") for n in apply_stage(siglip_model, 1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_step_changes_exactly_the_stage_parameters(stage, start_dir, tmp_path):
    recipe = tiny_recipe(
        stage,
        tmp_path / "out",
        **{
            "model.init_from": str(start_dir),
            "model.preset": None,
            "data.sources": [PAIRS],  # multimodal, so every trainable group gets a gradient
            "train.max_steps": 1,
            "train.learning_rate": 1e-2,  # Adam's first step moves every element with a gradient by ~lr
            "train.lr_scheduler": "constant",
            "train.warmup_steps": 0,
            "train.gradient_checkpointing": True,  # gradients reach the adapter through a frozen, recomputed LLM
        },
    )
    run_stage(recipe)
    before, after = weights(start_dir), weights(tmp_path / "out")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name in before if group_of(name) in STAGE_GROUPS[stage]}
    assert changed == expected
    assert any(
        n.startswith("model.vision_model.sam.neck_hd.") for n in changed
    )  # new SAM layers: every stage
    assert ("model.vision_model.siglip.pos_embed" in changed) == (stage == 3)
    assert not any(group_of(n) == "sam_body" for n in changed)  # SAM-B bit-identical in every stage


def test_group_learning_rates_set_each_groups_step_size(start_dir, tmp_path):
    """Adam's first step moves every element with a gradient by about its lr: SigLIP's 1e-4, the rest 1e-2."""
    recipe = tiny_recipe(
        3,
        tmp_path / "out",
        **{
            "model.init_from": str(start_dir),
            "data.sources": [PAIRS],
            "train.max_steps": 1,
            "train.learning_rate": 1e-2,
            "train.group_learning_rates": {"siglip": 1e-4, "sam_new_layers": 0.0},
            "train.lr_scheduler": "constant",
            "train.warmup_steps": 0,
        },
    )
    run_stage(recipe)
    before, after = weights(start_dir), weights(tmp_path / "out")
    moved: dict[str, float] = {}
    for name in before:
        step = (after[name] - before[name]).abs().max().item()
        moved[group_of(name)] = max(moved.get(group_of(name), 0.0), step)
    assert moved["sam_new_layers"] == 0.0 and moved["sam_body"] == 0.0
    assert 0.5e-4 < moved["siglip"] <= 1.01e-4
    assert 0.5e-2 < moved["aligner"] <= 1.01e-2 and 0.5e-2 < moved["language_model"] <= 1.01e-2


def test_group_learning_rates_errors():
    with pytest.raises(RecipeError, match=r"\['siglip'\], which do not train in stage 2"):
        load_recipe(TINY / "stage2.yaml", {"train.group_learning_rates": {"siglip": 1e-5}})
    with pytest.raises(RecipeError, match="unknown parameter group"):
        load_recipe(TINY / "stage3.yaml", {"train.group_learning_rates": {"vision": 1e-5}})
    with pytest.raises(RecipeError, match=">= 0"):
        load_recipe(TINY / "stage3.yaml", {"train.group_learning_rates": {"siglip": "low"}})


# --- recipes ------------------------------------------------------------------------------------------------


def test_all_shipped_recipes_load_and_chain():
    for path in sorted((REPO / "recipes").glob("*/stage*.yaml")):
        recipe = load_recipe(path)
        assert recipe.stage == int(path.stem[-1])
        if recipe.stage > 1:  # each stage starts from the previous stage's output folder
            previous = load_recipe(path.with_name(f"stage{recipe.stage - 1}.yaml"))
            assert recipe.model.init_from == previous.train.output_dir


def test_recipe_overrides_and_errors(tmp_path):
    recipe = load_recipe(TINY / "stage2.yaml", {"data.sources.1.weight": 3.0, "train.max_steps": 7})
    assert recipe.data.sources[1]["weight"] == 3.0 and recipe.train.max_steps == 7
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(TINY / "stage1.yaml", {"train.learnig_rate": 1.0})
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(TINY / "stage1.yaml", {"data.sources.5.path": "x"})
    with pytest.raises(RecipeError, match="on_nan"):
        load_recipe(TINY / "stage1.yaml", {"train.on_nan": "ignore"})
    with pytest.raises(
        RecipeError, match="language model frozen"
    ):  # stage 1 + text data: nothing would train
        run_stage(
            load_recipe(
                TINY / "stage1.yaml", {"data.sources": [PAIRS, TEXT], "train.output_dir": str(tmp_path)}
            )
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_attention_auto_falls_back_to_sdpa_and_flash_attention_2_is_demanded():
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"
    with pytest.raises(RecipeError, match="flash-attn"):
        resolve_attn_implementation("flash_attention_2")


def test_step_schedule_warms_up_then_drops_at_the_milestones():
    factor = [
        step_decay_factor(s, warmup=2, total=10, milestones=[0.8, 0.9], factors=[0.316, 0.1])
        for s in range(10)
    ]
    assert factor == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.316, 0.1]


# --- end to end through the CLI -----------------------------------------------------------------------------


def test_cli_trains_stage1_then_stage2_from_its_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    common = [
        "--set",
        "train.max_steps=2",
        "--set",
        "train.per_device_batch_size=2",
        "--set",
        "data.max_length=96",
    ]
    cli_main(["train", str(TINY / "stage1.yaml"), "--set", f"train.output_dir={tmp_path}/s1", *common])
    cli_main(
        [
            "train",
            str(TINY / "stage2.yaml"),
            "--set",
            f"train.output_dir={tmp_path}/s2",
            "--set",
            f"model.init_from={tmp_path}/s1",
            *common,
        ]
    )

    meta = json.loads((tmp_path / "s2" / "training_metadata.json").read_text())
    assert meta["stage"] == 2 and meta["steps"] == 2 and meta["recipe_name"] == "tiny-stage2"
    assert meta["started_from"] == {"path": f"{tmp_path}/s1", "stage": 1, "recipe_name": "tiny-stage1"}
    assert meta["recipe"]["train"]["max_steps"] == 2  # the resolved recipe, overrides applied
    assert {s["name"] for s in meta["data_mix"]["sources"]} == {"interleaved", "captions", "text"}
    metrics = meta["final_metrics"]
    assert math.isclose(metrics["eval_text_ppl"], math.exp(metrics["eval_text_loss"]), rel_tol=1e-6)
    assert "eval_multimodal_loss" in metrics and "train_loss" in metrics

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s2", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tmp_path / "s2", trust_remote_code=True)
    inputs = processor(
        text="<image_placeholder>A", images=[Image.open(DATA / "images" / "00.png")], return_tensors="pt"
    )
    assert torch.isfinite(model(**inputs).logits).all()


def test_a_source_with_only_bad_records_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"image": f"missing{i}.png", "text": "x"}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "train",
                str(TINY / "stage1.yaml"),
                "--set",
                f"train.output_dir={tmp_path}/out",
                "--set",
                f"data.sources=[{{'name': 'broken', 'kind': 'pairs', 'path': '{bad}'}}]",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: data source 'broken'" in err and "missing image" in err


# --- resume, SIGTERM, NaN -----------------------------------------------------------------------------------


class SigtermDuringStep(TrainerCallback):
    """Sends this process SIGTERM while optimizer step `step` runs (as a scheduler's kill would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            signal.raise_signal(signal.SIGTERM)


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    n = 3
    settings = {"train.max_steps": 2 * n, "train.save_steps": n, "data.schedule.warmup_steps": 2}
    run_stage(tiny_recipe(2, tmp_path / "a", **settings, **{"model.init_from": None, "model.preset": "tiny"}))

    interrupted = tiny_recipe(
        2, tmp_path / "b", **settings, **{"model.init_from": None, "model.preset": "tiny"}
    )
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=f"after step {n}"):
        run_stage(interrupted, callbacks=[SigtermDuringStep(n)])
    assert not (tmp_path / "b").exists()  # no stage folder from an interrupted run
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    run_stage(interrupted, resume=True)

    loss_a = losses(tmp_path / "a-checkpoints" / f"checkpoint-{2 * n}")
    loss_b = losses(tmp_path / "b-checkpoints" / f"checkpoint-{2 * n}")
    assert sorted(loss_b) == list(range(1, 2 * n + 1))
    for step in range(n + 1, 2 * n + 1):
        assert loss_b[step] == pytest.approx(loss_a[step], abs=1e-6)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    meta = json.loads((tmp_path / "b" / "training_metadata.json").read_text())
    assert meta["resumed_from"].endswith(f"checkpoint-{n}") and meta["steps"] == 2 * n


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    sets = [
        "--set",
        f"train.output_dir={out}",
        "--set",
        "train.logging_steps=1",
        "--set",
        "data.eval={}",
        "--set",
        "train.per_device_batch_size=2",
        "--set",
        "data.max_length=96",
    ]
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deepseek_vl_hf.cli",
                "train",
                str(TINY / "stage1.yaml"),
                "--set",
                "train.max_steps=500",
                "--set",
                "train.save_steps=500",
                *sets,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.time() + 120
        while "'loss'" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    (checkpoint,) = (tmp_path / "run-checkpoints").glob("checkpoint-*")
    done = int(checkpoint.name.split("-")[1])
    assert 1 <= done < 500 and not out.exists()

    cli_main(["train", str(TINY / "stage1.yaml"), "--resume", "--set", f"train.max_steps={done + 2}", *sets])
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["steps"] == done + 2 and meta["resumed_from"] == str(checkpoint)


class PoisonLossAt(TrainerCallback):
    """Makes the training loss NaN for optimizer step `step` (a forward hook ahead of the NaN guard's)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:

            def poison(module, inputs, output):
                output.loss = output.loss * float("nan")
                handle.remove()

            handle = model.register_forward_hook(poison, prepend=True)


def test_nan_loss_stop_names_the_step_and_source(tmp_path):
    recipe = tiny_recipe(1, tmp_path / "out", **{"train.max_steps": 3})
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2 .*captions"):
        run_stage(recipe, callbacks=[PoisonLossAt(2)])


def test_nan_loss_skip_drops_only_that_update(tmp_path):
    recipe = tiny_recipe(1, tmp_path / "out", **{"train.max_steps": 3, "train.on_nan": "skip"})
    run_stage(recipe, callbacks=[PoisonLossAt(2)])
    meta = json.loads((tmp_path / "out" / "training_metadata.json").read_text())
    assert meta["skipped_steps"] == [2] and meta["steps"] == 3
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "out").values())
