"""The OpenAI-compatible API, driven with the official `openai` client against `deepseek-vl-hf api` subprocesses
on a folder written by `deepseek-vl-hf init`: answers equal `model.generate` (greedy) alone, 32 concurrent mixed
requests, every bad input's status and error body, queue limit, disconnect, SIGTERM drain, the README examples.

Two servers start together (in parallel with the reference model's loading): "main" batches up to 8 requests;
"single" runs one at a time with a queue of 1 (for the queue-full, disconnect and SIGTERM tests, the last user).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from deepseek_vl_hf.api.app import default_sampling
from deepseek_vl_hf.api.engine import Engine, Job
from deepseek_vl_hf.api.protocol import Limits, parse_body, prepare, template_prefix
from deepseek_vl_hf.cli import main as cli_main
from deepseek_vl_hf.commands.common import load_model_and_processor
from tests.conftest import make_image

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
MODEL = "model"  # --served-model-name, as in the README examples
MAX_IMAGE_BYTES = 60_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`deepseek-vl-hf api` in a subprocess on a free loopback port."""

    def __init__(self, folder: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "deepseek_vl_hf.cli", "api", "--model", str(folder), "--port", str(self.port),
                   "--served-model-name", MODEL, *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def ready(self, timeout: float = 240) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def api_folder(tmp_path_factory) -> Path:
    """A folder from `deepseek-vl-hf init`; the vocabulary is the tokenizer's size, so every id decodes to text."""
    folder = tmp_path_factory.mktemp("api") / "tiny"
    cli_main(["init", "--preset", "tiny", "--set", "text_config.vocab_size=583", "--output", str(folder)])
    return folder


@pytest.fixture(scope="module")
def servers(api_folder, tmp_path_factory):
    logs = tmp_path_factory.mktemp("api-logs")
    started = {
        "main": Server(api_folder, logs / "main.log", "--max-batch-size", "8", "--max-image-bytes",
                       str(MAX_IMAGE_BYTES)),
        "single": Server(api_folder, logs / "single.log", "--max-batch-size", "1", "--max-queue", "1",
                         "--allow-local-files"),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def main_server(servers) -> Server:
    return servers["main"].ready()


@pytest.fixture(scope="module")
def single_server(servers) -> Server:
    return servers["single"].ready()


@pytest.fixture(scope="module")
def reference(api_folder, servers):
    """The folder loaded in this process as the server loads it (Auto classes, remote code)."""
    return load_model_and_processor(str(api_folder))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def to_openai(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """Template messages ({"type": "image"} parts) -> OpenAI messages with the images as data URLs, in order."""
    remaining = iter(images)
    out = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": data_url(png(next(remaining)))}})
            else:
                parts.append(part)
        text_only = all(p["type"] == "text" for p in parts) and len(parts) == 1
        out.append({"role": message["role"], "content": parts[0]["text"] if text_only else parts})
    return out


def greedy(reference, messages: list[dict], images: list[Image.Image], max_tokens: int) -> tuple[str, int, int]:
    """`model.generate` (greedy) alone: (answer text without the template's leading space, new tokens, prompt)."""
    model, processor = reference
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True).lstrip(), len(new), inputs["input_ids"].shape[1]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "five", "red", "boxes"]


def case(index: int) -> tuple[list[dict], list[Image.Image], int]:
    """Mixed requests: 0-2 images (placed before, between or after text), 1 or 3 turns, lengths, max_tokens."""
    images = [make_image(48 + 16 * ((index + k) % 4), 40 + 12 * k, seed=index * 3 + k) for k in range(index % 3)]
    question = " ".join(WORDS[: 2 + (index * 5) % len(WORDS)])
    if len(images) == 2 and index % 2:
        first = [IMAGE, text(question), IMAGE]
    else:
        first = [*([IMAGE] * len(images)), text(question)]
    messages = [{"role": "user", "content": first}]
    if index % 4 == 3:  # multi-turn, with a system prompt
        messages = [{"role": "system", "content": [text("Answer briefly.")]}, *messages,
                    {"role": "assistant", "content": [text("fox and dog")]},
                    {"role": "user", "content": [text("and then?")]}]
    return messages, images, 3 + (index * 7) % 17


def test_models_and_health(main_server):
    assert [m.id for m in main_server.client().models.list().data] == [MODEL]
    assert main_server.health()["status"] == "ok"


def test_answer_and_stream_equal_generate(main_server, reference):
    messages = [{"role": "system", "content": [text("You describe pictures.")]},
                {"role": "user", "content": [IMAGE, text("Compare"), IMAGE, text("these two.")]},
                {"role": "assistant", "content": [text("Two images.")]},
                {"role": "user", "content": [text("And the colours?")]}]
    images = [make_image(64, 48, 11), make_image(40, 72, 12)]
    expected, new_tokens, prompt_tokens = greedy(reference, messages, images, 40)
    assert expected.strip()
    client = main_server.client()
    reply = client.chat.completions.create(model=MODEL, messages=to_openai(messages, images), max_tokens=40,
                                           temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == ("length" if new_tokens == 40 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, new_tokens)
    assert reply.usage.total_tokens == prompt_tokens + new_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=to_openai(messages, images), max_tokens=40,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == new_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    # the raw stream: server-sent events in OpenAI's chunk format, ending with [DONE]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{main_server.url}/v1/chat/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_seed_and_max_tokens(main_server, reference):
    messages, images, _ = case(4)
    expected, _, _ = greedy(reference, messages, images, 30)
    client = main_server.client()
    stop = expected[len(expected) // 2: len(expected) // 2 + 3]
    assert stop.strip("\ufffd") == stop and len(stop) == 3
    reply = client.chat.completions.create(model=MODEL, messages=to_openai(messages, images), max_tokens=30,
                                           temperature=0, stop=[stop, "never appears"])
    assert reply.choices[0].message.content == expected[: expected.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=to_openai(messages, images), max_tokens=30,
                                              temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected[: expected.index(stop)]

    short = client.chat.completions.create(model=MODEL, messages=to_openai(messages, images), max_tokens=3,
                                           temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    sampled = [client.chat.completions.create(model=MODEL, messages=to_openai(messages, images), max_tokens=20,
                                              temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert expected not in sampled


def test_32_concurrent_mixed_requests_answer_as_alone(main_server, reference):
    cases = [case(i) for i in range(32)]
    expected = [greedy(reference, m, imgs, n) for m, imgs, n in cases]
    assert sum(1 for e in expected if e[0].strip()) >= 28  # answers with visible text make the check meaningful
    client = openai.AsyncOpenAI(base_url=f"{main_server.url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def ask(index: int):
        messages, images, max_tokens = cases[index]
        kwargs = dict(model=MODEL, messages=to_openai(messages, images), max_tokens=max_tokens, temperature=0)
        if index % 2:  # half of them streamed
            stream = await client.chat.completions.create(**kwargs, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream]), None
        reply = await client.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.usage

    async def everything():
        try:
            return await asyncio.gather(*(ask(i) for i in range(32)))
        finally:
            await client.close()

    answers = asyncio.run(everything())
    for index, ((answer, usage), (want, new_tokens, prompt_tokens)) in enumerate(zip(answers, expected)):
        assert answer == want, f"request {index}"
        if usage is not None:
            assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, new_tokens), f"request {index}"
    health = main_server.health()
    assert (health["running"], health["queued"], health["cancelled"]) == (0, 0, 0)
    assert 2 <= health["largest_batch"] <= 8  # answered in left-padded batches, as alone


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
BIG = png(Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)))  # noise: over MAX_IMAGE_BYTES as PNG
CORRUPT = png(make_image(64, 64, 1))[:200]
BAD_REQUESTS = [
    # (name, body (bytes: sent as is), status, text in the error message)
    ("bad JSON", b'{"model": "model", "messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("unknown field", {**GOOD, "logprobs": True}, 400, "unknown field 'logprobs'"),
    ("n=2", {**GOOD, "n": 2}, 400, "n must be 1"),
    ("no messages", {"model": MODEL}, 400, "'messages'"),
    ("empty messages", {**GOOD, "messages": []}, 400, "'messages'"),
    ("unknown role", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("unknown part type", {**GOOD, "messages": [user({"type": "audio", "audio": "x"})]}, 400, "messages.0.content"),
    ("temperature over 2", {**GOOD, "temperature": 3}, 400, "'temperature'"),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, 404, "'gpt-4o' does not exist"),
    ("http image URL", {**GOOD, "messages": [user(image_part("https://example.com/cat.png"), text("?"))]}, 400,
     "http(s) image URLs are not fetched"),
    ("local path without the flag", {**GOOD, "messages": [user(image_part("/etc/hostname"), text("?"))]}, 400,
     "--allow-local-files"),
    ("invalid base64", {**GOOD, "messages": [user(image_part("data:image/png;base64,@@@"), text("?"))]}, 400,
     "not valid base64"),
    ("not an image", {**GOOD, "messages": [user(image_part(data_url(b"just some text")), text("?"))]}, 400,
     "not an image"),
    ("corrupt image", {**GOOD, "messages": [user(image_part(data_url(CORRUPT)), text("?"))]}, 400, "image 0"),
    ("image too large", {**GOOD, "messages": [user(image_part(data_url(BIG)), text("?"))]}, 400,
     f"over this server's limit of {MAX_IMAGE_BYTES} bytes"),
    ("placeholder without an image", {**GOOD, "messages": [user(text("look: <image_placeholder>"))]}, 400,
     "has 1 <image_placeholder> placeholder(s)"),
    ("image in an assistant message", {**GOOD, "messages": [
        user(text("hi")), {"role": "assistant", "content": [image_part(data_url(png(make_image(8, 8))))]},
        user(text("?"))]}, 400, "images go in user messages only"),
    ("prompt over the context length", {**GOOD, "messages": [user(text("fox " * 1100))]}, 400,
     "context length of 1024 tokens"),
    ("max_tokens over the limit", {**GOOD, "max_tokens": 5000}, 400, "max_tokens=5000 is over the limit"),
    ("stop with 5 strings", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
]


def _engine_answers(reference, prefix_ids: list[int], indices: range) -> tuple[list[tuple], Engine]:
    """`case(i)` requests submitted together to an in-process engine: each job's events, in order."""
    model, processor = reference
    limits = Limits(context_length=model.config.text_config.max_position_embeddings, max_image_bytes=10**7,
                    allow_local_files=False)
    engine = Engine(model, processor.tokenizer, max_batch_size=8, batch_wait_s=0.5, prefix_ids=prefix_ids)
    events: list[list[tuple]] = []
    finished = threading.Semaphore(0)
    for index in indices:
        messages, images, max_tokens = case(index)
        body = {"model": MODEL, "messages": to_openai(messages, images), "max_tokens": max_tokens, "temperature": 0}
        prepared = prepare(parse_body(json.dumps(body).encode()), processor, limits, default_sampling(model))
        log: list[tuple] = []
        events.append(log)
        engine.submit(Job(prepared, lambda e, log=log: (log.append(e), e[0] != "delta" and finished.release())))
    engine.start()
    for _ in indices:
        assert finished.acquire(timeout=120)
    engine.stop()
    return [tuple(log) for log in events], engine


def test_prefix_cache_gives_the_answers_of_a_full_prefill(reference):
    """Prompts that start with the template's system prompt prefill only what follows it (the prefix's cache
    computed once, shifted per row): same answers as prefilling whole prompts, also for a short prefix that a
    row's left padding outgrows."""
    model, processor = reference
    prefix = template_prefix(processor)
    assert processor.tokenizer.decode(prefix).endswith("User:") and len(prefix) > 30
    single_turn = range(0, 12, 4)  # 0-2 images, one user turn: prompts of different lengths, all with the prefix
    plain, _ = _engine_answers(reference, [], single_turn)
    cached, engine = _engine_answers(reference, prefix, single_turn)
    short, short_engine = _engine_answers(reference, prefix[:3], single_turn)
    assert engine._prefix_kv is not None and short_engine._prefix_kv is not None  # the prefix path ran
    assert cached == plain and short == plain
    assert all(log[-1][0] == "done" for log in plain)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(main_server):
    url = f"{main_server.url}/v1/chat/completions"
    for name, body, status, message in BAD_REQUESTS:
        response = (httpx.post(url, content=body, timeout=30) if isinstance(body, bytes)
                    else httpx.post(url, json=body, timeout=30))
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert message in error["message"], (name, error)
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), name
    assert httpx.get(f"{main_server.url}/v1/nothing-here", timeout=10).status_code == 404
    assert httpx.get(url, timeout=10).json()["error"]["message"].startswith("GET /v1/chat/completions")
    client = main_server.client()
    with pytest.raises(openai.BadRequestError, match="max_tokens=5000"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert reply.usage.completion_tokens == 2 and main_server.health()["status"] == "ok"


def test_local_files_only_with_the_flag(single_server, reference, tmp_path):
    image = make_image(56, 40, 21)
    path = tmp_path / "photo.png"
    image.save(path)
    messages = [{"role": "user", "content": [IMAGE, text("what is this?")]}]
    expected, _, _ = greedy(reference, messages, [image], 12)
    for url in (str(path), path.as_uri()):
        reply = single_server.client().chat.completions.create(
            model=MODEL, messages=[user(image_part(url), text("what is this?"))], max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == expected
    missing = httpx.post(f"{single_server.url}/v1/chat/completions", timeout=30, json={
        **GOOD, "messages": [user(image_part(str(tmp_path / "missing.png")), text("?"))]})
    assert missing.status_code == 400 and "no such file" in missing.json()["error"]["message"]


def test_full_queue_503_and_a_disconnect_frees_the_slot(single_server):
    """One at a time, queue of 1: a long stream runs, one request waits, the next is refused; closing the stream
    cancels it and the waiting request runs."""
    before = single_server.health()
    long = {"model": MODEL, "messages": [{"role": "user", "content": "tell a very long story"}], "max_tokens": 900,
            "temperature": 0, "stream": True}
    waiting: dict = {}

    def send_waiting() -> None:
        waiting["reply"] = single_server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "short"}], max_tokens=2)

    with httpx.Client(timeout=60) as http, http.stream("POST", f"{single_server.url}/v1/chat/completions",
                                                       json=long) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 30
        while single_server.health()["running"] < 1:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.02)
        thread = threading.Thread(target=send_waiting)
        thread.start()
        deadline = time.monotonic() + 30
        while single_server.health()["queued"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        full = httpx.post(f"{single_server.url}/v1/chat/completions", json=GOOD, timeout=30)
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "queue_full" and "--max-queue 1" in full.json()["error"]["message"]
        # leaving the block closes the connection mid-stream
    thread.join(60)
    assert waiting["reply"].usage.completion_tokens == 2
    health = single_server.health()
    assert health["cancelled"] == before["cancelled"] + 1
    assert health["finished"] == before["finished"] + 1  # only the waiting request finished
    assert (health["running"], health["queued"]) == (0, 0)


def test_a_non_streaming_client_that_disconnects_frees_its_slot(single_server):
    """A plain (non-streaming) request whose client gives up: the server notices the closed connection and
    cancels the job instead of generating its 900 tokens."""
    before = single_server.health()
    long = {"model": MODEL, "messages": [{"role": "user", "content": "tell a very long story"}], "max_tokens": 900,
            "temperature": 0}
    with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{single_server.url}/v1/chat/completions", json=long)  # closes the connection on timeout
    deadline = time.monotonic() + 30
    while single_server.health()["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"the abandoned request was not cancelled: {single_server.health()}"
        time.sleep(0.05)
    health = single_server.health()
    assert health["finished"] == before["finished"]  # cancelled, not answered to nobody
    assert (health["running"], health["queued"]) == (0, 0)


def test_sigterm_drains_requests_in_flight(single_server, reference):
    """Last user of the single server: SIGTERM while an answer is being generated; it completes, then exit 0."""
    messages, images, _ = case(7)
    expected, new_tokens, _ = greedy(reference, messages, images, 120)
    result: dict = {}

    def ask() -> None:
        result["reply"] = single_server.client().chat.completions.create(
            model=MODEL, messages=to_openai(messages, images), max_tokens=120, temperature=0)

    thread = threading.Thread(target=ask)
    thread.start()
    deadline = time.monotonic() + 30
    while single_server.health()["running"] < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    single_server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result["reply"].choices[0].message.content == expected
    assert result["reply"].usage.completion_tokens == new_tokens
    assert single_server.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        single_server.health()


def readme_block(language: str) -> str:
    section = (REPO / "README.md").read_text().split("## Serve an OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_readme_examples_run_against_a_live_server(main_server, reference, tmp_path):
    """The README's curl and openai-client blocks, as written except for the port."""
    image = make_image(80, 60, 31)
    image.save(tmp_path / "photo.png")
    expected, _, _ = greedy(reference, [{"role": "user", "content": [IMAGE, text("What is in this picture?")]}],
                            [image], 32)
    block = readme_block("python").replace("127.0.0.1:8000", f"127.0.0.1:{main_server.port}")
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.decode() == expected + "\n"

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    curl = readme_block("bash").replace("127.0.0.1:8000", f"127.0.0.1:{main_server.port}")
    result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
    want, _, _ = greedy(reference, [{"role": "user", "content": [text("Describe a sunny beach.")]}], [], 32)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["choices"][0]["message"]["content"] == want


def test_api_without_its_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` raise ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[api\]"'):
        cli_main(["api", "--model", str(tmp_path)])
