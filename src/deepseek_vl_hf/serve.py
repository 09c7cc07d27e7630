"""Web chat for a checkpoint folder (Gradio): images per turn, multi-turn history, streamed answers.

The turn logic (`stream_turn`) does not need Gradio; `build_app` wraps it in a `gr.Blocks` page. Gradio is the
optional `serve` extra and is imported only by `build_app`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from deepseek_vl_hf.chat import IMAGE_TOKEN, ChatSession, generation_kwargs

SERVE_EXTRA_HINT = 'the web chat needs Gradio: pip install -e ".[serve]"'


def stream_turn(
    session: ChatSession, text: str, image_paths: list[str], history: list[dict], **generate_kwargs: Any
) -> Iterator[list[dict]]:
    """Run one user turn and yield the chat display (messages) each time the streamed answer grows.

    A placeholder/image mismatch or an unreadable image ends the turn with an error message in the display;
    the session's history is then left as it was.
    """
    user = {"role": "user", "content": [*({"path": path} for path in image_paths), text]}
    answer = ""
    try:
        for piece in session.stream_reply(text, image_paths, **generate_kwargs):
            if piece:
                answer += piece
                yield [*history, user, {"role": "assistant", "content": answer}]
    except ValueError as exc:
        yield [*history, user, {"role": "assistant", "content": f"⚠️ {exc}", "metadata": {"title": "Error"}}]
        return
    if not answer:
        yield [*history, user, {"role": "assistant", "content": "(empty answer)"}]


def build_app(
    model_dir: str, device: str = "cpu", dtype: str = "auto", max_new_tokens: int = 256, quantize: str | None = None
):
    """Load `model_dir` (quantized to `quantize` when given) and return the web chat as a `gr.Blocks` (not
    launched); one model serves all sessions."""
    try:
        import gradio as gr
    except ImportError as exc:
        raise ImportError(SERVE_EXTRA_HINT) from exc
    from deepseek_vl_hf.commands.common import load_model_and_processor

    model, processor = load_model_and_processor(model_dir, device, dtype, quantize)

    def respond(message: dict, history: list[dict], session: ChatSession | None, max_tokens: float,
                temperature: float, top_p: float) -> Iterator[tuple[list[dict], ChatSession | None, Any]]:
        text, paths = message.get("text", ""), list(message.get("files", []))
        if not text.strip() and not paths:
            yield history, session, gr.skip()
            return
        session = session or ChatSession(model, processor)
        busy = gr.MultimodalTextbox(value=None, interactive=False)
        display = history
        for display in stream_turn(session, text, paths, history,
                                   **generation_kwargs(int(max_tokens), temperature, top_p)):
            yield display, session, busy
        failed = display[-1].get("metadata", {}).get("title") == "Error"
        # after an error the message stays in the box, to be fixed and sent again
        yield display, session, gr.MultimodalTextbox(value=message if failed else None, interactive=True)

    with gr.Blocks(title="DeepSeek-VL chat", analytics_enabled=False) as app:
        gr.Markdown(f"### DeepSeek-VL chat — `{model_dir}`")
        session_state = gr.State(None)
        chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chat")
        textbox = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"], show_label=False, elem_id="message",
            placeholder=f"Attach images and ask about them (type {IMAGE_TOKEN} to place an image inside the text)",
        )
        with gr.Row():
            new_chat = gr.Button("New chat", elem_id="new-chat")
        with gr.Accordion("Generation settings", open=False):
            max_tokens = gr.Slider(1, max(4096, max_new_tokens), value=max_new_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (when sampling)")
        textbox.submit(respond, [textbox, chatbot, session_state, max_tokens, temperature, top_p],
                       [chatbot, session_state, textbox])
        new_chat.click(lambda: ([], None, None), None, [chatbot, session_state, textbox])
        chatbot.clear(lambda: None, None, session_state)
    return app
