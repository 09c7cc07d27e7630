"""Training recipes: YAML files with `name`, `stage`, `trainable` and sections `model`, `data` and `train`.

`load_recipe(path, overrides)` applies `--set key=value` overrides (dotted keys; list items by index, e.g.
`data.sources.0.path=...`) to the YAML tree, then builds the dataclasses below; an unknown key is an error, so
a typo fails before training starts. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepseek_vl_hf.lora import PeftSettings
from deepseek_vl_hf.training.stages import GROUPS, trainable_groups


class RecipeError(ValueError):
    """A recipe that cannot be used as written (unknown key, bad value, missing file)."""


@dataclass
class ModelConfig:
    """Where the stage starts: the previous stage's folder (`init_from`) or a random-weight `preset`."""

    init_from: str | None = None
    preset: str | None = None
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    dtype: str = "float32"  # the master weights; `train.bf16` adds bf16 autocast on top
    attn_implementation: str = "auto"  # auto = flash_attention_2 when installed (CUDA), else sdpa

    def __post_init__(self) -> None:
        if (self.init_from is None) == (self.preset is None):
            raise RecipeError("model: set exactly one of init_from (a checkpoint folder) or preset")
        if self.dtype not in ("float32", "bfloat16"):
            raise RecipeError(f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass
class EvalSetConfig:
    """A held-out set, evaluated every `train.eval_steps` and at the end (`eval_<name>_loss` / `_ppl`)."""

    kind: str
    path: str
    supervise: str | None = None
    max_examples: int = 256


@dataclass
class DataConfig:
    """The training mixture (`sources` are `deepseek_vl_hf.data.Source` fields) and the eval sets."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, EvalSetConfig] = field(default_factory=dict)
    max_length: int = 512
    # each optimizer step all language or all multimodal; unset = on in stage 2 (the paper's section 4.5), else off
    group_by_modality: bool | None = None
    schedule: dict[str, Any] = field(default_factory=dict)  # `deepseek_vl_hf.data.ModalitySchedule` fields
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise RecipeError("data.sources is empty: a stage needs at least one training source")


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and fault handling; names follow `transformers.TrainingArguments`."""

    output_dir: str
    max_steps: int
    learning_rate: float
    # group -> its own peak learning rate (same schedule), e.g. {siglip: 1e-5}; groups not named use learning_rate
    group_learning_rates: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: str | None = None  # Trainer checkpoints; default `<output_dir>-checkpoints`
    overwrite_output: bool = False
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"  # a transformers scheduler name, or "step" (multi-step decay)
    step_milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])  # fractions of max_steps
    step_factors: list[float] = field(
        default_factory=lambda: [0.316, 0.1]
    )  # lr multipliers from each milestone
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 full shard through TrainingArguments (torchrun); accelerate configs set it too
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    eval_batch_size: int | None = None
    seed: int = 0
    on_nan: str = "stop"  # stop | skip (drop that optimizer step's update)
    dataloader_num_workers: int = 0
    report_to: list[str] = field(default_factory=lambda: ["none"])

    def __post_init__(self) -> None:
        if self.on_nan not in ("stop", "skip"):
            raise RecipeError(f"train.on_nan must be stop or skip, got {self.on_nan!r}")
        if len(self.step_milestones) != len(self.step_factors):
            raise RecipeError("train.step_milestones and train.step_factors must have the same length")
        for group, lr in self.group_learning_rates.items():
            if not isinstance(lr, (int, float)) or lr < 0:
                raise RecipeError(f"train.group_learning_rates.{group} must be a number >= 0, got {lr!r}")
        for name in (
            "max_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            if getattr(self, name) < 1:
                raise RecipeError(f"train.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def resolved_checkpoint_dir(self) -> str:
        return self.checkpoint_dir or f"{self.output_dir.rstrip('/')}-checkpoints"


@dataclass
class Recipe:
    """One training stage: what it starts from, what trains (`stage`, `trainable` overrides), on what, how."""

    name: str
    stage: int
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    trainable: dict[str, bool] = field(default_factory=dict)  # group -> trains?, see training.stages
    peft: PeftSettings = field(default_factory=PeftSettings)  # LoRA / QLoRA instead of `trainable` groups

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise RecipeError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if self.peft.enabled and self.model.init_from is None:
            raise RecipeError("peft needs model.init_from: an adapter belongs to a saved base checkpoint folder")
        self._resolve_grouping()
        self._check_group_learning_rates()

    def _resolve_grouping(self) -> None:
        """`data.group_by_modality` unset -> on for stage 2 (as the paper trains it), off for stages 1 and 3;
        grouping that cannot apply to the rest of the recipe is an error naming both ways out."""
        data, train = self.data, self.train
        defaulted = data.group_by_modality is None
        if defaulted:
            data.group_by_modality = self.stage == 2
        if data.group_by_modality and train.dataloader_num_workers and train.gradient_accumulation_steps > 1:
            why = "(on by default in stage 2)" if defaulted else "(set in the recipe)"
            raise RecipeError(
                f"data.group_by_modality {why} cannot apply with train.dataloader_num_workers="
                f"{train.dataloader_num_workers} and gradient_accumulation_steps={train.gradient_accumulation_steps}: "
                "loader workers hand out whole mixture steps in turn, which would interleave micro-batches of "
                "different steps; set gradient_accumulation_steps=1 (raise the batch size instead), "
                "dataloader_num_workers=0, or data.group_by_modality=false"
            )

    def _check_group_learning_rates(self) -> None:
        named = self.train.group_learning_rates
        if named and self.peft.enabled:
            raise RecipeError(
                "train.group_learning_rates applies to stage groups; a LoRA run trains its adapters only"
            )
        unknown = sorted(set(named) - set(GROUPS))
        if unknown:
            raise RecipeError(
                f"train.group_learning_rates: unknown parameter group(s) {unknown}; choose from {sorted(GROUPS)}"
            )
        try:
            training = trainable_groups(self.stage, self.trainable)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        idle = sorted(set(named) - set(training))
        if idle:
            raise RecipeError(
                f"train.group_learning_rates names {idle}, which do not train in stage {self.stage} "
                f"(training: {training}); remove them or make them trainable"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _set_path(tree: Any, dotted_key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists; missing dict levels are created, list indexes must exist."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for key in parents:
        if isinstance(node, list):
            node = node[_list_index(node, key, dotted_key)]
        else:
            node = node.setdefault(key, {})
            if node is None:
                raise RecipeError(f"--set {dotted_key}: {key} is null in the recipe")
    if isinstance(node, list):
        node[_list_index(node, leaf, dotted_key)] = value
    else:
        node[leaf] = value


def _list_index(node: list, key: str, dotted_key: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise RecipeError(f"--set {dotted_key}: {key!r} is not an index of a list of {len(node)} item(s)")
    return int(key)


def _build(cls: type, tree: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into dataclass fields; unknown keys are errors."""
    if not isinstance(tree, dict):
        raise RecipeError(f"{where or 'recipe'} must be a mapping, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {where or 'recipe'}; known: {sorted(names)}")
    kwargs = {}
    for key, value in tree.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value or {}, f"{where}.{key}".lstrip("."))
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            value = {
                k: _build(typing.get_args(hint)[1], v, f"{where}.{key}.{k}".lstrip("."))
                for k, v in (value or {}).items()
            }
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:  # a missing required key, or a value a section refuses (peft)
        raise RecipeError(f"{where or 'recipe'}: {exc}") from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted `overrides`, validate, and return the `Recipe`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found")
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    return _build(Recipe, tree, "")
