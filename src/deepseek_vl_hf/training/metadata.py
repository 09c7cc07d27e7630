"""`training_metadata.json`: what produced a stage folder, written next to its weights.

Keys (JSON; other tools, e.g. the model-card writer, read them, so they only ever get added, never renamed):

- `format_version` (int): 1.
- `recipe_name` (str), `recipe_path` (str or null): the recipe's `name` and the file it was loaded from.
- `recipe` (dict): the full resolved recipe after `--set` overrides (sections `model`, `data`, `train`, ...).
- `stage` (int): 1, 2 or 3.
- `started_from` (dict): `{"path", "stage", "recipe_name"}` for a checkpoint folder (stage and recipe_name
  from its own metadata, null when it has none), or `{"preset", "seed"}` for a random-weight start.
- `resumed_from` (str or null): the Trainer checkpoint this run resumed from.
- `trainable_groups` (list[str]), `trainable_parameters` / `total_parameters` (int): what trained.
- `data_mix` (dict): `sources` (each with name, kind, path, weight, supervise, text_only, modality),
  `group_by_modality`, `schedule`, `examples_per_step`, `observed_examples` (per-source counts drawn by this
  process's data stream, prefetch included).
- `steps` (int): optimizer steps done; `max_steps` (int); `skipped_steps` (list[int]: updates dropped for a
  non-finite loss); `world_size` (int).
- `final_metrics` (dict[str, float]): the Trainer's train metrics (`train_loss`, `train_runtime`, ...) and the
  final evaluation (`eval_<set>_loss`, `eval_<set>_ppl`).
- `attn_implementation` (str), `versions` (dict: deepseek_vl_hf, transformers, torch), `finished_at`
  (ISO 8601, UTC).
- `bad_records` (dict[str, dict[str, int]]): bad records skipped over the run (resumes included), per source
  and reason.
- `stages` (list[dict]): the training history behind the folder, oldest first: the start folder's `stages` plus
  this stage's entry (`stage_entry`): `name`, `trainable`, `steps`, `learning_rate`, `batch_size`,
  `data_mix` (source -> share of the examples), `metrics`.
- `base_model` (str, optional): the Hub id the weights derive from (carried on from the start folder).
- `intended_use` (str), `hyperparameters` (dict), optional: added by tools that export a finished model (the
  demo); the model card shows them.

`read_metadata` is the one reader (the model-card writer uses it too): it checks the types of the keys above
and refuses a newer `format_version`; keys it does not know are kept (newer writers only add keys).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

import deepseek_vl_hf

METADATA_FILE = "training_metadata.json"
FORMAT_VERSION = 1


class TrainingMetadataError(ValueError):
    """A `training_metadata.json` that does not follow this module's format."""


_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "recipe_name": str, "recipe_path": str, "recipe": dict, "stage": int,
    "started_from": dict, "resumed_from": str, "trainable_groups": list, "trainable_parameters": int,
    "total_parameters": int, "data_mix": dict, "steps": int, "max_steps": int, "skipped_steps": list,
    "world_size": int, "final_metrics": dict, "attn_implementation": str, "versions": dict, "finished_at": str,
    "bad_records": dict, "stages": list, "base_model": str, "intended_use": str, "hyperparameters": dict,
}
_STAGE_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "trainable": list, "steps": int, "learning_rate": (int, float), "batch_size": int,
    "data_mix": dict, "metrics": dict,
}


def _check_types(data: Any, types: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise TrainingMetadataError(f"{where} must be a JSON object, got {type(data).__name__}")
    for key, kind in types.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise TrainingMetadataError(f"{where}: {key!r} has the wrong type {type(value).__name__}")


def read_metadata(folder: str | Path) -> dict[str, Any] | None:
    """The folder's training metadata, checked; None when the folder has none."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TrainingMetadataError(f"{path} is not valid JSON: {exc}") from None
    _check_types(data, _TYPES, str(path))
    version = data.get("format_version")
    if version is None or not 1 <= version <= FORMAT_VERSION:
        raise TrainingMetadataError(
            f"{path}: format_version {version!r} is not one this version reads (1..{FORMAT_VERSION}); it was not "
            "written by `deepseek-vl-hf train`, or by a newer deepseek-vl-hf: upgrade the package"
        )
    if not isinstance(data.get("recipe_name"), str):
        raise TrainingMetadataError(f"{path} needs a 'recipe_name'")
    for index, stage in enumerate(data.get("stages") or []):
        _check_types(stage, _STAGE_TYPES, f"{path} stages[{index}]")
        if not isinstance(stage.get("name"), str):
            raise TrainingMetadataError(f"{path} stages[{index}] needs a 'name'")
    return data


def stage_entry(fields: dict[str, Any]) -> dict[str, Any]:
    """This stage's line of the `stages` history, from the other fields of its metadata."""
    mix = fields.get("data_mix") or {}
    observed = mix.get("observed_examples") or {}
    total = sum(observed.values())
    metrics = {k: round(v, 4) for k, v in (fields.get("final_metrics") or {}).items()
               if k.endswith("_loss") and isinstance(v, (int, float))}
    return {
        "name": f"{fields.get('recipe_name')} (stage {fields.get('stage')})",
        "trainable": list(fields.get("trainable_groups") or []),
        "steps": fields.get("steps"),
        "learning_rate": ((fields.get("recipe") or {}).get("train") or {}).get("learning_rate"),
        "batch_size": mix.get("examples_per_step"),
        "data_mix": {name: round(count / total, 3) for name, count in observed.items()} if total else {},
        "metrics": metrics,
    }


def write_metadata(folder: str | Path, **fields: Any) -> Path:
    """Write the metadata file with `fields` plus the format version, software versions and the time.

    Unless given, `stages` is the start folder's history plus this stage's entry, and `base_model` the start
    folder's.
    """
    start = (fields.get("started_from") or {}).get("path")
    previous = (read_metadata(start) if start else None) or {}
    if "stages" not in fields:
        fields["stages"] = [*previous.get("stages", []), stage_entry(fields)]
    if "base_model" not in fields and previous.get("base_model"):
        fields["base_model"] = previous["base_model"]
    record = {
        "format_version": FORMAT_VERSION,
        **fields,
        "versions": {
            "deepseek_vl_hf": deepseek_vl_hf.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(folder) / METADATA_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return path
