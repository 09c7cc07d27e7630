"""A weighted, seeded, resumable mixture of data sources with DeepSeek-VL's modality warm-up and grouping.

The plan is a pure function of the seed and the example's position: step k holds `examples_per_step`
consecutive example slots; its modality (with grouping) and each slot's source are drawn from a generator
seeded by (seed, k). Every rank computes the same plan (cheap: no record is read) and reads, decodes and
encodes only its own slots: within a step, micro-batch a of rank r is the slots
`[(a * world_size + r) * micro_batch_size, ... + micro_batch_size)`, which is the slice accelerate's
`IterableDatasetShard` would give rank r, so the union of the ranks' examples is exactly the one-process
stream. Data-loader workers split a rank's micro-batches in turn (lanes).

Which record a slot gets: an in-memory source is read in a fresh seeded permutation each pass, the slot
taking the record at its draw number (how many earlier slots of the whole plan drew that source). A streaming
source (`data.streaming`) is split between the readers (rank x lane); the slot takes the next record of its
own reader's stream (draw = earlier slots of that source on the same rank and lane). Either way a bad record
is skipped (counted, warned about on the rank that met it) and replaced by the records after it in the same
order, without moving any draw number: the replacement depends only on the source's records, so no other
rank needs to know about it, and the state to resume from is just the position in the plan.
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
from deepseek_vl_hf.data.streaming import MAX_CONSECUTIVE_BAD, ShardedStream

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
    streaming: bool = False  # read shards lazily (parquet, JSON lines, WebDataset tar): see data/streaming.py
    shuffle_buffer: int = 1000  # streaming only: records shuffled within a buffer of this size each pass

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
    Iterating continues from the current state; `state_dict()` / `load_state_dict()` resume exactly.

    `rank` of `world_size` yields only its own slots (see the module docstring), in micro-batches of
    `micro_batch_size` (default: the rank's whole share of a step). With data-loader workers, worker w of W
    yields the rank's micro-batches j - j0 = w (mod W) from the first one j0, so a loader whose batch size is
    `micro_batch_size` hands them out in stream order; the main-process object's state then does not advance.
    Each example carries its "source" and its "slot" (global position in the plan).
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
        rank: int = 0,
        world_size: int = 1,
        micro_batch_size: int | None = None,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if examples_per_step < 1:
            raise ValueError(f"examples_per_step must be >= 1, got {examples_per_step}")
        micro_batch_size = micro_batch_size or max(1, examples_per_step // world_size)
        if not 0 <= rank < world_size or examples_per_step % (world_size * micro_batch_size):
            raise ValueError(
                f"examples_per_step={examples_per_step} must be a multiple of world_size={world_size} x "
                f"micro_batch_size={micro_batch_size}, and 0 <= rank={rank} < world_size"
            )
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.sources = list(sources)
        self.processor = processor
        self.schedule = schedule or ModalitySchedule()
        self.examples_per_step = examples_per_step
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.max_length = max_length
        self.tables = [
            None if source.streaming else open_records(source.path, source.kind) for source in self.sources
        ]
        self._streams: dict[tuple[int, int], ShardedStream] = {}  # (source, lane) -> this rank's reader
        self._counters: tuple[int, int, np.ndarray, dict[int, np.ndarray]] | None = None
        for source, table in zip(self.sources, self.tables):
            if table is not None and len(table) == 0:
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

    def _stream(self, source: int, lane: int, lanes: int) -> ShardedStream:
        """This rank's reader of a streaming source for one lane (reader rank x lanes + lane)."""
        stream = self._streams.get((source, lane))
        if stream is None:
            spec = self.sources[source]
            stream = ShardedStream(
                spec.path,
                spec.kind,
                seed=self.seed,
                reader=self.rank * lanes + lane,
                readers=self.world_size * lanes,
                shuffle_buffer=spec.shuffle_buffer,
            )
            self._streams[(source, lane)] = stream
        return stream

    def _candidates(self, source: int, draw: int, lane: int, lanes: int):
        """(index, record) pairs for a draw: its record, then the ones replacing it if it is bad."""
        table = self.tables[source]
        if table is None:
            stream = self._stream(source, lane, lanes)
            for attempt in range(MAX_CONSECUTIVE_BAD):
                yield draw + attempt, stream.record(draw, attempt)
            return
        pass_index, start = divmod(draw, len(table))
        order = self._order(source, pass_index)
        for attempt in range(len(table)):
            index = int(order[(start + attempt) % len(table)])
            yield index, table[index]

    def _example(self, source: int, draw: int, lane: int = 0, lanes: int = 1) -> dict[str, Any]:
        """The record of a source's `draw`, encoded; a bad one is replaced by the next one in the same order."""
        spec = self.sources[source]
        tried, replaced = 0, {}
        for index, record in self._candidates(source, draw, lane, lanes):
            tried += 1
            try:
                example = encode_record(record, spec.kind, self.processor, self.max_length, spec.supervise)
            except BadRecord as err:
                self._count_skip(spec.name, index, err)
                replaced[err.reason] = replaced.get(err.reason, 0) + 1
                continue
            example["source"] = spec.name
            if replaced:  # counted where the example is trained on (training.bad_records), workers included
                example["bad_records"] = {spec.name: replaced}
            self.stats["examples"][spec.name] += 1
            return example
        raise RuntimeError(
            f"data source {spec.name!r} ({spec.path}) has no usable record: "
            f"{'all' if self.tables[source] is not None else 'the next'} {tried} are bad "
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

    def _own_offsets(self) -> np.ndarray:
        """This rank's slots within a step, [micro-batch, example] (see the module docstring)."""
        size, ranks = self.micro_batch_size, self.world_size
        micro_batches = self.examples_per_step // (size * ranks)
        return np.array(
            [[(a * ranks + self.rank) * size + i for i in range(size)] for a in range(micro_batches)],
            dtype=np.int64,
        )

    def _counters_at(self, step: int, lanes: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Before `step`: each source's draws over the whole plan, and over this rank's slots per lane."""
        cached = self._counters
        if cached is None or cached[0] > step or cached[1] != lanes:
            cached = (0, lanes, np.zeros(len(self.sources), np.int64), {})
        at, _, draws, lane_draws = cached
        draws, lane_draws = draws.copy(), {lane: counts.copy() for lane, counts in lane_draws.items()}
        own = self._own_offsets()
        for k in range(at, step):
            plan = np.asarray(self.step_sources(k))
            draws += np.bincount(plan, minlength=len(self.sources))
            for a, offsets in enumerate(own):
                lane = (k * len(own) + a) % lanes
                counts = lane_draws.setdefault(lane, np.zeros(len(self.sources), np.int64))
                counts += np.bincount(plan[offsets], minlength=len(self.sources))
        self._counters = (step, lanes, draws, lane_draws)
        return draws.copy(), {lane: counts.copy() for lane, counts in lane_draws.items()}

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        shard, lanes = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        own = self._own_offsets()
        step, offset = divmod(self.position, self.examples_per_step)
        draws, lane_draws = self._counters_at(step, lanes)
        first = None  # the rank's first micro-batch from the start position: worker 0 yields it
        while True:
            plan = np.asarray(self.step_sources(step))
            # the n-th slot of a source within the step has draw number (draws before the step) + n
            occurrence = np.zeros(len(plan), np.int64)
            for source in np.unique(plan):
                occurrence[plan == source] = np.arange(int((plan == source).sum()))
            for a, offsets in enumerate(own):
                micro_batch = step * len(own) + a
                lane = micro_batch % lanes
                counts = lane_draws.setdefault(lane, np.zeros(len(self.sources), np.int64))
                pending = [int(o) for o in offsets if o >= offset]
                if pending and first is None:
                    first = micro_batch
                mine = bool(pending) and (micro_batch - first) % lanes == shard
                for o in offsets:
                    source = int(plan[o])
                    if mine and o >= offset:
                        streaming = self.tables[source] is None
                        draw = int(counts[source]) if streaming else int(draws[source] + occurrence[o])
                        example = self._example(source, draw, lane, lanes)
                        example["slot"] = step * self.examples_per_step + int(o)
                        self.position = example["slot"] + 1
                        yield example
                    counts[source] += 1
            draws += np.bincount(plan, minlength=len(self.sources))
            step, offset = step + 1, 0
            self._counters = (step, lanes, draws.copy(), {k: v.copy() for k, v in lane_draws.items()})

    def observed_shares(self) -> dict[str, int]:
        """How many examples each source has contributed so far (divide by their sum for shares)."""
        return dict(self.stats["examples"])

    def plan_counts(self, position: int) -> dict[str, int]:
        """How many slots of the plan before `position` each source fills (all ranks together)."""
        draws = np.zeros(len(self.sources), dtype=np.int64)
        full_steps, rest = divmod(position, self.examples_per_step)
        for step in range(full_steps):
            draws += np.bincount(self.step_sources(step), minlength=len(self.sources))
        if rest:
            draws += np.bincount(self.step_sources(full_steps)[:rest], minlength=len(self.sources))
        return {source.name: int(count) for source, count in zip(self.sources, draws)}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the next slot's position in the plan (all the draw numbers follow from
        it), and this process's stats."""
        return {"position": self.position, "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (or just {"position": ...}, e.g. finished steps x examples_per_step)."""
        self.position = int(state["position"])
        if "stats" in state:
            self.stats = copy.deepcopy(state["stats"])
