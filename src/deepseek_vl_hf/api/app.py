"""The FastAPI app: `GET /v1/models`, `POST /v1/chat/completions` (JSON or server-sent events), `GET /health`.

Requests are validated and encoded in a worker thread (the processor's CPU work stays off the event loop), then
queued to the `Engine`, whose thread streams events back through an asyncio queue. Every error is answered in
OpenAI's error shape; a client that disconnects (streaming or not) cancels its job, which frees its batch slot at
the next step.
FastAPI is the optional `api` extra: only the `api` command imports this module.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from deepseek_vl_hf.api.engine import Engine, Job
from deepseek_vl_hf.api.errors import ApiError
from deepseek_vl_hf.api.protocol import Limits, Prepared, Sampling, parse_body, prepare


def default_sampling(model) -> Sampling:
    """Settings for fields a request leaves out: the folder's generation_config (greedy unless it samples)."""
    config = model.generation_config
    if config.do_sample:
        return Sampling(max_tokens=0, temperature=config.temperature or 1.0, top_p=config.top_p or 1.0)
    return Sampling(max_tokens=0)


def build_app(model, processor, model_name: str, engine: Engine, limits: Limits, defaults: Sampling | None = None):
    """The API over a loaded model; the engine's thread runs while the app's lifespan does."""
    defaults = defaults or default_sampling(model)
    created = int(time.time())
    # one request is encoded at a time: a fast tokenizer must not be reconfigured by one thread while another
    # encodes ("Already borrowed"), and the engine's thread needs the cores more than a second encoder does
    encoding = threading.Lock()

    def encode(body) -> Prepared:
        with encoding:
            return prepare(body, processor, limits, defaults)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:  # uvicorn has already waited for in-flight responses (SIGTERM drain)
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="DeepSeek-VL OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; the routes are GET /v1/models, POST /v1/chat/completions and GET /health"
        return error_response(ApiError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, f"invalid request: {exc.errors()[0]['msg']}"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "deepseek-vl-hf"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await request.body())
        if body.model != model_name:
            raise ApiError(404, f"the model '{body.model}' does not exist here; this server serves '{model_name}' "
                           "(GET /v1/models)", param="model", code="model_not_found")
        prepared = await run_in_threadpool(encode, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: tuple) -> None:  # called on the engine's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prepared, sink)
        engine.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if prepared.stream:
            return StreamingResponse(_stream(engine, job, events, completion_id, model_name, prepared),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, finish, usage, watch = [], None, None, _DisconnectWatch(events, request)
            while finish is None:
                event = await watch.next()
                if event is None:  # the client went away: free its slot now, not after max_tokens
                    engine.cancel(job)
                    return Response(status_code=499)
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "error":
                    raise event[1]
                else:
                    finish, usage = event[1], _usage(event[2], event[3])
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage, "system_fingerprint": None,
        }

    return app


class _DisconnectWatch:
    """Reads a non-streaming job's events and notices when its client has gone: the server learns of a closed
    connection only by asking, so it asks every `poll_s`, whether events are flowing or not."""

    def __init__(self, events: asyncio.Queue, request: Request, poll_s: float = 0.25):
        self.events, self.request, self.poll_s = events, request, poll_s
        self.checked = time.monotonic()

    async def next(self) -> tuple | None:
        """The job's next event, or None once the client has disconnected."""
        getter = asyncio.ensure_future(self.events.get())
        try:
            while True:
                wait = self.checked + self.poll_s - time.monotonic()
                if wait > 0:
                    done, _ = await asyncio.wait({getter}, timeout=wait)
                    if done:
                        return getter.result()
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    return None
        finally:
            getter.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(engine: Engine, job: Job, events: asyncio.Queue, completion_id: str, model_name: str,
                  prepared: Prepared) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content chunks, a finish chunk, optionally usage, then [DONE]."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event[0] == "delta":
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                yield f"data: {json.dumps(event[1].body())}\n\n"
                break
            else:
                yield chunk({}, event[1])
                if prepared.include_usage:
                    usage = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                             "model": model_name, "choices": [], "usage": _usage(event[2], event[3])}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # also runs when the client disconnects mid-stream: the job leaves the batch
        engine.cancel(job)
