"""The OpenAI API's shapes: request bodies (checked by pydantic) and the error object every failure returns.

Unknown OpenAI fields (frequency_penalty, presence_penalty, user, ...) are accepted and ignored, so
that clients written for OpenAI work unchanged; `top_k` and `repetition_penalty` are palm extensions.
Every value that could make the model fail later (NaN, a number past what a tensor holds, text that
is not Unicode) is refused here, with a 400 that names the field, rather than as a 500 mid-generation.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..generate import GenerationError, SamplingConfig
from ..sampling import MAX_SEED
from .options import ServeOptions

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_TOP_K = 2**31 - 1  # beyond any vocabulary; a larger number overflows the index tensors of top-k
# Temperatures below vLLM's sampling epsilon decode greedily: dividing the logits by less would overflow
# float32 to inf, and softmax would make NaN probabilities of them.
MIN_TEMPERATURE = 1e-5
# The smallest repetition penalty: with MIN_TEMPERATURE it scales a logit by at most 1e7, far from overflow.
MIN_REPETITION_PENALTY = 0.01


class APIError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def unicode_text(value: str, what: str) -> str:
    """`value`, if it can become UTF-8: JSON can spell a lone surrogate ("\\ud800"), the tokenizer cannot take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        raise ValueError(f"{what} is not valid Unicode: it holds a lone surrogate (U+{code:04X})") from None
    return value


# NaN and Infinity are JSON literals to Python's parser; no sampling setting means anything by them.
LENIENT = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = LENIENT
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = LENIENT

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, le=MAX_TOP_K)
    repetition_penalty: Optional[float] = Field(None, ge=MIN_REPETITION_PENALTY)
    n: Optional[int] = None
    stop: Any = None  # a string or a list of strings; checked below for a message without union tags
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)  # torch seeds are signed 64-bit
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
        return [unicode_text(s, "a stop string") for s in stops]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_stops(self, options: ServeOptions) -> None:
        """The server's bounds on stop strings: every one is searched for after every token, so 20,000 of
        them held the one generation thread for minutes (TGI and OpenAI allow 4)."""
        stops = self.stop or []
        if len(stops) > options.max_stop:
            raise APIError(400, f"stop has {len(stops)} strings; this server allows at most {options.max_stop}", "stop")
        for s in stops:
            if len(s) > options.max_stop_length:
                raise APIError(400, f"a stop string is {len(s)} characters; this server allows at most "
                               f"{options.max_stop_length}", "stop")

    def sampling(self, max_tokens: int, extra_stops: list[str] = (), defaults: dict | None = None) -> SamplingConfig:
        """The request's settings; those it leaves unsaid are the model's saved `defaults` (its
        generation_config.json), else OpenAI's (temperature 1, no top-k or top-p, no penalty)."""
        defaults = defaults or {}

        def given(name: str, fallback):
            value = getattr(self, name)
            return defaults.get(name, fallback) if value is None else value

        temperature = given("temperature", 1.0)
        cfg = SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
            top_k=given("top_k", 0),
            top_p=given("top_p", 1.0),
            repetition_penalty=given("repetition_penalty", 1.0),
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
        return unicode_text(v, "prompt")


class ChatMessage(BaseModel):
    model_config = LENIENT
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: Any = None  # a string, a list of {"type": "text", "text": ...} parts, or null

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: Any) -> str:
        if v is None or isinstance(v, str):
            return unicode_text(v or "", "content")
        if isinstance(v, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v
        ):
            return unicode_text("".join(p["text"] for p in v), "content")
        raise ValueError("content must be a string or a list of text parts")


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
