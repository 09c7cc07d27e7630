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


def read_metadata(folder: str | Path) -> dict[str, Any] | None:
    """The folder's training metadata, or None when it was not written by `deepseek-vl-hf train`."""
    path = Path(folder) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_metadata(folder: str | Path, **fields: Any) -> Path:
    """Write the metadata file with `fields` plus the format version, software versions and the time."""
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
