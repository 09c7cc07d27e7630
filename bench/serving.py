"""Serving throughput: `deepseek-vl-hf api` with batching (`--max-batch-size 16`) against the same server code
answering one request at a time (`--max-batch-size 1`), same model folder, same requests, same run.

Closed-loop clients (each sends its next request when its answer arrives) at 1, 4, 8 and 16 concurrent
clients; half the requests carry an image. Reported: aggregate output tokens/s (completion tokens over the
wall time of one round of the load; median of the rounds), p50 / p95 request latency (all rounds), and output
tokens per CPU-second of the server process, which a busy machine disturbs much less than wall time. The two
servers run side by side (the idle one sleeps) and the rounds alternate between them. Correctness: both
servers give every request the same greedy answer and token count, in every round.

`run(mode)` returns the rows (the `python -m bench` section contract); `python -m bench.serving [--mode MODE]`
prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import THREADS, Row, Target, format_table, setup

TITLE = "OpenAI-compatible API (CPU): batched serving vs one request at a time"
LABELS = ("batched", "one at a time")
TARGETS = (
    Target("8 clients: batched >= 3x the one-at-a-time output tokens/s", "8 clients: output tokens/s", 1 / 3),
)
# Tiny towers with a small LLM (4 x 512 Llama, the "small-llm" shape of bench/fixtures.py) whose vocabulary is
# the tokenizer's, so every generated id decodes to text and the answers compare as text.
MODEL = ("tiny", {
    "sam_config.downsample_channels": [64, 128], "text_config.hidden_size": 512,
    "text_config.intermediate_size": 1408, "text_config.num_hidden_layers": 4, "text_config.num_attention_heads": 8,
    "text_config.num_key_value_heads": 4, "text_config.vocab_size": 583,
})
# mode -> (concurrency levels, requests per client per round, rounds per server, max_tokens)
SIZES: dict[str, tuple[tuple[int, ...], int, int, int]] = {
    "full": ((1, 4, 8, 16), 2, 3, 32),
    "quick": ((1, 4, 8, 16), 1, 2, 24),
    "smoke": ((1, 4), 1, 1, 4),
}
WORDS = ["describe", "the", "picture", "in", "a", "few", "words", "and", "name", "every", "colour", "you", "see"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """`deepseek-vl-hf api` on a free loopback port, with its process CPU time readable from /proc."""

    def __init__(self, folder: Path, max_batch_size: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_vl_hf.cli", "api", "--model", str(folder), "--port", str(self.port),
             "--served-model-name", "bench", "--max-batch-size", str(max_batch_size), "--max-queue", "256"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _requests(count: int, max_tokens: int) -> list[dict[str, Any]]:
    """Request bodies: prompt lengths vary, every other one carries a photo-like image."""
    import numpy as np
    from PIL import Image

    bodies = []
    for index in range(count):
        question = " ".join(WORDS[: 3 + (index * 5) % (len(WORDS) - 3)])
        content: Any = question
        if index % 2:
            rng = np.random.default_rng(index)
            pixels = rng.integers(0, 256, (48 + 8 * (index % 4), 64, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buffer, "PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        bodies.append({"model": "bench", "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0})
    return bodies


def _load(server: _Server, clients: int, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """`clients` closed-loop clients share `bodies` (client c sends c, c + clients, ...): tokens, wall, latencies."""
    import httpx

    answers: dict[int, tuple[str, int]] = {}
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient, first: int) -> None:
        for index in range(first, len(bodies), clients):
            start = time.perf_counter()
            response = await http.post(f"{server.url}/v1/chat/completions", json=bodies[index])
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            reply = response.json()
            answers[index] = (reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"])

    async def everything() -> None:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
            await asyncio.gather(*(client(http, c) for c in range(clients)))

    cpu, wall = server.cpu_seconds(), time.perf_counter()
    asyncio.run(everything())
    wall = time.perf_counter() - wall
    return {"wall": wall, "cpu": server.cpu_seconds() - cpu, "latencies": latencies, "answers": answers,
            "tokens": sum(tokens for _, tokens in answers.values())}


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(mode: str) -> list[Row]:
    """Rows per concurrency level: output tokens/s, p50 and p95 latency, batched vs one at a time."""
    from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint

    levels, per_client, rounds, max_tokens = SIZES[mode]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_random_model(*MODEL, seed=0)
        folder = save_checkpoint(model, processor, Path(tmp) / "model")
        del model
        servers = {"batched": _Server(folder, 16), "one at a time": _Server(folder, 1)}
        try:
            for server in servers.values():
                server.wait_ready()
            warmup = _requests(2, 2)
            for server in servers.values():
                _load(server, 1, warmup)
            for level_index, clients in enumerate(levels):
                bodies = _requests(clients * per_client, max_tokens)
                results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
                for round_index in range(rounds):
                    order = list(servers) if (level_index + round_index) % 2 == 0 else list(reversed(servers))
                    for name in order:
                        results[name].append(_load(servers[name], clients, bodies))
                rows += _rows(clients, results["batched"], results["one at a time"])
        finally:
            for server in servers.values():
                server.stop()
    return rows


def _rows(clients: int, batched: list[dict[str, Any]], single: list[dict[str, Any]]) -> list[Row]:
    """A level's rows from its rounds on each server."""
    same = all(run["answers"] == single[0]["answers"] for run in batched + single)
    runs = batched + single
    cpu_wall = sum(run["cpu"] for run in runs) / sum(run["wall"] for run in runs)
    speed = [statistics.median(run["tokens"] / run["wall"] for run in side) for side in (batched, single)]
    per_cpu = [sum(run["tokens"] for run in side) / max(sum(run["cpu"] for run in side), 1e-9)
               for side in (batched, single)]
    note = (f"{len(batched)} x {len(batched[0]['answers'])} requests of {batched[0]['tokens']} output tokens; "
            f"batched {speed[0] / speed[1]:.2f}x; same answers: {'yes' if same else 'NO'}")
    rows = [Row(f"{clients} clients: output tokens/s", "tokens/s", speed[0], speed[1], cpu_wall,
                higher_is_better=True, note=note, correct=same),
            Row(f"{clients} clients: output tokens per server CPU-second", "tokens/cpu-s", per_cpu[0], per_cpu[1],
                cpu_wall, higher_is_better=True, note=f"batched {per_cpu[0] / per_cpu[1]:.2f}x", correct=same)]
    for q in (50, 95):
        latencies = [[t for run in side for t in run["latencies"]] for side in (batched, single)]
        rows.append(Row(f"{clients} clients: p{q} latency", "ms", _percentile(latencies[0], q) * 1000,
                        _percentile(latencies[1], q) * 1000, cpu_wall, correct=same))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=list(SIZES), default="full")
    args = parser.parse_args(argv)
    setup(THREADS)
    rows = run(args.mode)
    print(format_table(TITLE, rows, LABELS))
    for target in TARGETS:
        print(target.judge(rows))


if __name__ == "__main__":
    main()
