"""The OpenAI API's shapes: request bodies (checked by pydantic) and the error object every failure returns.

Unknown OpenAI fields (frequency_penalty, presence_penalty, user, ...) are accepted and ignored, so
that clients written for OpenAI work unchanged; `top_k` and `repetition_penalty` are palm extensions.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..generate import GenerationError, SamplingConfig

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class APIError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


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

    @field_validator("n", "best_of")
    @classmethod
    def _only_one_choice(cls, v: int | None, info: ValidationInfo) -> int | None:
        # One generation per request: the worker batches requests, not samples of one request.
        if v is not None and v != 1:
            raise ValueError(f"only {info.field_name}=1 is supported")
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
