"""Trainer checkpoints that `--resume` can trust: a `checkpoint-N` folder counts only once it is complete.

The Trainer writes `checkpoint-N` in place, file by file; a process killed mid-save leaves a folder that looks
like the newest checkpoint. `CompleteCheckpoints` (a `Trainer` mixin) writes a manifest, `checkpoint_complete.json`
(every file's size), last, after fsyncing the files, and only then lets the Trainer delete older checkpoints.
`last_complete_checkpoint` resumes from the newest folder whose manifest matches its files and names the
ones it passed over and why (no manifest: killed mid-save; files missing or of another size: killed while
the folder was being deleted or changed by hand).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from deepseek_vl_hf.atomic import fsync_tree, pause_point

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def mark_complete(folder: str | os.PathLike) -> Path:
    """Flush `folder`'s files, then write its manifest (atomically, fsynced): the commit point of a save."""
    folder = Path(folder)
    fsync_tree(folder)
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER
    }
    part = folder / f".{COMPLETE_MARKER}.part"
    with open(part, "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, folder / COMPLETE_MARKER)
    fsync_tree(folder)
    return folder / COMPLETE_MARKER


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when its manifest matches its files."""
    folder = Path(folder)
    try:
        files = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER} (the save was interrupted)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE_MARKER} ({exc})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def last_complete_checkpoint(run_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete `checkpoint-N` in `run_dir` (None if none), and the newer ones skipped with why."""
    found = sorted(
        ((int(match.group(1)), path) for path in Path(run_dir).iterdir()
         if (match := _CHECKPOINT.match(path.name)) and path.is_dir()),
        reverse=True,
    )
    skipped = []
    for _, path in found:
        reason = incomplete_reason(path)
        if reason is None:
            return str(path), skipped
        skipped.append((str(path), reason))
    return None, skipped


class CompleteCheckpoints:
    """`Trainer` mixin: each checkpoint gets its manifest (all processes' files written) before any older
    checkpoint is rotated away, so a kill at any moment leaves a complete checkpoint to resume from."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer rotates only once the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are written
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            mark_complete(folder)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if _internal_call and output_dir is not None:  # inside a checkpoint save: weights on disk, state not yet
            pause_point(f"trainer-checkpoint {Path(output_dir).name}")
