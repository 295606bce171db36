"""What every route shares: the server's settings, the limits on a request, and the shape of a
reply, whole or streamed as server-sent events (one event per text delta, as soon as it is made)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..generate import Completion, GenerationError, Generator, SamplingConfig
from .schemas import APIError, error_body
from .worker import GenerationWorker, logger

# A streamed choice from (text delta, or None for the closing chunk; finish reason, or None).
ChoiceOf = Callable[[str | None, str | None], dict]


@dataclass(frozen=True)
class ServeSettings:
    """What the routes read from `app.state.settings`; the worker is `app.state.worker`."""

    generator: Generator
    model_name: str
    max_tokens_limit: int = 512
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's creation time

    def max_tokens(self, value: int | None, default: int, param: str = "max_tokens") -> int:
        n = default if value is None else value
        if n > self.max_tokens_limit:
            raise APIError(400, f"{param} is {n}; this server allows at most {self.max_tokens_limit}", param)
        return n


def settings_of(request: Request) -> ServeSettings:
    return request.app.state.settings


def worker_of(request: Request) -> GenerationWorker:
    return request.app.state.worker


@dataclass(frozen=True)
class Reply:
    """The fields that every object answering one request shares (a stream's chunks included)."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, kind: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex}", kind, model)

    def body(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def count_prompt(generator: Generator, prompt: str, param: str) -> int:
    """The prompt's length in tokens; a 400 naming `param` when it leaves no room to generate."""
    try:
        # Off the event loop: tokenizing a long prompt would stall every other connection.
        return len(await run_in_threadpool(generator.encode, prompt))
    except GenerationError as e:
        raise APIError(400, str(e), param, "context_length_exceeded") from None


async def complete(worker: GenerationWorker, prompt: str, cfg: SamplingConfig, prompt_tokens: int) -> Completion:
    try:
        return await worker.complete(prompt, cfg, prompt_tokens)
    except GenerationError as e:
        raise APIError(400, str(e)) from None


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _error_event(error: BaseException) -> str:
    if isinstance(error, GenerationError):
        return sse(error_body(str(error)))
    logger.error("streamed generation failed: %r", error)
    return sse(error_body("generation failed", "server_error"))  # the details stay in the server's log


async def stream_events(
    worker: GenerationWorker, prompt: str, cfg: SamplingConfig, prompt_tokens: int, reply: Reply,
    choice: ChoiceOf, include_usage: bool, lead: Sequence[dict] = (),
) -> AsyncIterator[str]:
    """SSE events of one streamed generation, after a chunk for each `lead` choice.

    Closing the response (the client is gone) cancels the generation, so the model moves on.
    """
    # With stream_options.include_usage every chunk carries "usage": null, and a last one the counts.
    extra = {"usage": None} if include_usage else {}
    for first in lead:
        yield sse(reply.body([first], **extra))
    job = worker.stream(prompt, cfg, prompt_tokens)
    assert job.events is not None
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield sse(reply.body([choice(value, None)], **extra))
                continue
            if kind == "done":
                yield sse(reply.body([choice(None, value.get("finish_reason", "length"))], **extra))
                if include_usage:
                    yield sse(reply.body([], usage=usage(prompt_tokens, value.get("tokens", 0))))
            else:
                yield _error_event(value)
            break
        yield sse("[DONE]")
    finally:
        job.cancelled.set()


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    # No caching, and no buffering by a proxy (nginx honours X-Accel-Buffering): deltas must arrive as made.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
