"""Bad-record counts of a training run, per source and reason, for `training_metadata.json` and the final log.

A mixture example that replaced bad records carries them (`example["bad_records"]`, `{source: {reason: n}}`);
the collator passes them on per batch and `BadRecordCounter` takes them out of the model's inputs in training
forwards. Counting what reaches the model, not what a dataset object saw, makes the counts right with loader
workers (each worker has its own copy of the dataset) and with several ranks (each counts its own examples;
the totals are summed over ranks before each checkpoint and at the end). The totals at a checkpoint are saved
in its `trainer_state.json` and carried on by `--resume`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

BATCH_KEY = "bad_records"  # the batch's list of per-example counts (see SourceTaggingCollator)
Counts = dict[str, dict[str, int]]


def add_counts(total: Counts, more: Counts | None) -> Counts:
    """Add `more` into `total` in place (and return it)."""
    for source, reasons in (more or {}).items():
        into = total.setdefault(source, {})
        for reason, count in reasons.items():
            into[reason] = into.get(reason, 0) + int(count)
    return total


class BadRecordCounter(TrainerCallback, ExportableState):
    """Counts the bad records behind the training examples; `total` is the run's count (resumes included)."""

    def __init__(self, counts: Counts | None = None):
        self.base: Counts = add_counts({}, counts)  # up to the checkpoint this run resumed from, all ranks
        self.local: Counts = {}  # seen by this process since it started
        self.total: Counts = add_counts({}, counts)  # base + every rank's local, as of the last sync

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None) -> BadRecordCounter:
        """A counter that continues the counts saved in a Trainer checkpoint (none saved: from zero)."""
        if checkpoint is None:
            return cls()
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        saved = state.get("stateful_callbacks", {}).get(cls.__name__, {})
        return cls(saved.get("attributes", {}).get("counts"))

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._take_counts, with_kwargs=True)

    def _take_counts(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        per_example = kwargs.pop(BATCH_KEY, None) or []
        if module.training:
            for counts in per_example:
                add_counts(self.local, counts)
        return args, kwargs

    def sync(self) -> Counts:
        """`total` = base + the sum of every process's local counts (a collective: all ranks call it)."""
        gathered = [self.local]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.local)
        total = add_counts({}, self.base)
        for counts in gathered:
            add_counts(total, counts)
        self.total = total
        return total

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())  # a checkpoint from before counts

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if control.should_save:  # the checkpoint saved after this step records the totals
            self.sync()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.sync()

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"counts": self.total}}
