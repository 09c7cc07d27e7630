"""A weighted, seeded, resumable mixture of data sources with DeepSeek-VL's modality warm-up and grouping.

The stream is a pure function of the seed and the example's position: step k holds `examples_per_step`
consecutive examples; its modality (with grouping) and each example's source are drawn from a generator
seeded by (seed, k); a source is read in a fresh seeded permutation each pass, its n-th draw taking the n-th
record of that order. A bad record is skipped (counted, warned about) and replaced by the next record of the
same order, so skips never shift other positions and the state to resume from is just the position and the
per-source draw counts.
"""

from __future__ import annotations

import copy
import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepseek_vl_hf.data.encoding import SUPERVISION_MODES, encode_record
from deepseek_vl_hf.data.records import RECORD_KINDS, BadRecord, open_records

logger = logging.getLogger(__name__)

TEXT, MULTIMODAL = "text", "multimodal"
WARN_FIRST_SKIPS = 5  # skipped records per source warned about one by one
SKIP_SUMMARY_EVERY = 100  # then one summary warning per this many skips of a source
_PLAN_STREAM, _ORDER_STREAM = 0, 1  # keep the step plans and the record orders on independent generators


@dataclass
class Source:
    """One data source: a file or folder of records of one kind, with its sampling weight within its modality.

    `supervise` defaults to "assistant" for conversations and "all" otherwise. `text_only` marks a
    conversations source without images (pure-text dialogue) as language data for the modality schedule.
    """

    name: str
    kind: str
    path: str
    weight: float = 1.0
    supervise: str | None = None
    text_only: bool = False

    def __post_init__(self):
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"source {self.name!r}: unknown kind {self.kind!r}; use one of {RECORD_KINDS}")
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")
        if self.supervise is None:
            self.supervise = "assistant" if self.kind == "conversations" else "all"
        if self.supervise not in SUPERVISION_MODES or (
            self.supervise == "assistant" and self.kind != "conversations"
        ):
            raise ValueError(
                f"source {self.name!r}: supervise={self.supervise!r} does not fit kind {self.kind!r} "
                "('assistant' is for conversations; 'all' for any kind)"
            )

    @property
    def modality(self) -> str:
        return TEXT if self.kind == "text" or self.text_only else MULTIMODAL


@dataclass
class ModalitySchedule:
    """The language share per step: linear from `start_language_share` to `target_language_share` over
    `warmup_steps`, then constant (the paper's modality warm-up; its final mix is language:multimodal 7:3).
    """

    start_language_share: float = 1.0
    target_language_share: float = 0.7
    warmup_steps: int = 0

    def __post_init__(self):
        for name in ("start_language_share", "target_language_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def language_share(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.target_language_share
        progress = step / self.warmup_steps
        return self.start_language_share + (self.target_language_share - self.start_language_share) * progress


class MixtureDataset(torch.utils.data.IterableDataset):
    """An endless stream of encoded examples (`encode_record` outputs plus "source") from weighted sources.

    With `group_by_modality`, all examples of a step are language or all multimodal, the step being language
    with probability `schedule.language_share(step)`; without it each example draws its modality. Within a
    modality sources are drawn by weight; if only one modality has sources, every step is of that modality.
    Iterating continues from the current state; `state_dict()` / `load_state_dict()` resume exactly. With
    data-loader workers, worker w of W yields the steps k with k % W == w (whole steps, in the loader's order
    when its batch size is `examples_per_step`); the main-process object's state then does not advance.
    """

    def __init__(
        self,
        sources: list[Source],
        processor,
        schedule: ModalitySchedule | None = None,
        examples_per_step: int = 1,
        group_by_modality: bool = True,
        seed: int = 0,
        max_length: int | None = None,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if examples_per_step < 1:
            raise ValueError(f"examples_per_step must be >= 1, got {examples_per_step}")
        self.sources = list(sources)
        self.processor = processor
        self.schedule = schedule or ModalitySchedule()
        self.examples_per_step = examples_per_step
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.max_length = max_length
        self.tables = [open_records(source.path, source.kind) for source in self.sources]
        for source, table in zip(self.sources, self.tables):
            if len(table) == 0:
                raise ValueError(f"data source {source.name!r} ({source.path}) has no records")
        self._members = {
            modality: np.array(
                [i for i, s in enumerate(self.sources) if s.modality == modality], dtype=np.int64
            )
            for modality in (TEXT, MULTIMODAL)
        }
        self._cumulative_weights = {
            modality: np.cumsum([self.sources[i].weight for i in members])
            / sum(self.sources[i].weight for i in members)
            for modality, members in self._members.items()
            if len(members)
        }
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self.position = 0
        self.draws = [0] * len(self.sources)
        self.stats: dict[str, dict] = {
            "examples": dict.fromkeys(names, 0),
            "skipped": {name: {} for name in names},
        }

    def language_share(self, step: int) -> float:
        """The schedule's language share at `step`, or 1.0 / 0.0 when only one modality has sources."""
        if not len(self._members[MULTIMODAL]):
            return 1.0
        if not len(self._members[TEXT]):
            return 0.0
        return self.schedule.language_share(step)

    def step_sources(self, step: int) -> list[int]:
        """The source index of each example of `step`: a pure function of the seed and the step."""
        rng = np.random.default_rng([self.seed, _PLAN_STREAM, step])
        size = self.examples_per_step
        share = self.language_share(step)
        is_text = np.full(size, rng.random() < share) if self.group_by_modality else rng.random(size) < share
        picks = rng.random(size)
        plan = np.empty(size, dtype=np.int64)
        for modality, chosen in ((TEXT, is_text), (MULTIMODAL, ~is_text)):
            if chosen.any():
                members = self._members[modality]
                slots = np.searchsorted(self._cumulative_weights[modality], picks[chosen], side="right")
                plan[chosen] = members[np.minimum(slots, len(members) - 1)]
        return plan.tolist()

    def _order(self, source: int, pass_index: int) -> np.ndarray:
        """The record order of one pass over a source, seeded by the seed, the source's name and the pass."""
        cached = self._orders.get(source)
        if cached is None or cached[0] != pass_index:
            name_key = zlib.crc32(self.sources[source].name.encode())
            rng = np.random.default_rng([self.seed, _ORDER_STREAM, name_key, pass_index])
            cached = (pass_index, rng.permutation(len(self.tables[source])))
            self._orders[source] = cached
        return cached[1]

    def _example(self, source: int, draw: int) -> dict[str, Any]:
        """The `draw`-th record of a source, encoded; bad ones are skipped for the next in the same order."""
        spec, table = self.sources[source], self.tables[source]
        pass_index, start = divmod(draw, len(table))
        order = self._order(source, pass_index)
        for attempt in range(len(table)):
            index = int(order[(start + attempt) % len(table)])
            try:
                example = encode_record(
                    table[index], spec.kind, self.processor, self.max_length, spec.supervise
                )
            except BadRecord as err:
                self._count_skip(spec.name, index, err)
                continue
            example["source"] = spec.name
            self.stats["examples"][spec.name] += 1
            return example
        raise RuntimeError(
            f"data source {spec.name!r} ({spec.path}) has no usable record: all {len(table)} are bad "
            f"({self.stats['skipped'][spec.name]}); fix the data or remove the source"
        )

    def _count_skip(self, name: str, index: int, err: BadRecord) -> None:
        counts = self.stats["skipped"][name]
        counts[err.reason] = counts.get(err.reason, 0) + 1
        total = sum(counts.values())
        if total <= WARN_FIRST_SKIPS:
            logger.warning("data source %r: skipped record %d (%s)", name, index, err)
        elif total % SKIP_SUMMARY_EVERY == 0:
            logger.warning("data source %r: %d records skipped so far, by reason: %s", name, total, counts)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        shard, num_shards = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        plan_step, plan = -1, []
        while True:
            step, offset = divmod(self.position, self.examples_per_step)
            if step != plan_step:
                plan_step, plan = step, self.step_sources(step)
            source = plan[offset]
            draw = self.draws[source]
            self.draws[source] += 1
            self.position += 1
            if step % num_shards == shard:
                yield self._example(source, draw)

    def observed_shares(self) -> dict[str, int]:
        """How many examples each source has contributed so far (divide by their sum for shares)."""
        return dict(self.stats["examples"])

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the next example's position, each source's draw count, and the stats."""
        draws = {source.name: count for source, count in zip(self.sources, self.draws)}
        return {"position": self.position, "draws": draws, "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; a state with only "position" replays the draw counts up to it."""
        self.position = int(state["position"])
        if "draws" in state:
            names = [source.name for source in self.sources]
            if sorted(state["draws"]) != sorted(names):
                raise ValueError(
                    f"the state is for sources {sorted(state['draws'])}, this mixture has {sorted(names)}"
                )
            self.draws = [int(state["draws"][name]) for name in names]
        else:
            self.draws = self._draws_at(self.position)
        if "stats" in state:
            self.stats = copy.deepcopy(state["stats"])

    def _draws_at(self, position: int) -> list[int]:
        """Each source's draw count before `position`, by replaying the step plans."""
        draws = np.zeros(len(self.sources), dtype=np.int64)
        full_steps, rest = divmod(position, self.examples_per_step)
        for step in range(full_steps):
            draws += np.bincount(self.step_sources(step), minlength=len(self.sources))
        if rest:
            draws += np.bincount(self.step_sources(full_steps)[:rest], minlength=len(self.sources))
        return draws.tolist()
