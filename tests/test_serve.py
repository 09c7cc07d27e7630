"""The web chat: the turn function (streamed, greedy-exact, multi-turn, errors as messages), the `serve`
command, and a browser test (Debian's chromium driven by Playwright) against a served tiny model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepseek_vl_hf.chat import ChatSession, generation_kwargs
from deepseek_vl_hf.commands.common import load_model_and_processor
from deepseek_vl_hf.serve import SERVE_EXTRA_HINT, stream_turn

QUESTION = "What is in the image?"
FOLLOW_UP = "And what colour is it?"
MAX_NEW_TOKENS = 48
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    """The tiny folder loaded as the server loads it (Auto classes, remote code)."""
    return load_model_and_processor(str(tiny_dir))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> str:
    """A red PNG: with it, the tiny random model's greedy answer has word breaks, so the streamer flushes
    mid-answer (TextIteratorStreamer holds text back until a space)."""
    path = tmp_path_factory.mktemp("images") / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return str(path)


def greedy_answer(model, processor, messages: list[dict], images: list[str], max_new_tokens: int) -> str:
    """Plain `generate` (greedy) on the chat template's prompt, decoded without special tokens."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def user_turn(text: str, images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def final_answer(displays: list[list[dict]]) -> str:
    return displays[-1][-1]["content"]


def test_turns_stream_greedy_answers_with_history(loaded, image_file):
    model, processor = loaded
    session = ChatSession(model, processor)
    gen = generation_kwargs(MAX_NEW_TOKENS)

    first = list(stream_turn(session, QUESTION, [image_file], [], **gen))
    answers = [display[-1]["content"] for display in first]
    assert len(answers) > 1, "the answer should arrive in several pieces"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(answers, answers[1:])), "each yield grows"
    expected = greedy_answer(model, processor, [user_turn(QUESTION, 1)], [image_file], MAX_NEW_TOKENS)
    assert final_answer(first).strip() == expected.strip() != ""
    shown = first[-1]
    assert [m["role"] for m in shown] == ["user", "assistant"]
    assert shown[0]["content"] == [{"path": image_file}, QUESTION]

    second = list(stream_turn(session, FOLLOW_UP, [], shown, **gen))
    assert [m["role"] for m in second[-1]] == ["user", "assistant"] * 2 and second[-1][:2] == shown
    history = [user_turn(QUESTION, 1), {"role": "assistant", "content": [{"type": "text", "text": expected.strip()}]},
               user_turn(FOLLOW_UP, 0)]
    assert final_answer(second).strip() == greedy_answer(model, processor, history, [image_file], MAX_NEW_TOKENS).strip()
    assert QUESTION in session.prompt() and expected.strip() in session.prompt()


@pytest.mark.parametrize(
    ("text", "content", "needle"),
    [
        (QUESTION, b"this is not a PNG", "bad.png): it is not an image PIL can read"),
        ("<image_placeholder> vs <image_placeholder>?", None, "has 2 <image_placeholder> but 1 image(s)"),
    ],
)
def test_bad_input_ends_the_turn_with_an_error_message(loaded, image_file, tmp_path, text, content, needle):
    model, processor = loaded
    session = ChatSession(model, processor)
    list(stream_turn(session, QUESTION, [image_file], [], **generation_kwargs(4)))
    before = list(session.messages), list(session.images)
    path = image_file
    if content is not None:
        path = str(tmp_path / "bad.png")
        Path(path).write_bytes(content)

    (display,) = list(stream_turn(session, text, [path], [], **generation_kwargs(4)))
    assert display[-1]["role"] == "assistant" and display[-1]["metadata"] == {"title": "Error"}
    assert needle in display[-1]["content"] and "Traceback" not in display[-1]["content"]
    assert (session.messages, session.images) == before, "a failed turn leaves the conversation unchanged"


def test_serve_without_gradio_names_the_extra(tiny_dir, monkeypatch):
    from deepseek_vl_hf.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[serve\]"'):
        main(["serve", "--model", str(tiny_dir)])
    assert 'pip install -e ".[serve]"' in SERVE_EXTRA_HINT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tiny_dir, tmp_path):
    """`deepseek-vl-hf serve` in a subprocess on a free local port; yields its URL, killed afterwards."""
    pytest.importorskip("gradio", reason='the web chat needs Gradio: pip install -e ".[serve]"')
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    command = [sys.executable, "-m", "deepseek_vl_hf.cli", "serve", "--model", str(tiny_dir), "--port", str(port),
               "--max-new-tokens", "300"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within 60 s:\n{log.read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Records every distinct text of the newest assistant message as the page renders it.
RECORD_ANSWERS = """() => {
  window.seenAnswers = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && window.seenAnswers[window.seenAnswers.length - 1] !== text) window.seenAnswers.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
def browser_tools():
    """(chromium executable, playwright.sync_api); skips, saying what to install, when either is missing."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python Playwright is not installed: pip install playwright")
    return chromium, sync_api


def test_browser_uploads_asks_and_sees_a_streamed_answer(browser_tools, server, loaded, image_file):
    chromium, sync_api = browser_tools
    model, processor = loaded
    expected = greedy_answer(model, processor, [user_turn(QUESTION, 1)], [image_file], 300).strip()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server)
            page.locator("#message input[type=file]").set_input_files(image_file)
            page.locator("#message img").wait_for(timeout=15_000)  # the upload's thumbnail
            page.locator("#message textarea").fill(QUESTION)
            page.evaluate(RECORD_ANSWERS)
            page.locator("#message textarea").press("Enter")
            page.wait_for_function(
                "expected => (window.seenAnswers.at(-1) || '').replace(/\\s+/g, '') === expected",
                arg="".join(expected.split()), timeout=30_000,
            )
            seen = page.evaluate("window.seenAnswers")
            page.locator("#chat [data-testid='user'] img").wait_for()  # the uploaded image shows in the chat
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
        finally:
            browser.close()
    assert len(seen) >= 2, f"the answer should grow on the page, saw only {seen}"
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:])), "each rendered state is longer than the last"
