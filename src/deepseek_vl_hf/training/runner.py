"""Run one training stage with the Hugging Face `Trainer`; `run_stage(recipe)` reads top to bottom:

1. `TrainingArguments` from the recipe (they also set up the process group under torchrun / accelerate);
2. the starting model and processor (the previous stage's folder or a random-weight preset), `apply_stage`;
3. the training mixture (`MixtureDataset`) and the held-out eval sets;
4. the `Trainer` with the callbacks, then `train()` (from the last checkpoint with `resume`);
5. a final evaluation and the stage folder: weights, processor, remote code and `training_metadata.json`,
   written in one atomic rename.

Several processes: every process runs `run_stage`. Batches are not dispatched from rank 0 (accelerate's
default for an `IterableDataset` concatenates the ranks' batches, which fails for padded batches with optional
`pixel_values`): every process computes the same seeded mixture plan and reads, decodes and encodes only its
own slots, the `per_device_batch_size` slice of every `per_device_batch_size x world_size` chunk that
accelerate's `IterableDatasetShard` would have kept (that wrapper is made a pass-through), so one optimizer
step is exactly `examples_per_step = per_device_batch_size x grad_accum x world_size` consecutive plan slots:
the unit `data.group_by_modality` keeps to one modality. A process's data work is its share of the step, not
the whole step; loader workers split it further (see `deepseek_vl_hf.data.mixture`).
On GPUs `train.fsdp` (or an accelerate FSDP config) shards with FSDP2; on CPU accelerate ignores FSDP and
the Trainer runs DDP over gloo.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.data_loader import IterableDatasetShard
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from deepseek_vl_hf.atomic import atomic_directory
from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint
from deepseek_vl_hf.data import (
    BadRecord,
    MixtureDataset,
    ModalitySchedule,
    Source,
    VLCollator,
    encode_record,
    open_records,
)
from deepseek_vl_hf.data.streaming import stream_records
from deepseek_vl_hf.lora import PeftSettings, apply_lora, base_loading_kwargs, save_adapter
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import DeepseekVLHFForCausalLM
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor
from deepseek_vl_hf.training.bad_records import BATCH_KEY as BAD_RECORDS
from deepseek_vl_hf.training.bad_records import BadRecordCounter
from deepseek_vl_hf.training.callbacks import LanguageRetentionCallback, NonFiniteLossGuard, SigtermCheckpoint
from deepseek_vl_hf.training.checkpoints import CompleteCheckpoints, last_complete_checkpoint
from deepseek_vl_hf.training.metadata import read_metadata, write_metadata
from deepseek_vl_hf.training.recipe import DataConfig, ModelConfig, Recipe, RecipeError, TrainConfig
from deepseek_vl_hf.training.stages import apply_stage, group_of, trainable_groups

logger = logging.getLogger(__name__)

# FSDP units: the modules never split across devices (decoder layers, SigLIP and SAM blocks).
FSDP_WRAP_CLASSES: list[str] = list(DeepseekVLHFForCausalLM._no_split_modules)


class TrainingInterrupted(RuntimeError):
    """SIGTERM stopped training after a resumable checkpoint was saved."""


def resolve_attn_implementation(requested: str) -> str:
    """`auto` -> flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa (logged)."""
    flash_available = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested == "flash_attention_2" and not flash_available:
        raise RecipeError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA device "
            '(pip install -e ".[flash]"); use auto to fall back to sdpa'
        )
    if requested != "auto":
        return requested
    if flash_available:
        return "flash_attention_2"
    logger.info("flash-attn is not installed or there is no CUDA device: the LLM uses sdpa attention")
    return "sdpa"


def fsdp_arguments(train: TrainConfig) -> dict[str, Any]:
    """`TrainingArguments` fields for FSDP2 full shard, one unit per `FSDP_WRAP_CLASSES` block (or none)."""
    if not train.fsdp:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": FSDP_WRAP_CLASSES,
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": train.gradient_checkpointing,  # FSDP's own, on the wrapped blocks
            "cpu_ram_efficient_loading": False,
        },
    }


def training_arguments(recipe: Recipe, sources: list[Source]) -> TrainingArguments:
    """The recipe's `train` section as `TrainingArguments` (Trainer checkpoints go to the checkpoint dir)."""
    t = recipe.train
    evaluating = bool(recipe.data.eval)
    # A text-only micro-batch leaves the adapter (and any trainable vision layer) without gradients: DDP must
    # look for unused parameters when the mixture has language data.
    text_batches = any(source.modality == "text" for source in sources)
    return TrainingArguments(
        output_dir=t.resolved_checkpoint_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant_with_warmup" if t.lr_scheduler == "step" else t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        optim="adamw_torch",
        bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing and not t.fsdp,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_first_step=True,
        log_level="info",
        log_level_replica="warning",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if evaluating and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        eval_on_start=evaluating,
        seed=t.seed,
        remove_unused_columns=False,  # the collator needs "images" and "source", which the model lacks
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=not torch.accelerator.is_available(),  # makes torchrun on CPU-only machines run DDP over gloo
        dataloader_pin_memory=torch.accelerator.is_available(),
        accelerator_config={"dispatch_batches": False},
        ddp_find_unused_parameters=text_batches,
        # Resuming fast-forwards the mixture to the checkpoint's plan position (no batch is re-encoded).
        ignore_data_skip=True,
        report_to=t.report_to,
        **fsdp_arguments(t),
    )


def load_start(
    model_cfg: ModelConfig, attn_implementation: str, peft: PeftSettings
) -> tuple[DeepseekVLHFForCausalLM, Any, dict]:
    """The model and processor the stage starts from, and where they came from (for the metadata).

    With `peft.qlora` the base loads with a 4-bit LLM (`base_loading_kwargs`).
    """
    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.preset is not None:
        model, processor = build_random_model(
            model_cfg.preset, model_cfg.preset_overrides, seed=model_cfg.init_seed
        )
        model.set_attn_implementation({"text_config": attn_implementation})
        return model.to(dtype), processor, {"preset": model_cfg.preset, "seed": model_cfg.init_seed}
    folder = Path(model_cfg.init_from)
    if not (folder / "config.json").is_file():
        raise RecipeError(
            f"model.init_from: {folder} is not a checkpoint folder (no config.json); train the previous "
            "stage first or point it at a converted checkpoint"
        )
    loading = {"dtype": dtype, "attn_implementation": {"text_config": attn_implementation}}
    model = DeepseekVLHFForCausalLM.from_pretrained(folder, **{**loading, **base_loading_kwargs(peft)})
    processor = DeepseekVLHFProcessor.from_pretrained(folder, trust_remote_code=True)
    previous = read_metadata(folder) or {}
    origin = {"path": str(folder), "stage": previous.get("stage"), "recipe_name": previous.get("recipe_name")}
    return model, processor, origin


def parse_data(recipe: Recipe) -> tuple[list[Source], ModalitySchedule]:
    """The recipe's `data.sources` and `data.schedule` as data-package objects (bad fields: recipe errors)."""
    try:
        return [Source(**spec) for spec in recipe.data.sources], ModalitySchedule(**recipe.data.schedule)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"data: {exc}") from None


def encode_first(source: Source, processor, max_length: int | None, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` encoded examples from the start of `source`, bad records skipped; an error naming the
    source and the reasons when it has no usable record (caught here, before any process starts training)."""
    try:
        read = stream_records if source.streaming else open_records
        table = read(source.path, source.kind)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"data source {source.name!r}: {exc}") from None
    examples, skipped = [], Counter()
    for record in table:
        if len(examples) == limit:
            break
        try:
            examples.append(
                {
                    **encode_record(record, source.kind, processor, max_length, source.supervise),
                    "source": source.name,
                }
            )
        except BadRecord as exc:
            skipped[exc.reason] += 1
    if not examples:
        raise RecipeError(
            f"data source {source.name!r} ({source.path}) has no usable record: {sum(skipped.values())} record(s), "
            f"skipped by reason {dict(skipped)}; fix the data or remove the source"
        )
    if skipped:
        logger.warning(
            "data source %r: %d bad record(s) skipped (%s)", source.name, sum(skipped.values()), dict(skipped)
        )
    return examples


def build_eval_sets(data: DataConfig, processor) -> dict[str, list[dict[str, Any]]]:
    """Each eval set's first `max_examples` usable records, encoded (the Trainer logs `eval_<name>_loss`)."""
    return {
        name: encode_first(
            Source(name=name, kind=cfg.kind, path=cfg.path, supervise=cfg.supervise),
            processor,
            data.max_length,
            cfg.max_examples,
        )
        for name, cfg in data.eval.items()
    }


@dataclass
class SourceTaggingCollator:
    """`VLCollator` plus `sources`, each example's data source, which the NaN guard reports (and removes), and
    `bad_records`, the bad records each example replaced, which `BadRecordCounter` counts (and removes)."""

    collator: VLCollator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        batch["sources"] = [feature.get("source", "unknown") for feature in features]
        batch[BAD_RECORDS] = [feature.get(BAD_RECORDS) for feature in features]
        return batch


def step_decay_factor(
    step: int, warmup: int, total: int, milestones: list[float], factors: list[float]
) -> float:
    """LR factor of the "step" schedule: linear warm-up, then `factors[i]` from `milestones[i] * total` on."""
    if step < warmup:
        return step / max(1, warmup)
    factor = 1.0
    for milestone, value in zip(milestones, factors):
        if step >= milestone * total:
            factor = value
    return factor


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter name without the prefixes DDP, torch.compile, FSDP1 and activation checkpointing insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def split_by_group_lr(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, group_lrs: dict[str, float]
) -> None:
    """Give the parameters of each group in `group_lrs` (see `training.stages`) that peak learning rate.

    Each optimizer param group (the Trainer's decay / no-decay split) is split by learning rate in place,
    before any step: the LR scheduler then scales every group by the same schedule.
    """
    names = {id(param): unwrapped_name(name) for name, param in model.named_parameters()}
    split = []
    for group in optimizer.param_groups:
        by_lr: dict[float, list[torch.nn.Parameter]] = {}
        for param in group["params"]:
            lr = group_lrs.get(group_of(names[id(param)]), group["lr"])
            by_lr.setdefault(lr, []).append(param)
        split += [{**group, "params": params, "lr": lr} for lr, params in by_lr.items()]
    optimizer.param_groups.clear()
    for group in split:
        optimizer.add_param_group(group)


class StageTrainer(CompleteCheckpoints, Trainer):
    """The `Trainer` plus the "step" LR schedule (DeepSeek-LLM's multi-step decay) that transformers lacks,
    per-group peak learning rates (`train.group_learning_rates`, e.g. a lower one for a vision tower) and
    checkpoints marked complete (`training.checkpoints`)."""

    def __init__(
        self,
        *args: Any,
        step_decay: tuple[list[float], list[float]] | None = None,
        group_learning_rates: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        self.step_decay = step_decay
        self.group_learning_rates = group_learning_rates or {}
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The Trainer's loader; a rank-sharded mixture already yields only this rank's examples, so
        accelerate's `IterableDatasetShard` is made a pass-through instead of slicing them again."""
        loader = super().get_train_dataloader()
        shard = getattr(loader, "dataset", None)
        if isinstance(shard, IterableDatasetShard) and getattr(shard.dataset, "world_size", 1) > 1:
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.group_learning_rates:
            split_by_group_lr(optimizer, self.model if model is None else model, self.group_learning_rates)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.step_decay is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        milestones, factors = self.step_decay
        factor = partial(
            step_decay_factor,
            warmup=self.args.get_warmup_steps(num_training_steps),
            total=num_training_steps,
            milestones=milestones,
            factors=factors,
        )
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler


def save_stage(
    trainer: Trainer, processor, output: Path, metadata: dict[str, Any], overwrite: bool
) -> Path | None:
    """Write the stage folder atomically from the main process, after gathering FSDP shards on every one."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        with atomic_directory(output, overwrite=overwrite) as tmp:
            save_checkpoint(model, processor, tmp, overwrite=True, state_dict=state_dict)
            write_metadata(tmp, **metadata)
    trainer.accelerator.wait_for_everyone()
    return output if trainer.is_world_process_zero() else None


def save_adapter_stage(trainer: Trainer, output: Path, metadata: dict[str, Any], overwrite: bool) -> Path | None:
    """Write the LoRA adapter folder (weights, adapter card, training metadata) atomically from the main process."""
    if trainer.is_world_process_zero():
        recipe = metadata["recipe"]
        save_adapter(
            trainer.accelerator.unwrap_model(trainer.model),
            output,
            base_model=recipe["model"]["init_from"],
            recipe=recipe,
            metrics=metadata["final_metrics"],
            overwrite=overwrite,
            extra=lambda tmp: write_metadata(tmp, **metadata),
        )
    trainer.accelerator.wait_for_everyone()
    return output if trainer.is_world_process_zero() else None


def _check_output_paths(recipe: Recipe, args: TrainingArguments, resume: bool) -> str | None:
    """Fail before training when the run would clobber or mix with an earlier one; return what to resume."""
    output, checkpoints = Path(recipe.train.output_dir), args.output_dir
    if resume:
        last, skipped = last_complete_checkpoint(checkpoints) if os.path.isdir(checkpoints) else (None, [])
        for path, reason in skipped:
            logger.warning("--resume: skipping %s: %s", path, reason)
        if last is None:
            raise RecipeError(f"--resume: no complete checkpoint-* folder in {checkpoints} to resume from")
        logger.warning("--resume: continuing from %s", last)
        with args.main_process_first():  # the step is redone and saved again; no stale files may mix in
            if args.process_index == 0:
                for path, _ in skipped:
                    shutil.rmtree(path)
        return last
    if output.exists() and any(output.iterdir()) and not recipe.train.overwrite_output:
        raise RecipeError(
            f"{output} already exists; set train.overwrite_output=true or choose another output_dir"
        )
    if os.path.isdir(checkpoints) and get_last_checkpoint(checkpoints) is not None:
        if not recipe.train.overwrite_output:
            raise RecipeError(
                f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it, or set "
                "train.overwrite_output=true to delete them and start over"
            )
        with args.main_process_first():
            if args.process_index == 0:
                shutil.rmtree(checkpoints)
    return None


def _check_data_settings(recipe: Recipe, sources: list[Source]) -> None:
    """Data settings that cannot work with the rest of the recipe, found before anything is loaded."""
    llm_trains = recipe.peft.enabled or "language_model" in trainable_groups(recipe.stage, recipe.trainable)
    if any(s.modality == "text" for s in sources) and not llm_trains:
        raise RecipeError(
            f"stage {recipe.stage} keeps the language model frozen, so a language-only batch trains nothing: "
            "remove the text sources or make language_model trainable"
        )


def _check_fsdp(trainer: Trainer, recipe: Recipe, sources: list[Source]) -> None:
    """FSDP runs the vision blocks as collectives: every rank must see images in the same micro-steps."""
    mixed = len({source.modality for source in sources}) > 1
    if trainer.is_fsdp_enabled and mixed and not recipe.data.group_by_modality:
        raise RecipeError(
            "FSDP with language and multimodal sources needs data.group_by_modality=true: a rank whose "
            "micro-batch has no image would skip the vision tower's collectives while the others run them"
        )
    if recipe.train.fsdp and not trainer.is_fsdp_enabled:
        logger.warning(
            "train.fsdp is set but accelerate did not enable FSDP (CPU run?): training with %s",
            trainer.accelerator.distributed_type,
        )


def run_stage(
    recipe: Recipe,
    resume: bool = False,
    recipe_path: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path | None:
    """Train one stage and write its folder; returns the folder (None on non-main processes)."""
    t = recipe.train
    sources, schedule = parse_data(recipe)
    _check_data_settings(recipe, sources)
    args = training_arguments(recipe, sources)
    checkpoint = _check_output_paths(recipe, args, resume)

    attn_implementation = resolve_attn_implementation(recipe.model.attn_implementation)
    model, processor, origin = load_start(recipe.model, attn_implementation, recipe.peft)
    if recipe.peft.enabled:  # LoRA on a frozen base instead of the stage's trainable groups
        model = apply_lora(model, recipe.peft)
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        groups = ["lora", *recipe.peft.all_modules_to_save]
    else:
        trainable = set(apply_stage(model, recipe.stage, recipe.trainable))
        groups = trainable_groups(recipe.stage, recipe.trainable)
    parameter_counts = {
        "trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
    }

    for source in sources:  # a source with no usable record fails here, with its skip reasons
        encode_first(source, processor, recipe.data.max_length, limit=1)
    examples_per_step = t.per_device_batch_size * t.gradient_accumulation_steps * args.world_size
    train_set = MixtureDataset(
        sources,
        processor,
        schedule=schedule,
        examples_per_step=examples_per_step,
        group_by_modality=recipe.data.group_by_modality,
        seed=recipe.data.seed,
        max_length=recipe.data.max_length,
        rank=args.process_index,
        world_size=args.world_size,
        micro_batch_size=t.per_device_batch_size,
    )
    if checkpoint is not None:
        done = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
        train_set.load_state_dict({"position": done * examples_per_step})
    eval_sets = build_eval_sets(recipe.data, processor)

    guard = NonFiniteLossGuard(t.on_nan)
    guard.attach(model)
    sigterm = SigtermCheckpoint()
    bad_records = BadRecordCounter.from_checkpoint(checkpoint)
    bad_records.attach(model)
    pad_id = processor.tokenizer.pad_token_id
    collator = VLCollator(
        pad_token_id=pad_id if pad_id is not None else processor.tokenizer.eos_token_id,
        image_processor=processor.image_processor,
    )
    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets or None,
        data_collator=SourceTaggingCollator(collator),
        processing_class=processor,
        callbacks=[guard, sigterm, bad_records, *callbacks],  # bad_records syncs after sigterm asks to save
        step_decay=(t.step_milestones, t.step_factors) if t.lr_scheduler == "step" else None,
        group_learning_rates=t.group_learning_rates,
    )
    # First, so that the loggers and the progress bar see the perplexities it adds to the eval logs.
    trainer.callback_handler.callbacks.insert(0, LanguageRetentionCallback())
    _check_fsdp(trainer, recipe, sources)

    result = trainer.train(resume_from_checkpoint=checkpoint)
    if sigterm.received:
        raise TrainingInterrupted(
            f"stopped by SIGTERM after step {sigterm.saved_step}; the checkpoint is in {args.output_dir}, "
            "continue with --resume"
        )
    metrics = dict(result.metrics)
    logger.info("bad records skipped over the run, by source and reason: %s", bad_records.total or "none")
    if eval_sets:
        metrics.update(trainer.evaluate())

    metadata = {
        "recipe_name": recipe.name,
        "recipe_path": recipe_path,
        "recipe": recipe.to_dict(),
        "stage": recipe.stage,
        "started_from": origin,
        "resumed_from": checkpoint,
        "trainable_groups": groups,
        **parameter_counts,
        "data_mix": {
            "sources": [{**asdict(source), "modality": source.modality} for source in sources],
            "group_by_modality": recipe.data.group_by_modality,
            "schedule": asdict(train_set.schedule),
            "examples_per_step": examples_per_step,
            "observed_examples": train_set.plan_counts(trainer.state.global_step * examples_per_step),
        },
        "steps": trainer.state.global_step,
        "max_steps": t.max_steps,
        "skipped_steps": guard.skipped_steps,
        "bad_records": bad_records.total,
        "world_size": args.world_size,
        "final_metrics": metrics,
        "attn_implementation": attn_implementation,
    }
    overwrite = t.overwrite_output or resume
    if recipe.peft.enabled:
        return save_adapter_stage(trainer, Path(t.output_dir), metadata, overwrite=overwrite)
    return save_stage(trainer, processor, Path(t.output_dir), metadata, overwrite=overwrite)
