"""The FastAPI application: routes, the request guard, the worker's lifespan and OpenAI-shaped errors."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.generate import Generator
from . import chat, completions, models
from .handling import ServeSettings
from .middleware import RequestGuard
from .options import ServeOptions
from .schemas import APIError, error_response
from .worker import GenerationWorker


@asynccontextmanager
async def _lifespan(app: FastAPI):
    # The worker's queue and dispatcher belong to the server's event loop, which exists only from here.
    app.state.worker.start()
    try:
        yield
    finally:
        await app.state.worker.stop()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint as an OpenAI error: `param` is the field's dotted path in the body."""
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


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code=code)


async def _crash(request: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
    return error_response(500, "the server failed to handle the request", kind="server_error")


def create_app(generator: Generator, model_name: str, options: ServeOptions | None = None, **overrides) -> FastAPI:
    """An OpenAI-compatible app over `generator`; its routes read `app.state.settings` and `app.state.worker`.

    `overrides` are ServeOptions fields (max_tokens_limit=64, api_key="..."); a bad value is a ServeError.
    """
    options = replace(options or ServeOptions(), **overrides)
    app = FastAPI(title="palm", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = ServeSettings(generator, model_name, options)
    app.state.worker = GenerationWorker(
        generator,
        options.max_batch,
        options.max_queue,
        options.max_model_len,
        options.prefill_chunk,
        options.prefix_reuse,
    )
    # Around the routes and FastAPI's body parsing: neither sees a request that is unauthorised, too
    # large or too slow.
    app.add_middleware(
        RequestGuard, max_body_bytes=options.max_body_bytes, read_timeout=options.read_timeout, api_key=options.api_key
    )
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)
    for routes in (models, completions, chat):
        app.include_router(routes.router)
    return app
