"""`palm serve`: an OpenAI-compatible HTTP server (completions, chat completions, models) over a Generator.

The model is not thread-safe, so every generation runs on ONE worker thread (`worker`), which
batches continuously (palm.inference.engine): a request takes a free row of the KV-cache pool (`max_batch`
rows of `max_model_len` slots) at whatever step one is free, has its prompt prefilled a chunk per
step between decode steps, decodes next to every other row under its own sampling settings, and
leaves at eos, a stop string, max_tokens or when its client goes. A stream's text deltas travel to
its response through an asyncio queue, one server-sent event per delta, as soon as they are produced.

Every limit is checked before a request reaches the worker: a 400 at once for a request that asks
too much (max_tokens, prompt + max_tokens, stop strings, n, seed), a 429 when `max_queue` requests
already wait, a 401 without the API key (when one is set), a 408 for a body slower than
`read_timeout`. A request whose client leaves is cancelled: it stops at its next token, or never starts.

The modules: `options` (ServeOptions, every limit and its default), `schemas` (request bodies, the
error shape), `decoding` (one row's text as its tokens arrive), `worker` (the thread that runs the
engine), `middleware` (the request guard: key, size, read deadline), `handling` (what the routes
share: settings, checks, jobs, replies and streams), the routes `models`, `completions` and `chat`,
`app` (`create_app`) and `server` (`listen`, `serve`, the pool's memory check).

May import: model, core, text, weights, inference.
"""

from .app import create_app
from .chat import render_chat
from .handling import ServeSettings
from .middleware import RequestGuard
from .options import ServeError, ServeOptions
from .schemas import (
    ROLES,
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    StreamOptions,
    error_body,
    error_response,
)
from .server import listen, serve, uvicorn_config
from .worker import GenerationJob, GenerationWorker, QueueFull, WorkerNotRunning

__all__ = [
    "ROLES",
    "APIError",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "GenerationJob",
    "GenerationWorker",
    "QueueFull",
    "RequestGuard",
    "SamplingRequest",
    "ServeError",
    "ServeOptions",
    "ServeSettings",
    "StreamOptions",
    "WorkerNotRunning",
    "create_app",
    "error_body",
    "error_response",
    "listen",
    "render_chat",
    "serve",
    "uvicorn_config",
]
