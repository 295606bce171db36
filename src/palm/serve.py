"""`palm serve`: an OpenAI-compatible HTTP server (completions, chat completions, models) over a Generator.

The model is not thread-safe, so every generation runs on ONE worker thread. A dispatcher task feeds
it: non-streaming requests that arrive while the model is busy and share the same sampling settings
are decoded together in one left-padded `Generator.generate` batch (at most `max_batch` rows); a
streaming request runs `Generator.stream` alone on that thread and its text deltas travel to the
response through an asyncio queue, one server-sent event per delta, as soon as they are produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import PalmError
from .generate import Completion, GenerationError, Generator, SamplingConfig

logger = logging.getLogger("uvicorn.error")

# Stops added to chat requests rendered with the plain "<role>: <content>" template, so that a
# model trained on that format ends its turn instead of writing the user's next line.
PLAIN_CHAT_STOPS = ["\nuser:", "\nsystem:"]
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class ServeError(PalmError):
    """The server cannot start: the address is in use, a bad setting."""


class APIError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


# ---------------------------------------------------------------------------------------------------
# Request bodies. Unknown OpenAI fields (frequency_penalty, presence_penalty, user, ...) are accepted
# and ignored; `top_k` and `repetition_penalty` are palm extensions.


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    n: Optional[int] = None
    stop: Any = None  # a string or a list of strings; checked below for a message without union tags
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Any = None  # only null/false/0: log-probabilities are not returned
    best_of: Optional[int] = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        stops = [v] if isinstance(v, str) else v if v is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling(self, max_tokens: int, extra_stops: list[str] = ()) -> SamplingConfig:
        cfg = SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=list(self.stop or []) + [s for s in extra_stops if s not in (self.stop or [])],
            seed=self.seed,
        )
        try:
            cfg.validate()
        except GenerationError as e:
            raise APIError(400, str(e)) from None
        return cfg


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(...)  # a string or a list of one string (token-id prompts are not supported)
    echo: Optional[bool] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str:
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if not isinstance(v, str):
            raise ValueError("prompt must be a string or a list of exactly one string")
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: Any = None  # a string, a list of {"type": "text", "text": ...} parts, or null

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str:
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v
        ):
            return "".join(p["text"] for p in v)
        raise ValueError("content must be a string or a list of text parts")


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------------
# The single generation worker.


@dataclass
class _Job:
    prompt: str
    cfg: SamplingConfig
    prompt_tokens: int
    future: asyncio.Future | None = None  # a whole completion
    events: asyncio.Queue | None = None  # a stream: ("delta", str), ("done", stats) or ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationWorker:
    """Owns the one thread that touches the model, and batches what waits for it."""

    def __init__(self, generator: Generator, max_batch: int = 8):
        self.generator = generator
        self.max_batch = max(1, max_batch)
        self.batch_sizes: list[int] = []  # one entry per generate() call, for monitoring and tests
        self._queue: asyncio.Queue[_Job] | None = None
        self._pending: deque[_Job] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Requests queued and not yet handed to the model."""
        return len(self._pending) + (self._queue.qsize() if self._queue is not None else 0)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="palm-generate")
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: _Job) -> None:
        if self._queue is None:
            raise RuntimeError("the generation worker is not running")
        self._queue.put_nowait(job)

    async def complete(self, prompt: str, cfg: SamplingConfig, prompt_tokens: int) -> Completion:
        job = _Job(prompt, cfg, prompt_tokens, future=asyncio.get_running_loop().create_future())
        self.submit(job)
        return await job.future

    def _batch_key(self, job: _Job) -> tuple | None:
        """Jobs with equal keys decode together and get exactly what each would get alone."""
        c = job.cfg
        if job.events is not None:
            return None
        if c.temperature > 0 and c.seed is not None:
            return None  # a seeded sample must not depend on which requests share its batch
        if job.prompt_tokens + c.max_new_tokens > self.generator.context:
            return None  # a long row would shorten every other row's budget
        return (c.max_new_tokens, c.temperature, c.top_k, c.top_p, c.repetition_penalty, tuple(c.stop))

    def _live(self, job: _Job) -> bool:
        return not (job.cancelled.is_set() or (job.future is not None and job.future.done()))

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            while not self._queue.empty():
                self._pending.append(self._queue.get_nowait())
            job = self._pending.popleft()
            if not self._live(job):
                continue
            try:
                if job.events is not None:
                    await loop.run_in_executor(self._executor, self._run_stream, job, loop)
                    continue
                batch = [job]
                key = self._batch_key(job)
                if key is not None:
                    rest: deque[_Job] = deque()
                    for other in self._pending:
                        if len(batch) < self.max_batch and self._live(other) and self._batch_key(other) == key:
                            batch.append(other)
                        else:
                            rest.append(other)
                    self._pending = rest
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
                for j, result in zip(batch, results):
                    if j.future is not None and not j.future.done():
                        if isinstance(result, BaseException):
                            j.future.set_exception(result)
                        else:
                            j.future.set_result(result)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving whatever one request did
                logger.exception("generation worker failed")
                if job.future is not None and not job.future.done():
                    job.future.set_exception(e)

    # The two methods below run on the worker thread.

    def _run_batch(self, batch: list[_Job]) -> list[Completion | BaseException]:
        self.batch_sizes.append(len(batch))
        try:
            return list(self.generator.generate([j.prompt for j in batch], batch[0].cfg))
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                return [e]
        results: list[Completion | BaseException] = []
        for j in batch:  # one bad row must not fail its neighbours
            try:
                results.append(self.generator.generate([j.prompt], j.cfg)[0])
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return results

    def _run_stream(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        assert job.events is not None
        put = job.events.put_nowait

        def send(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(put, item)
            except RuntimeError:  # the event loop has closed: the server is going away
                job.cancelled.set()

        stats: dict = {}
        try:
            pieces = self.generator.stream(job.prompt, job.cfg, stats)
            for piece in pieces:
                if job.cancelled.is_set():
                    pieces.close()
                    return
                send(("delta", piece))
            send(("done", stats))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            send(("error", e))


# ---------------------------------------------------------------------------------------------------
# The body-size guard: a pure ASGI middleware, so an oversized body is never handed to FastAPI.


class BodySizeLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def _reject(self, send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _drain(self, receive, budget: int) -> None:
        """Read (and drop) what the client is still sending, so it sees the 413 rather than a reset."""
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body is larger than the server's limit of {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self._reject(send, 400, "the Content-Length header is not a number", "invalid_content_length")
            if declared > self.limit:
                await self._drain(receive, min(declared, 8 * self.limit + (1 << 20)))
                return await self._reject(send, 413, too_big, "request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                if message.get("more_body"):
                    await self._drain(receive, 8 * self.limit + (1 << 20))
                return await self._reject(send, 413, too_big, "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------------
# The application.


def render_chat(generator: Generator, messages: list[ChatMessage]) -> tuple[str, list[str]]:
    """The prompt for a conversation, and the stop strings its template implies."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""} for m in messages]
    hf = generator.tokenizer.hf
    if getattr(hf, "chat_template", None):
        text = hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        bos = getattr(hf, "bos_token", None)
        if bos and text.startswith(bos):
            text = text[len(bos):]  # Generator.encode adds BOS itself
        return text, []
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:", PLAIN_CHAT_STOPS


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(generator: Generator, model_name: str, max_tokens_limit: int = 512,
               max_body_bytes: int = 1_000_000, max_batch: int = 8) -> FastAPI:
    worker = GenerationWorker(generator, max_batch)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="palm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.model_name = model_name
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        param = ".".join(loc) if loc else None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif not loc and first.get("type") == "missing":
            message = "the request body must be a JSON object"
        else:
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"{param}: {msg}" if param else msg
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(500, "the server failed to handle the request", kind="server_error")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "palm"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
        return model_card()

    def max_tokens_of(value: int | None, default: int, param: str = "max_tokens") -> int:
        n = default if value is None else value
        if n > max_tokens_limit:
            raise APIError(400, f"{param} is {n}; this server allows at most {max_tokens_limit}", param)
        return n

    async def count_prompt(prompt: str, param: str) -> int:
        try:
            return len(await run_in_threadpool(generator.encode, prompt))
        except GenerationError as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from None

    async def streamed(job: _Job, chunk, final_chunk, usage_chunk) -> AsyncIterator[str]:
        """SSE events of one streamed job; closing the response (client gone) stops its generation."""
        job.events = asyncio.Queue()
        try:
            worker.submit(job)
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield _sse(chunk(value))
                elif kind == "done":
                    yield _sse(final_chunk(value.get("finish_reason", "length")))
                    if usage_chunk is not None:
                        yield _sse(usage_chunk(value.get("tokens", 0)))
                    break
                else:
                    status = 400 if isinstance(value, GenerationError) else 500
                    if status == 500:
                        logger.error("streamed generation failed: %r", value)
                    message = str(value) if status == 400 else "generation failed"
                    yield _sse(error_body(message, "invalid_request_error" if status == 400 else "server_error"))
                    break
            yield _sse("[DONE]")
        finally:
            job.cancelled.set()

    def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def finished(job_prompt: str, cfg: SamplingConfig, prompt_tokens: int) -> Completion:
        try:
            return await worker.complete(job_prompt, cfg, prompt_tokens)
        except GenerationError as e:
            raise APIError(400, str(e)) from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        cfg = req.sampling(max_tokens_of(req.max_tokens, 16))
        prompt_tokens = await count_prompt(req.prompt, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def body(choices: list[dict], usage: dict | None, with_usage: bool = True) -> dict:
            out = {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices}
            if with_usage:
                out["usage"] = usage
            return out

        def choice(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if req.stream:
            echoed = [req.prompt] if req.echo else []

            async def events() -> AsyncIterator[str]:
                for text in echoed:
                    yield _sse(body([choice(text, None)], None, include_usage))
                async for event in streamed(
                    _Job(req.prompt, cfg, prompt_tokens),
                    lambda piece: body([choice(piece, None)], None, include_usage),
                    lambda finish: body([choice("", finish)], None, include_usage),
                    (lambda n: body([], _usage(prompt_tokens, n))) if include_usage else None,
                ):
                    yield event

            return stream_response(events())
        done = await finished(req.prompt, cfg, prompt_tokens)
        text = req.prompt + done.text if req.echo else done.text
        return body([choice(text, done.finish_reason)], _usage(prompt_tokens, len(done.token_ids)))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if req.max_completion_tokens is not None:
            limit = max_tokens_of(req.max_completion_tokens, max_tokens_limit, "max_completion_tokens")
        else:
            limit = max_tokens_of(req.max_tokens, max_tokens_limit)
        prompt, stops = render_chat(generator, req.messages)
        cfg = req.sampling(limit, stops)
        prompt_tokens = await count_prompt(prompt, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        if req.stream:
            def chunk(delta: dict, finish: str | None = None) -> dict:
                out = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
                if include_usage:
                    out["usage"] = None
                return out

            async def events() -> AsyncIterator[str]:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                async for event in streamed(
                    _Job(prompt, cfg, prompt_tokens),
                    lambda piece: chunk({"content": piece}),
                    lambda finish: chunk({}, finish),
                    (lambda n: {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                "choices": [], "usage": _usage(prompt_tokens, n)}) if include_usage else None,
                ):
                    yield event

            return stream_response(events())
        done = await finished(prompt, cfg, prompt_tokens)
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(prompt_tokens, len(done.token_ids)),
        }

    return app


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for the server (port 0 picks a free one); ServeError when the address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve the host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 512,
          max_body_bytes: int = 1_000_000, max_batch: int = 8, model_name: str | None = None,
          compile: bool = False, log_level: str = "info") -> None:
    """Load a model directory and serve it until interrupted."""
    import uvicorn

    if max_tokens_limit < 1 or max_body_bytes < 1 or max_batch < 1:
        raise ServeError("max_tokens_limit, max_body_bytes and max_batch must be positive")
    sock = listen(host, port)  # fail fast, before loading a large model
    try:
        generator = Generator.load(model_dir, compile=compile)
        name = model_name or Path(model_dir).resolve().name
        app = create_app(generator, name, max_tokens_limit, max_body_bytes, max_batch)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(app, host=host, port=bound_port, log_level=log_level)  # configures logging
        shown = f"[{host}]" if ":" in host else host
        logger.info("serving %s on http://%s:%d/v1 (Press CTRL+C to quit)", name, shown, bound_port)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
