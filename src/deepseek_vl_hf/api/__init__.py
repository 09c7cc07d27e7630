"""An OpenAI-compatible HTTP API (`deepseek-vl-hf api`): chat completions with images, batched generation.

Modules: `errors` (the OpenAI error shape), `protocol` (request validation, messages -> prompt and images),
`engine` (the batching generation loop, off the event loop), `app` (the FastAPI routes and SSE streaming).
FastAPI and uvicorn are the optional `api` extra, imported only by `app` and the command.
"""

API_EXTRA_HINT = 'the API server needs FastAPI and uvicorn: pip install -e ".[api]"'
