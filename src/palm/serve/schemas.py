"""The OpenAI API's shapes: request bodies (checked by pydantic) and the error object every failure returns.

Unknown OpenAI fields (frequency_penalty, presence_penalty, user, ...) are accepted and ignored, so
that clients written for OpenAI work unchanged; `top_k` and `repetition_penalty` are palm extensions.
Every value that could make the model fail later (NaN, a number past what a tensor holds, text that
is not Unicode) is refused here, with a 400 that names the field, rather than as a 500 mid-generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..inference.generate import GenerationError, SamplingConfig
from ..inference.sampling import MAX_SEED
from .options import ServeOptions

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_TOP_K = 2**31 - 1  # beyond any vocabulary; a larger number overflows the index tensors of top-k
# Temperatures below vLLM's sampling epsilon decode greedily: dividing the logits by less would overflow
# float32 to inf, and softmax would make NaN probabilities of them.
MIN_TEMPERATURE = 1e-5
# The smallest repetition penalty: with MIN_TEMPERATURE it scales a logit by at most 1e7, far from overflow.
MIN_REPETITION_PENALTY = 0.01
MAX_N = 128  # OpenAI's bound on choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat (5 for completions; palm allows 20 for both)


class APIError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
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
    max_tokens: Optional[int] = Field(None, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, le=MAX_TOP_K)
    repetition_penalty: Optional[float] = Field(None, ge=MIN_REPETITION_PENALTY)
    n: Optional[int] = None
    stop: Any = None  # a string or a list of strings; checked below for a message without union tags
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)  # torch seeds are signed 64-bit
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Any = None  # completions: how many top tokens (0-20) beside each token's own; chat: true/false
    best_of: Optional[int] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, JSON's keys) -> bias in [-100, 100]
    response_format: Any = None  # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    # Fields of OpenAI's API that change what a client gets back and that palm does not do: a 400 naming
    # the field, never a reply that silently ignores it. Each is allowed at its "off" value.
    functions: Any = None
    function_call: Any = None
    suffix: Any = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if v is None:
            return v
        kind = v.get("type") if isinstance(v, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(
                'response_format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                '"json_schema": {"name": ..., "schema": {...}}}'
            )
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError('response_format.json_schema must be an object with a "schema" object')
        return v

    @field_validator("functions", "suffix")
    @classmethod
    def _absent(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, [], ""):
            raise ValueError(
                f"{info.field_name} is not supported" + (" (use tools)" if info.field_name == "functions" else "")
            )
        return v

    @field_validator("function_call")
    @classmethod
    def _no_calls(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, "none"):
            raise ValueError(f"{info.field_name} is not supported (use tools and tool_choice)")
        return v

    def output_schema(self) -> tuple[bool, dict | None]:
        """(whether the reply is JSON, its schema or None for any JSON object), from response_format."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_schema":
            return True, self.response_format["json_schema"].get("schema") or {"type": "object"}
        return kind == "json_object", None

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit() or len(key) > 10:
                raise ValueError(f"logit_bias keys are token ids, not {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are between -100 and 100, not {bias}")
        return v

    def token_bias(self, vocab_size: int) -> dict[int, float]:
        """logit_bias with int keys, each checked against the vocabulary (a 400 naming the field otherwise)."""
        bias = {int(k): float(b) for k, b in (self.logit_bias or {}).items()}
        outside = [t for t in bias if t >= vocab_size]
        if outside:
            raise APIError(
                400, f"logit_bias names token {outside[0]}; the vocabulary has {vocab_size} tokens", "logit_bias"
            )
        return bias

    @field_validator("n")
    @classmethod
    def _choices(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only best_of=1 is supported")
        return v

    @property
    def choices(self) -> int:
        return self.n or 1

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
                raise APIError(
                    400,
                    f"a stop string is {len(s)} characters; this server allows at most {options.max_stop_length}",
                    "stop",
                )

    def top_count(self) -> int | None:
        """How many most likely tokens each generated token lists with its log-probability (None: none)."""
        return None

    def sampling(
        self, max_tokens: int, extra_stops: Sequence[str] = (), defaults: dict | None = None, vocab_size: int = 0
    ) -> SamplingConfig:
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
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias=self.token_bias(vocab_size) if self.logit_bias else {},
        )
        try:
            cfg.validate()
        except GenerationError as e:
            raise APIError(400, str(e)) from None
        return cfg


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(...)  # a string, a list of token ids, or a list of exactly one of either
    echo: Optional[bool] = False
    tools: Any = None  # a chat field: refused here
    tool_choice: Any = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def _chat_only(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, [], "none"):
            raise ValueError(f"{info.field_name} is a chat completion field")
        return v

    @field_validator("logprobs")
    @classmethod
    def _top_count(cls, v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs is how many most likely tokens to list, 0 to {MAX_TOP_LOGPROBS}")
        return v

    def top_count(self) -> int | None:
        return self.logprobs

    @property
    def score_only(self) -> bool:
        """max_tokens 0 with echo: the prompt's log-probabilities, nothing generated."""
        return self.max_tokens == 0

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> str | list[int] | list[str | list[int]]:
        """One prompt (a string or token ids), or a batch of them (a list of strings or of token-id lists)."""
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            batch = [cls._one(p) for p in v]
            return batch[0] if len(batch) == 1 else batch
        return cls._one(v)

    @staticmethod
    def _one(v: Any) -> str | list[int]:
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if any(t < 0 for t in v):
                raise ValueError("prompt token ids must not be negative")
            return v  # checked against the vocabulary when the request is prepared
        if not isinstance(v, str):
            raise ValueError("prompt must be a string, a list of token ids, or a list of either")
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return unicode_text(v, "prompt")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts (one, for a single prompt)."""
        one = isinstance(self.prompt, str) or all(isinstance(t, int) for t in self.prompt)
        return [self.prompt] if one else list(self.prompt)

    @staticmethod
    def prompt_text(prompt: str | list[int], tokenizer) -> str:
        """A prompt as text (what `echo` returns): token ids are decoded."""
        return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


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
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Any = None  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    tool_choice: Any = None  # "none", "auto" (the default with tools), "required", or {"type": "function", ...}

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, list) or not all(
            isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            and t["function"]["name"]
            and isinstance(t["function"].get("parameters", {}), dict)
            for t in v
        ):
            raise ValueError('tools is a list of {"type": "function", "function": {"name": str, "parameters": {...}}}')
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        named = (
            isinstance(v, dict)
            and v.get("type") == "function"
            and isinstance(v.get("function"), dict)
            and isinstance(v["function"].get("name"), str)
        )
        if v is not None and v not in ("none", "auto", "required") and not named:
            raise ValueError(
                'tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            )
        return v

    def calls_required(self) -> bool:
        """Whether the reply must be a call of one of the tools (constrained), rather than free text."""
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    @field_validator("logprobs")
    @classmethod
    def _flag(cls, v: Any) -> bool | None:
        if v is not None and not isinstance(v, bool):
            raise ValueError("logprobs is true or false in a chat request (top_logprobs says how many)")
        return v

    def top_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None
