"""What every route shares: the server's settings, the checks of a request, running its job, and the
shape of a reply, whole or streamed as server-sent events (one event per text delta, as soon as it is made).

Every bound is checked before a job reaches the worker (a 400 costs the model nothing), the queue's
bound when it is submitted (429), and a job is cancelled as soon as its client is gone, streaming or
not, so that an abandoned request stops at its next token, or never starts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..inference.generate import Completion, GenerationError, Generator
from ..inference.sampling import MAX_SEED
from ..inference.structured import GrammarError
from .options import ServeOptions
from .schemas import APIError, SamplingRequest, error_body
from .worker import GenerationJob, GenerationWorker, QueueFull, logger

# A stream's choices (one chunk each) from (text delta, or None for the closing chunk; finish reason, or None;
# the Scores of the delta's tokens, when the request asked for log-probabilities): none while a builder holds
# text back (a reply that may be a tool call), its own choice index in each.
ChoiceOf = Callable[[str | None, str | None, list], list[dict]]

TOO_LONG = "context_length_exceeded"  # OpenAI's code for a prompt and completion that do not fit
RETRY_AFTER_S = 1  # what a 429 tells a client to wait: rows free as requests finish, a step at a time


@dataclass(frozen=True)
class ServeSettings:
    """What the routes read from `app.state.settings`; the worker is `app.state.worker`."""

    generator: Generator
    model_name: str
    options: ServeOptions = field(default_factory=ServeOptions)
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's creation time

    @property
    def total_tokens(self) -> int:
        """Prompt and completion together, at most: the model's context, or less where the server says so
        (--max-total-tokens, or --max-model-len, the slots of a cache row)."""
        caps = [c for c in (self.options.max_total_tokens, self.options.max_model_len) if c is not None]
        return min([self.generator.context, *caps])

    @property
    def model_names(self) -> list[str]:
        """The base model's name, then each served LoRA adapter's."""
        adapters = self.generator.adapters
        return [self.model_name, *(adapters.names if adapters is not None else [])]

    def adapter_for(self, model: str | None) -> int:
        """The adapter a request's `model` names (0: the base model). A server without adapters serves its one
        model whatever a request calls it; with adapters, an unknown name is a 404, as OpenAI answers it."""
        adapters = self.generator.adapters
        if adapters is None or model is None or model == self.model_name:
            return 0
        if model not in adapters.names:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves {', '.join(map(repr, self.model_names))}",
                "model",
                "model_not_found",
            )
        return adapters.index(model)

    def served_name(self, model: str | None) -> str:
        """The name a reply gives as its `model`: the adapter the request named, else the base model's."""
        return self.model_names[self.adapter_for(model)]


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
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def encode_prompt(generator: Generator, prompt: str | list[int], param: str) -> list[int]:
    """The prompt's tokens (a rendered chat and a token-id prompt come as ids); a 400 naming `param` when one
    is outside the vocabulary or it leaves no room to generate."""
    vocab = generator.model.config.vocab_size
    if isinstance(prompt, list) and any(t >= vocab for t in prompt):
        raise APIError(400, f"the prompt holds token {max(prompt)}; the vocabulary has {vocab} tokens", param)
    try:
        # Off the event loop: tokenizing a long prompt would stall every other connection.
        return await run_in_threadpool(generator.encode, prompt)
    except GenerationError as e:
        raise APIError(400, str(e), param, TOO_LONG) from None


async def prepare(
    settings: ServeSettings,
    body: SamplingRequest,
    prompt: str | list[int],
    prompt_param: str,
    requested: int | None,
    requested_param: str,
    default: int,
    extra_stops: Sequence[str] = (),
    structured: tuple[dict | None, str] | None = None,
) -> GenerationJob:
    """The job for a request, or a 400 before it costs the model anything.

    An explicit max_tokens must fit with the prompt (OpenAI's rule); an unsaid one is `default`, cut
    to what room the prompt leaves.
    """
    limit, total = settings.options.max_tokens_limit, settings.total_tokens
    settings.adapter_for(body.model)  # an unknown model is a 404 before anything else is checked
    if requested is not None and requested > limit:
        raise APIError(400, f"{requested_param} is {requested}; this server allows at most {limit}", requested_param)
    body.check_stops(settings.options)
    ids = await encode_prompt(settings.generator, prompt, prompt_param)
    room = total - len(ids)
    if room < 1:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens; this server allows {total} tokens for a prompt "
            "and its completion together",
            prompt_param,
            TOO_LONG,
        )
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens and {requested_param} is {requested}, "
            f"{len(ids) + requested} in all; this server allows {total}",
            requested_param,
            TOO_LONG,
        )
    if requested == 0 and not getattr(body, "echo", False):
        raise APIError(
            400, f"{requested_param} must be at least 1 (0 only with echo, to score the prompt)", requested_param
        )
    max_tokens = min(default, limit, room) if requested is None else max(requested, 1)  # 0: one token, dropped
    vocab = settings.generator.model.config.vocab_size
    grammar = None
    if structured is not None:  # (a JSON schema, or None for any JSON object; the field that asked for it)
        try:
            grammar = await run_in_threadpool(settings.generator.grammars().json, structured[0])
        except GrammarError as e:
            raise APIError(400, str(e), structured[1]) from None
    return GenerationJob(
        ids,
        body.sampling(max_tokens, list(extra_stops), settings.generator.defaults, vocab),
        streamed=bool(body.stream),
        adapter=settings.adapter_for(body.model),
        logprobs=body.top_count(),
        prompt_logprobs=bool(getattr(body, "echo", False)) and body.top_count() is not None,
        grammar=grammar,
    )


def fan_out(job: GenerationJob, n: int) -> list[GenerationJob]:
    """`n` jobs for one prompt's `n` choices: the same prompt and settings, a seeded request's i-th choice
    seeded with seed + i, so that the choices differ and the same request gives the same choices again."""
    jobs = [job]
    for i in range(1, n):
        seed = None if job.cfg.seed is None else (job.cfg.seed + i) % (MAX_SEED + 1)
        jobs.append(
            replace(
                job,
                cfg=replace(job.cfg, seed=seed),
                scores=[],
                prompt_scores=[],
                cancelled=threading.Event(),
                future=None,
                events=None,
                tokens=0,
            )
        )
    return jobs


def submit(worker: GenerationWorker, job: GenerationJob) -> None:
    try:
        worker.submit(job)
    except QueueFull as e:
        raise APIError(
            429,
            f"the server is busy: {e}; retry later",
            code="queue_full",
            kind="rate_limit_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None


async def client_gone(request: Request) -> None:
    """Returns once the client has closed the connection. Once the body is read, the server answers
    receive() only with http.disconnect: when the client leaves, or when the response is complete."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_when_gone(request: Request, jobs: Sequence[GenerationJob]) -> None:
    await client_gone(request)
    for job in jobs:
        job.cancel()


async def complete(request: Request, worker: GenerationWorker, job: GenerationJob) -> Completion:
    """The job's completion; its client leaving cancels it (a 499 that nobody reads, but the log shows)."""
    submit(worker, job)
    assert job.future is not None
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait([job.future, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.future.done():
            job.cancel()  # the client left, or the server is stopping: the model moves on at its next token
    if job.future.cancelled():
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    try:
        return job.future.result()
    except GenerationError as e:
        raise APIError(400, str(e)) from None


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _error_event(error: BaseException) -> str:
    if isinstance(error, GenerationError):
        return sse(error_body(str(error)))
    logger.error("streamed generation failed: %r", error)
    return sse(error_body("generation failed", "server_error"))  # the details stay in the server's log


def stream(
    request: Request,
    worker: GenerationWorker,
    jobs: Sequence[GenerationJob],
    reply: Reply,
    choices: Sequence[ChoiceOf],
    include_usage: bool,
    prompt_tokens: int,
    lead: Sequence[dict] = (),
) -> StreamingResponse:
    """The jobs' texts as one stream of server-sent events, choice i from jobs[i] through choices[i], each
    delta sent as it is made, after a chunk for each `lead` choice; `prompt_tokens` for the usage chunk."""
    try:
        for job in jobs:  # before the response starts, so that a full queue is still a 429
            submit(worker, job)
    except APIError:
        for job in jobs:
            job.cancel()
        raise
    # Watched from now, not from the first event: a client may leave before the response has begun.
    gone = asyncio.ensure_future(cancel_when_gone(request, jobs))
    return stream_response(stream_events(jobs, gone, reply, choices, include_usage, prompt_tokens, lead))


async def stream_events(
    jobs: Sequence[GenerationJob],
    gone: asyncio.Future,
    reply: Reply,
    choices: Sequence[ChoiceOf],
    include_usage: bool,
    prompt_tokens: int,
    lead: Sequence[dict],
) -> AsyncIterator[str]:
    # With stream_options.include_usage every chunk carries "usage": null, and a last one the counts.
    extra = {"usage": None} if include_usage else {}
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: GenerationJob) -> None:
        assert job.events is not None
        while True:
            kind, value = await job.events.get()
            await merged.put((i, kind, value))
            if kind != "delta":
                return

    pumps = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        for first in lead:
            yield sse(reply.body([first], **extra))
        running, completion_tokens = len(jobs), 0
        while running:
            i, kind, value = await merged.get()
            if kind == "delta":
                text, scores = value
                for body in choices[i](text, None, scores):
                    yield sse(reply.body([body], **extra))
                continue
            if kind == "cancelled":
                return  # the client is gone: there is no one to tell
            if kind != "done":
                yield _error_event(value)
                break
            running -= 1
            completion_tokens += len(value.token_ids)
            for body in choices[i](None, value.finish_reason, []):
                yield sse(reply.body([body], **extra))
        else:
            if include_usage:
                yield sse(reply.body([], usage=usage(prompt_tokens, completion_tokens)))
        yield sse("[DONE]")
    finally:
        gone.cancel()
        for task in pumps:
            task.cancel()
        for job in jobs:
            job.cancel()  # closing the response (the client is gone) stops the generations; after the end, a no-op


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    # No caching, and no buffering by a proxy (nginx honours X-Accel-Buffering): deltas must arrive as made.
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
