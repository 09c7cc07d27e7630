"""Trainer callbacks: perplexity next to every eval loss (language retention), non-finite loss handling, and
a checkpoint on SIGTERM.

Decisions that change the control flow (stop, skip an update, save and stop) are taken on a value all ranks
agree on (a MAX all-reduce of the local flag), so multi-process runs never diverge into a collective hang.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss and the recipe says `on_nan: stop`."""


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True when `flag` is set on any process (a MAX all-reduce; just `flag` outside distributed runs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class LanguageRetentionCallback(TrainerCallback):
    """Adds `eval_<set>_ppl = exp(eval_<set>_loss)` to every evaluation log.

    With a text-only eval set named `text` besides the multimodal one, each evaluation then logs
    `eval_text_loss` / `eval_text_ppl` next to `eval_multimodal_loss` / `_ppl`: the language-vs-multimodal
    trade-off of the paper's Figure 4, visible in every run. It must run before the reporting callbacks (the
    runner puts it first), since they read the same `logs` dict.
    """

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs) -> None:
        added = {
            f"{key[: -len('_loss')]}_ppl": math.exp(min(value, 700.0))
            for key, value in (logs or {}).items()
            if key.startswith("eval_") and key.endswith("_loss") and isinstance(value, (int, float))
        }
        if added:
            logs.update(added)
            if state.log_history:
                state.log_history[-1].update(added)


class NonFiniteLossGuard(TrainerCallback):
    """Checks every training micro-batch loss. On a NaN/inf one, `stop` raises `NonFiniteLossError` and `skip`
    drops that optimizer step's update (gradients cleared before `optimizer.step`); both name the step and
    the data sources of the offending batch.

    `attach(model)` adds two hooks: a pre-forward hook that takes the batch's `sources` list (put there by the
    runner's collator) out of the model's inputs, and a forward hook that checks `output.loss`.
    """

    def __init__(self, policy: str):
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nan must be stop or skip, got {policy!r}")
        self.policy = policy
        self.skipped_steps: list[int] = []
        self._bad_batches: list[str] = []
        self._sources: list[str] | None = None

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._take_sources, with_kwargs=True)
        model.register_forward_hook(self._check_loss)

    def _take_sources(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        self._sources = kwargs.pop("sources", None)
        return args, kwargs

    def _check_loss(self, module: nn.Module, args: tuple, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            sources = sorted(set(self._sources or ["unknown"]))
            self._bad_batches.append(f"loss {loss.item()} on a batch from {', '.join(sources)}")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        if not any_rank(bool(self._bad_batches), args.device):
            return
        step = state.global_step + 1
        where = "; ".join(self._bad_batches) or "a batch on another process"
        self._bad_batches.clear()
        message = f"non-finite loss at optimizer step {step} (process {args.process_index}: {where})"
        if self.policy == "stop":
            raise NonFiniteLossError(f"{message}; set train.on_nan=skip to drop such updates instead")
        logger.warning("%s: update skipped (train.on_nan=skip)", message)
        optimizer.zero_grad(set_to_none=True)
        self.skipped_steps.append(step)


class SigtermCheckpoint(TrainerCallback):
    """On SIGTERM, finishes the current optimizer step, saves a Trainer checkpoint and stops training.

    The runner then exits with `TrainingInterrupted`; `deepseek-vl-hf train RECIPE --resume` continues from
    that checkpoint. The previous SIGTERM handler is restored when training ends.
    """

    def __init__(self) -> None:
        self.received = False
        self.saved_step: int | None = None
        self._previous_handler: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM received: saving a checkpoint after the current step, then stopping")
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._previous_handler = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if any_rank(self.received, args.device):
            self.received = True
            self.saved_step = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
