"""The demo run: synthetic data -> stage 0 -> the paper's stages 1-3 on the Trainer -> evaluation -> report.

`run_demo(out)` writes under `out`: `data/` (the synthetic dataset), `recipes/stage{1,2,3}.yaml` (the recipes the
stages ran, re-runnable with `deepseek-vl-hf train`), `stages/stage{0,1,2,3}/` (each stage's checkpoint folder
with its `training_metadata.json`), `model/` (the final Hub-ready folder with its model card), `report.md`,
`metrics.json` and `plots/`. The ablations (`modality-mix`, `hybrid`) are separate, shorter runs under
`runs/<variant>/` that write the same report with their own table.

`minutes` scales the data and the steps from the default budget (`Budget.for_minutes`); then the run keeps to
`minutes` on the machine it runs on: stage 0 times its first steps and every stage is sized to the time left
(`timing.Planner`; the report says what was cut). With `calibrate=False` the budget's steps run as they are, so
a run is reproducible (fp32, seeded) whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from tqdm.auto import tqdm
from transformers import TrainerCallback

from deepseek_vl_hf.atomic import atomic_directory
from deepseek_vl_hf.cards import write_card
from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint
from deepseek_vl_hf.demo import ABLATIONS, DEFAULT_MINUTES
from deepseek_vl_hf.demo.evaluate import evaluate_text, evaluate_visual
from deepseek_vl_hf.demo.report import write_outputs
from deepseek_vl_hf.demo.synthetic import generate_dataset, tokenizer_corpus
from deepseek_vl_hf.demo.timing import Planner
from deepseek_vl_hf.demo.warmup import read_jsonl, warm_up
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor
from deepseek_vl_hf.training.metadata import read_metadata, write_metadata
from deepseek_vl_hf.training.recipe import load_recipe
from deepseek_vl_hf.training.runner import run_stage
from deepseek_vl_hf.training.stages import trainable_groups

# How often stage 0 draws each category's images (default 1): small print, charts and documents take the towers
# longest to learn (measured: at equal weights chart values and titles stay near chance in the probes).
STAGE0_CATEGORY_WEIGHTS = {"ocr": 3.0, "chart": 3.0, "document": 2.0}
EVAL_EXAMPLES = 80  # per trainer eval set: the held-out losses logged at the start and end of each stage
# The vision layers that train in stages 1-3 (SAM's new layers; SigLIP in stage 3) come out of stage 0 already
# trained and take a hundredth of the stage's learning rate: at the full rate their tokens drift faster than the
# language model learns to read them, and it learns to ignore the image instead (measured: with-image accuracy
# falls to the blind baseline).
VISION_LR_FACTOR = 0.01
VISION_GROUPS = ("sam_new_layers", "siglip")
# The demo tokenizer, trained on the synthetic corpus, has about 745 tokens: a vocabulary of 768 rows instead of
# the tiny preset's 2048 shrinks the LM head and its softmax (measured: the whole demo 7.6 -> 6.9 minutes).
DEMO_OVERRIDES = {"text_config.vocab_size": 768}


@dataclass(frozen=True)
class Budget:
    """How much data and how many optimizer steps a run gets (batch size 16 throughout)."""

    train_per_category: int
    eval_per_kind: int
    warmup_steps: int
    stage_steps: tuple[int, int, int]
    batch_size: int = 16

    @classmethod
    def for_minutes(cls, minutes: float) -> Budget:
        """The default budget scaled by `minutes / DEFAULT_MINUTES` (data and steps; at least a few of each)."""
        if minutes <= 0:
            raise ValueError(f"minutes must be positive, got {minutes}")
        scale = minutes / DEFAULT_MINUTES
        return cls(
            train_per_category=max(16, round(1000 * scale)),
            eval_per_kind=max(4, min(40, round(40 * scale))),
            warmup_steps=max(2, round(800 * scale)),
            stage_steps=tuple(max(2, round(steps * scale)) for steps in (200, 300, 1600)),
        )


@dataclass(frozen=True)
class StageSettings:
    """What one of the paper's stages trains on in the demo, and how."""

    learning_rate: float
    lr_scheduler: str
    sources: tuple[tuple[str, str, str], ...]  # (name, kind, file): multimodal first, then language data
    eval_multimodal: tuple[str, str]  # (kind, file)
    language_share: float  # target share of language-only examples (stage 2 warms up to it from 1.0)


STAGES: dict[int, StageSettings] = {
    1: StageSettings(1e-3, "cosine", (("captions", "pairs", "stage1_pairs.jsonl"),), ("pairs", "eval_pairs.jsonl"), 0.0),
    2: StageSettings(
        1e-3,
        "step",
        (("interleaved", "interleaved", "stage2_interleaved.jsonl"), ("text", "text", "text_train.jsonl")),
        ("interleaved", "eval_interleaved.jsonl"),
        0.7,
    ),
    3: StageSettings(
        5e-4,
        "cosine",
        (("visual_chat", "conversations", "stage3_conversations.jsonl"),
         ("text_dialogue", "conversations", "text_dialogues.jsonl")),
        ("conversations", "eval_conversations.jsonl"),
        0.2,
    ),
}


def stage_recipe(
    stage: int, data_dir: Path, start: Path, output: Path, steps: int, batch_size: int, language_share: float
) -> dict[str, Any]:
    """The recipe tree of one stage (the `recipes/tiny` structure with the demo's data, steps and rates)."""
    settings = STAGES[stage]
    sources = []
    for name, kind, file in settings.sources:
        language = kind == "text" or name == "text_dialogue"
        if language and language_share == 0:
            continue
        source = {"name": name, "kind": kind, "path": str(data_dir / file)}
        sources.append({**source, "text_only": True} if kind == "conversations" and language else source)
    mixed = len(sources) > 1
    schedule = {"start_language_share": language_share, "target_language_share": language_share, "warmup_steps": 0}
    if stage == 2 and mixed:  # the paper's modality warm-up: language share 1.0 -> target over the first quarter
        schedule.update(start_language_share=1.0, warmup_steps=max(1, steps // 4))
    return {
        "name": f"demo-stage{stage}",
        "stage": stage,
        "model": {"init_from": str(start), "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {
            "sources": sources,
            "eval": {
                "multimodal": {"kind": settings.eval_multimodal[0], "path": str(data_dir / settings.eval_multimodal[1]),
                               "max_examples": EVAL_EXAMPLES},
                "text": {"kind": "text", "path": str(data_dir / "eval_text.jsonl"), "max_examples": EVAL_EXAMPLES},
            },
            "max_length": 256,
            "group_by_modality": stage == 2 and mixed,
            "schedule": schedule if mixed else {},
            "seed": 0,
        },
        "train": {
            "output_dir": str(output),
            "overwrite_output": True,
            "max_steps": steps,
            "per_device_batch_size": batch_size,
            "learning_rate": settings.learning_rate,
            "group_learning_rates": {
                group: settings.learning_rate * VISION_LR_FACTOR
                for group in trainable_groups(stage) if group in VISION_GROUPS
            },
            "lr_scheduler": settings.lr_scheduler,
            "warmup_steps": max(1, steps // 20),
            "logging_steps": max(1, min(10, steps // 10)),
            "save_steps": steps + 1,  # no intermediate Trainer checkpoints: the stage folder is the result
            "eval_batch_size": 32,
        },
    }


class LossLog(TrainerCallback):
    """Keeps the Trainer's logged training losses as (step, loss) and the seconds its training loop took, and the
    Trainer's saving chatter out of the log once training starts (the runner sets transformers' verbosity to info)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.train_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        transformers.logging.set_verbosity_warning()
        self._start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.train_seconds = time.perf_counter() - self._start

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


class StageClock(TrainerCallback):
    """Stops a Trainer stage once its training loop has run `seconds` (the time planner's share for it), so a
    stage whose steps are slower than planned cannot overrun the demo's budget; the model trained so far is saved
    as usual."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if time.perf_counter() - self._start >= self.seconds:
            control.should_training_stop = True


def load_folder(folder: Path) -> tuple[DeepseekVLHFForCausalLM, DeepseekVLHFProcessor]:
    """A stage folder's model (fp32, eval mode) and processor."""
    model = DeepseekVLHFForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, DeepseekVLHFProcessor.from_pretrained(folder, trust_remote_code=True)


def _losses(metrics: dict[str, float]) -> dict[str, float]:
    """A stage's final losses and perplexities (the Trainer's runtime and throughput figures left out)."""
    return {k: round(v, 4) for k, v in metrics.items() if k.endswith(("_loss", "_ppl"))}


def train_stage(tree: dict[str, Any], recipe_path: Path, deadline_s: float | None = None) -> dict[str, Any]:
    """Write the recipe, run it with `run_stage` (stopped after `deadline_s` of training when given), and return
    its losses, final metrics and wall time."""
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by `deepseek-vl-hf demo`; re-run with: deepseek-vl-hf train {recipe_path}\n"
    recipe_path.write_text(header + yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    log, start = LossLog(), time.perf_counter()
    clock = [StageClock(deadline_s)] if deadline_s is not None else []
    folder = run_stage(load_recipe(recipe_path), recipe_path=str(recipe_path), callbacks=[log, *clock])
    transformers.logging.set_verbosity_warning()
    shutil.rmtree(f"{folder}-checkpoints", ignore_errors=True)
    metadata = read_metadata(folder)
    return {
        "folder": str(folder),
        "steps": metadata["steps"],
        "learning_rate": tree["train"]["learning_rate"],
        "trainable": metadata["trainable_groups"],
        "sources": [s["name"] for s in tree["data"]["sources"]],
        "losses": log.losses,
        "final_metrics": _losses(metadata["final_metrics"]),
        "seconds": time.perf_counter() - start,
        "train_seconds": log.train_seconds,
    }


def train_model(
    preset: str,
    data_dir: Path,
    work_dir: Path,
    budget: Budget,
    seed: int = 0,
    stage2_language_share: float = STAGES[2].language_share,
    last_stage: int = 3,
    start_from: dict[str, Any] | None = None,
    planner: Planner | None = None,
) -> dict[str, Any]:
    """Stage 0, then stages 1..`last_stage`, with the text-task accuracy after each stage.

    `start_from` is an earlier run's record to continue (its stages are reused, not re-trained), which is how the
    modality-mix ablation branches two stage-2 variants off one stage 1. `planner` sizes the stages to the time
    budget (none: the budget's steps).
    """
    eval_rows = read_jsonl(data_dir / "eval.jsonl")
    text_rows = [row for row in eval_rows if row["image"] is None]
    run = {"preset": preset, "stages": {}, "text_accuracy": {}, **(start_from or {})}
    run = {**run, "stages": dict(run["stages"]), "text_accuracy": dict(run["text_accuracy"])}
    if "stage0" not in run["stages"]:
        model, processor = build_random_model(preset, DEMO_OVERRIDES, seed=seed, tokenizer_corpus=tokenizer_corpus(seed))
        start = time.perf_counter()
        with tqdm(total=budget.warmup_steps, desc=f"stage 0 ({preset}): vision probes + text", unit="step") as bar:
            def on_step(record: dict[str, float]) -> None:
                bar.update(1)
                bar.set_postfix(vision=f"{record['vision_loss']:.3f}", text=f"{record['text_loss']:.3f}")

            def resize(done: int, seconds_per_step: float) -> int:
                total = planner.size_stage0(done, seconds_per_step)
                bar.total = total
                return total

            train_start = time.perf_counter()
            result = warm_up(model, processor, data_dir, budget.warmup_steps, budget.batch_size,
                             category_weights=STAGE0_CATEGORY_WEIGHTS, seed=seed, on_step=on_step,
                             resize=resize if planner else None)
            train_seconds = time.perf_counter() - train_start
        folder = save_checkpoint(model, processor, work_dir / "stages" / "stage0", overwrite=True)
        run["stages"]["stage0"] = {
            "folder": str(folder), "steps": result["steps"], "probe_accuracy": result["probe_accuracy"],
            "history": result["history"], "seconds": time.perf_counter() - start, "train_seconds": train_seconds,
        }
        run["text_accuracy"]["stage0"] = evaluate_text(model, processor, text_rows, data_dir)
        if planner:
            planner.finished("stage0", result["steps"], time.perf_counter() - start, train_seconds,
                             budget.warmup_steps)
    previous = Path(run["stages"]["stage0"]["folder"])
    for stage in range(1, last_stage + 1):
        name = f"stage{stage}"
        if name in run["stages"]:
            previous = Path(run["stages"][name]["folder"])
            continue
        share = stage2_language_share if stage == 2 else STAGES[stage].language_share
        steps, start = planner.steps() if planner else budget.stage_steps[stage - 1], time.perf_counter()
        tree = stage_recipe(stage, data_dir, previous, work_dir / "stages" / name, steps, budget.batch_size, share)
        deadline = planner.deadline(steps) if planner else None
        run["stages"][name] = {**train_stage(tree, work_dir / "recipes" / f"{name}.yaml", deadline),
                               "language_share": share}
        previous = Path(run["stages"][name]["folder"])
        run["text_accuracy"][name] = evaluate_text(*load_folder(previous), text_rows, data_dir)
        if planner:
            planner.finished(name, run["stages"][name]["steps"], time.perf_counter() - start,
                             run["stages"][name]["train_seconds"], budget.stage_steps[stage - 1], planned_steps=steps)
    return run


def evaluate_run(run: dict[str, Any], data_dir: Path, stage: str | None = None, blind: bool = True) -> dict[str, Any]:
    """The held-out visual evaluation (with the image, blind unless not `blind`, chance) of a run's `stage`
    (default: its last)."""
    questions = [row for row in read_jsonl(data_dir / "eval.jsonl") if row["image"] is not None]
    stage = stage or max(name for name in run["stages"])
    model, processor = load_folder(Path(run["stages"][stage]["folder"]))
    passes = "with image, then blind" if blind else "with image"
    with tqdm(total=(1 + blind) * len(questions), desc=f"evaluating {run['preset']} {stage} ({passes})",
              unit="q") as bar:
        return evaluate_visual(model, processor, questions, data_dir, on_batch=bar.update, blind=blind)


INTENDED_USE = (
    "A toy model written by `deepseek-vl-hf demo`: about a million parameters, trained in minutes on a CPU from "
    "random weights on the demo's synthetic images. It answers the demo's question kinds (shapes and their "
    "colours, counts and sides; small printed words and numbers; bar and line charts; tables and pages; angles, "
    "polygons and segments) and knows its made-up text facts, and nothing else. It is there to show the "
    "pipeline (data, the three training stages, evaluation, loading, chat) end to end, not for real images."
)


def card_metadata(run: dict[str, Any], evaluation: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """What the final folder's `training_metadata.json` adds to stage 3's (`deepseek_vl_hf.training.metadata`
    format): the whole history with stage 0, the demo's evaluation as final metrics, the intended use."""
    stage0 = run["stages"]["stage0"]
    probes = stage0["probe_accuracy"]
    stages = [{
        "name": "stage 0: warm-up standing in for pretrained weights (not in the paper)",
        "trainable": ["SigLIP", "SAM", "language model"], "steps": stage0["steps"], "learning_rate": 1e-3,
        "batch_size": budget.batch_size,
        "metrics": {"mean probe accuracy": round(sum(probes.values()) / len(probes), 3)},
    }]
    for stage in (1, 2, 3):
        info = run["stages"][f"stage{stage}"]
        stages.append({
            "name": f"stage {stage}", "trainable": info["trainable"], "steps": info["steps"],
            "learning_rate": info["learning_rate"], "batch_size": budget.batch_size,
            "data_mix": {"sources": ", ".join(info["sources"]), "language share": info["language_share"]},
            "metrics": _losses(info["final_metrics"]),
        })
    final = {f"accuracy_{c}": round(v["accuracy"], 3) for c, v in evaluation["categories"].items()}
    final.update({f"blind_{c}": round(v["blind"], 3) for c, v in evaluation["categories"].items()})
    final["text_accuracy"] = round(run["text_accuracy"]["stage3"]["accuracy"], 3)
    return {
        "recipe_name": "deepseek-vl-hf demo: stage 0 warm-up + the paper's stages 1-3 at toy scale, synthetic data",
        "stages": stages,
        "hyperparameters": {
            "optimizer": "adamw", "betas": "0.9, 0.95", "weight_decay": 0.0, "dtype": "float32",
            "vision layers' learning rate (SAM new layers; SigLIP in stage 3)": f"{VISION_LR_FACTOR:g} x the stage's",
        },
        "final_metrics": final,
        "intended_use": INTENDED_USE,
    }


def export_model(run: dict[str, Any], evaluation: dict[str, Any], budget: Budget, target: Path) -> Path:
    """The final stage's folder with the demo's training summary and a model card, written atomically."""
    source = Path(run["stages"]["stage3"]["folder"])
    with atomic_directory(target, overwrite=True) as tmp:
        for path in source.iterdir():
            if path.name != "training_metadata.json" and path.is_file():
                shutil.copy2(path, tmp / path.name)
        write_metadata(tmp, **{**read_metadata(source), **card_metadata(run, evaluation, budget)})
        write_card(tmp, model_id=str(target), title="DeepSeek-VL demo model (tiny, synthetic data)")
    return target


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_data(out: Path, budget: Budget, seed: int) -> Path:
    """Generate the synthetic dataset under `out/data` (progress bar over the images)."""
    with tqdm(desc="synthetic data", unit="image") as bar:
        generate_dataset(out / "data", seed=seed, train_per_category=budget.train_per_category,
                         eval_per_kind=budget.eval_per_kind, progress=bar.update)
    return out / "data"


def _modality_mix(out: Path, data_dir: Path, budget: Budget, seed: int, planner: Planner) -> dict[str, Any]:
    """Stage 2 with the language data mixed in vs. multimodal data only, from one shared stage 0 + 1."""
    shared = train_model("tiny", data_dir, out / "runs" / "shared", budget, seed, last_stage=1, planner=planner)
    variants = {}
    for label, share in (("with text data", STAGES[2].language_share), ("multimodal only", 0.0)):
        work = out / "runs" / ("mixed" if share else "multimodal-only")
        run = train_model("tiny", data_dir, work, budget, seed, stage2_language_share=share, last_stage=2,
                          start_from=shared, planner=planner)
        metrics = run["stages"]["stage2"]["final_metrics"]
        variants[label] = {
            "language_share": share,
            "text_accuracy_before": run["text_accuracy"]["stage0"]["accuracy"],
            "text_accuracy_after": run["text_accuracy"]["stage2"]["accuracy"],
            "eval_text_loss": metrics.get("eval_text_loss"),
            "eval_multimodal_loss": metrics.get("eval_multimodal_loss"),
            "run": run,
        }
    return {"name": "modality-mix", "variants": variants}


def _hybrid(out: Path, data_dir: Path, budget: Budget, seed: int, planner: Planner) -> dict[str, Any]:
    """The hybrid (SAM 256 px + SigLIP 96 px) and the SigLIP-only tiny model, same data, steps and 36 tokens.

    Two whole runs: `run_demo` gives each half the steps of the budget, so the ablation takes about as long."""
    variants = {}
    for label, preset in (("hybrid (SAM 256 px + SigLIP 96 px)", "tiny"), ("SigLIP only (96 px)", "tiny-siglip")):
        run = train_model(preset, data_dir, out / "runs" / preset, budget, seed, planner=planner)
        variants[label] = {"preset": preset, "evaluation": evaluate_run(run, data_dir), "run": run}
    return {"name": "hybrid", "variants": variants}


def _planner(minutes: float, ablation: str | None, budget: Budget, calibrate: bool, start: float) -> Planner:
    """The time planner for a run: its stages in running order and its visual evaluations."""
    main = [("stage0", budget.warmup_steps), *((f"stage{i + 1}", n) for i, n in enumerate(budget.stage_steps))]
    if ablation == "modality-mix":
        plan, evals = main[:3] + main[2:3], 0.0
    elif ablation == "hybrid":
        half = Budget.for_minutes(minutes / 2)
        plan = 2 * [("stage0", half.warmup_steps), *((f"stage{i + 1}", n) for i, n in enumerate(half.stage_steps))]
        evals = 2.0
    else:
        plan, evals = main, 1.5  # the final model with and without the image, the stage-0 model with it
    return Planner(minutes, plan, visual_evals=evals, enabled=calibrate, start=start)


def run_demo(
    out: str | Path,
    minutes: float = DEFAULT_MINUTES,
    ablation: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = print,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Run the demo (or one ablation) into `out` and return the metrics written to `out/metrics.json`.

    With `calibrate` the stages are sized to finish within `minutes` on this machine (`timing.Planner`);
    without, the budget's steps run as they are (the same numbers on every machine)."""
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {ABLATIONS}")
    out = Path(out).resolve()
    budget = Budget.for_minutes(minutes)
    _prepare(out, overwrite)
    started = time.perf_counter()
    planner = _planner(minutes, ablation, budget, calibrate, started)
    log(f"demo: writing to {out} (budget: {minutes:g} minutes -> {budget})")
    data_dir = make_data(out, budget, seed)
    metrics: dict[str, Any] = {
        "command": "deepseek-vl-hf demo" + (f" --ablation {ablation}" if ablation else ""),
        "minutes": minutes,
        "seed": seed,
        "budget": asdict(budget),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_start": round(os.getloadavg()[0], 1)},
        "manifest": json.loads((data_dir / "manifest.json").read_text(encoding="utf-8")),
    }
    metrics["data_seconds"] = round(time.perf_counter() - started, 1)
    if ablation == "modality-mix":
        metrics["ablation"] = _modality_mix(out, data_dir, budget, seed, planner)
    elif ablation == "hybrid":
        metrics["ablation"] = _hybrid(out, data_dir, Budget.for_minutes(minutes / 2), seed, planner)
    else:
        run = train_model("tiny", data_dir, out, budget, seed, planner=planner)
        evaluation = evaluate_run(run, data_dir)
        # what stage 0 alone gives: the stage-0 model asked through its language model, before stages 1-3
        evaluation["stage0"] = evaluate_run(run, data_dir, stage="stage0", blind=False)["overall"]
        metrics.update(run=run, evaluation=evaluation)
        metrics["model"] = str(export_model(run, evaluation, budget, out / "model"))
    metrics["calibration"] = planner.summary()
    metrics["machine"]["load_average_end"] = round(os.getloadavg()[0], 1)  # other jobs' share of the cores
    metrics["wall_seconds"] = time.perf_counter() - started
    report = write_outputs(out, metrics)
    log(f"demo: finished in {metrics['wall_seconds'] / 60:.1f} minutes; report: {report}")
    return metrics
