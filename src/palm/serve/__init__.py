"""`palm serve`: an OpenAI-compatible HTTP server (completions, chat completions, models) over a Generator.

The model is not thread-safe, so every generation runs on ONE worker thread (`worker`). A
dispatcher task feeds it: non-streaming requests that arrive while the model is busy and share the
same sampling settings are decoded together in one left-padded `Generator.generate` batch (at most
`max_batch` rows); a streaming request runs `Generator.stream` alone on that thread and its text
deltas travel to the response through an asyncio queue, one server-sent event per delta, as soon
as they are produced.

The modules: `schemas` (request bodies, the error shape), `worker`, `middleware` (the body-size
guard), `handling` (what the routes share: settings, limits, replies and streams), the routes
`models`, `completions` and `chat`, `app` (`create_app`) and `server` (`listen`, `serve`).
"""

from .app import create_app
from .chat import PLAIN_CHAT_STOPS, render_chat
from .handling import ServeSettings
from .middleware import BodySizeLimit
from .schemas import (
    ROLES, APIError, ChatMessage, ChatRequest, CompletionRequest, SamplingRequest, StreamOptions, error_body,
    error_response,
)
from .server import ServeError, listen, serve
from .worker import GenerationJob, GenerationWorker, WorkerNotRunning

__all__ = [
    "PLAIN_CHAT_STOPS", "ROLES",
    "APIError", "BodySizeLimit", "ChatMessage", "ChatRequest", "CompletionRequest", "GenerationJob",
    "GenerationWorker", "SamplingRequest", "ServeError", "ServeSettings", "StreamOptions", "WorkerNotRunning",
    "create_app", "error_body", "error_response", "listen", "render_chat", "serve",
]
