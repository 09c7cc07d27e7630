"""The generation loop behind the API: one thread, iteration-level batching over a shared key/value cache.

Why our own loop rather than `generate`: requests differ in length, settings and arrival time. Here every
decode step runs all active requests together; a request that finishes (EOS, `max_tokens`, a stop string, a
client that went away) leaves the batch at once, and requests that arrive while others decode are prefilled as
a group and join at the next step (their cache rows are left-padded to the batch's length). Padded cache slots
are masked and positions count real tokens only, so each row computes what it would compute alone; greedy
answers equal `model.generate`'s (tests/test_api.py checks 32 mixed concurrent requests).

Prefix cache: every prompt starts with the chat template's system prompt (`prefix_ids`, 41 tokens with our
template, most of a one-line question's prompt). Its keys and values are computed once; a group whose prompts all
start with it prefills only what follows (a row's cached columns are the prefix's, shifted right by the row's
left padding).

transformers' continuous batching (`generate_batch`, paged attention) takes token ids only, with no way to pass
each request's `pixel_values`, so it cannot serve image prompts for this model.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, TopPLogitsWarper

from deepseek_vl_hf.api.errors import ApiError
from deepseek_vl_hf.api.protocol import Prepared

Event = tuple  # ("delta", text) | ("done", finish_reason, prompt_tokens, completion_tokens) | ("error", ApiError)


class Job:
    """One request inside the engine: its inputs, its progress, and where its events go (`sink`)."""

    def __init__(self, prepared: Prepared, sink: Callable[[Event], None]):
        self.prepared = prepared
        self.sink = sink
        self.cancelled = False
        self.tokens: list[int] = []
        self.sent = ""  # text already delivered
        self.pad = 0  # left-padding slots of this row in the shared cache
        seed = prepared.sampling.seed
        self.seed = seed if seed is not None else random.getrandbits(63)
        self.generator: torch.Generator | None = None  # made on first use, on the logits' device

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.input_ids)


class Engine:
    """Runs jobs in batches of up to `max_batch_size` on a worker thread; at most `max_queue` jobs wait."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005,
                 prefix_ids: Sequence[int] = ()):
        self.model = model
        self.prefix_ids = list(prefix_ids)
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, [1, heads, P, dim]
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._cache: DynamicCache | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._finished = 0
        self._cancelled = 0
        self._largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="deepseek-vl-hf-generation", daemon=True)

    # -- called from the server -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already submitted, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 503 when `max_queue` jobs already wait."""
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down; retry on another instance", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {len(self._pending)} requests are already waiting "
                               f"(--max-queue {self.max_queue}); retry later", code="queue_full")
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): it leaves the queue or the batch at the next step."""
        job.cancelled = True
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Jobs in the batch and waiting now; jobs finished and cancelled (client gone) and the largest batch
        decoded so far."""
        return {"running": len(self._active), "queued": len(self._pending), "finished": self._finished,
                "cancelled": self._cancelled, "largest_batch": self._largest_batch}

    # -- the worker thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._active:
                    return
                if not self._active:  # idle: give requests sent together a few ms to form one batch
                    deadline = time.monotonic() + self.batch_wait_s
                    while len(self._pending) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                new = []
                while self._pending and len(self._active) + len(new) < self.max_batch_size:
                    job = self._pending.popleft()
                    if job.cancelled:
                        self._cancelled += 1
                    else:
                        new.append(job)
            batch = self._active + new
            try:
                with torch.inference_mode():
                    if new:
                        self._prefill(new)
                    if self._active:
                        self._decode()
            except Exception as exc:  # a failed step fails its batch; the server keeps serving
                error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}")
                for job in batch:
                    job.sink(("error", error))
                self._active, self._cache = [], None

    def _prefill(self, jobs: list[Job]) -> None:
        """Run the new jobs' prompts as one left-padded batch and add their cache rows to the shared cache."""
        device = self.model.device
        prefix = len(self.prefix_ids)
        if not all(job.prompt_tokens > prefix and job.prepared.input_ids[:prefix] == self.prefix_ids for job in jobs):
            prefix = 0
        width = prefix + max(job.prompt_tokens - prefix for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            job.pad = width - job.prompt_tokens
            ids[row, job.pad:] = torch.tensor(job.prepared.input_ids)
            mask[row, job.pad:] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        pixels = [job.prepared.pixel_values for job in jobs if job.prepared.pixel_values is not None]
        # the first `prefix` columns come from the prefix cache; only the columns after them are computed
        cache = self._prefix_cache([job.pad for job in jobs]) if prefix else DynamicCache()
        out = self.model(
            input_ids=ids[:, prefix:].to(device), attention_mask=mask.to(device),
            position_ids=positions[:, prefix:].to(device),
            pixel_values=torch.cat(pixels).to(device) if pixels else None,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        self._join(cache, jobs)
        self._advance(jobs, out.logits[:, -1, :])

    def _prefix_cache(self, pads: list[int]) -> DynamicCache:
        """A cache of `len(pads)` rows holding the prefix's keys and values, row r shifted right by `pads[r]`
        (its left padding): the columns a left-padded row of the whole prompt has at the prefix's place."""
        if self._prefix_kv is None:
            cache = DynamicCache()
            self.model(input_ids=torch.tensor([self.prefix_ids], device=self.model.device), past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
            self._prefix_kv = _layers(cache)
        width = len(self.prefix_ids)
        layers = [
            tuple(torch.cat([F.pad(t[:, :, : max(width - pad, 0)], (0, 0, min(pad, width), 0)) for pad in pads])
                  for t in layer)
            for layer in self._prefix_kv
        ]
        return DynamicCache(layers)

    def _decode(self) -> None:
        """One decode step of every active job."""
        self._largest_batch = max(self._largest_batch, len(self._active))
        device = self.model.device
        length = self._cache.get_seq_length()
        ids = torch.tensor([[job.tokens[-1]] for job in self._active])
        mask = torch.ones((len(self._active), length + 1), dtype=torch.long)
        for row, job in enumerate(self._active):
            mask[row, : job.pad] = 0
        positions = torch.tensor([[length - job.pad] for job in self._active])
        out = self.model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            past_key_values=self._cache, use_cache=True,
        )
        self._advance(list(self._active), out.logits[:, -1, :])

    def _join(self, cache: DynamicCache, jobs: list[Job]) -> None:
        """Append a prefilled group's cache rows, left-padding whichever side is shorter."""
        if self._cache is None or not self._active:
            self._cache, self._active = cache, list(jobs)
            return
        old, new = self._cache.get_seq_length(), cache.get_seq_length()
        width = max(old, new)
        for job in self._active:
            job.pad += width - old
        for job in jobs:
            job.pad += width - new
        layers = [
            tuple(torch.cat([F.pad(a, (0, 0, width - old, 0)), F.pad(b, (0, 0, width - new, 0))])
                  for a, b in zip(mine, theirs))
            for mine, theirs in zip(_layers(self._cache), _layers(cache))
        ]
        self._cache = DynamicCache(layers)
        self._active += jobs

    def _advance(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Pick each job's next token, deliver its new text, and drop the jobs that are done."""
        logits = logits.float()
        done: set[int] = set()
        for row, job in enumerate(jobs):
            if job.cancelled:
                self._cancelled += 1
                done.add(id(job))
                continue
            token = self._choose(job, logits[row])
            job.tokens.append(token)
            if self._deliver(job, token):
                done.add(id(job))
        if done:
            self._remove(done)

    def _choose(self, job: Job, scores: torch.Tensor) -> int:
        sampling = job.prepared.sampling
        if sampling.temperature == 0:
            return int(torch.argmax(scores))
        scores = scores[None] / sampling.temperature
        if sampling.top_p < 1:
            scores = TopPLogitsWarper(sampling.top_p)(None, scores)
        if job.generator is None:
            job.generator = torch.Generator(scores.device).manual_seed(job.seed)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=job.generator))

    def _deliver(self, job: Job, token: int) -> bool:
        """Send the job's new text; returns whether the job is finished (and then sends its "done")."""
        sampling = job.prepared.sampling
        finish = "stop" if token in self.eos_ids else "length" if len(job.tokens) >= sampling.max_tokens else None
        answer = [t for t in job.tokens if t not in self.eos_ids]
        # the answer follows "Assistant:" after a space, which is the template's, not the answer's
        text = self.tokenizer.decode(answer, skip_special_tokens=True).lstrip()
        hits = [text.find(stop) for stop in sampling.stop if stop in text]
        if hits:
            text, finish = text[: min(hits)], "stop"
        if finish is None:
            text = text.rstrip("\ufffd")  # maybe an incomplete UTF-8 character: wait for its other bytes
            if sampling.stop:  # hold back what could be the start of a stop string
                text = text[: max(len(job.sent), len(text) - max(map(len, sampling.stop)) + 1)]
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.sink(("delta", text[len(job.sent):]))
            job.sent = text
        if finish is not None:
            self._finished += 1
            job.sink(("done", finish, job.prompt_tokens, len(job.tokens)))
        return finish is not None

    def _remove(self, done: set[int]) -> None:
        """Take finished jobs out of the batch and their rows out of the cache; trim padding all rows share."""
        keep = [row for row, job in enumerate(self._active) if id(job) not in done]
        self._active = [self._active[row] for row in keep]
        if not self._active:
            self._cache = None
            return
        trim = min(job.pad for job in self._active)
        for job in self._active:
            job.pad -= trim
        index = torch.tensor(keep)
        self._cache = DynamicCache(
            [tuple(t[index.to(t.device), :, trim:] for t in layer) for layer in _layers(self._cache)]
        )


def _layers(cache: DynamicCache) -> list[tuple[Any, Any]]:
    """A cache's (keys, values) per layer, each [batch, heads, length, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]
