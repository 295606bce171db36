"""The server's options: what one request may ask for, and what the server holds for all of them.

One dataclass, checked once, so that `palm serve`, `serve()` and `create_app()` refuse the same bad
values with the same message (a bad value would otherwise surface as a confusing failure later, or
not at all: port 70000 silently became 4464).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import PalmError

MAX_PORT = 65535


class ServeError(PalmError):
    """The server cannot start: the address is in use, a bad setting."""


@dataclass(frozen=True)
class ServeOptions:
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    max_total_tokens: int | None = None  # prompt + max_tokens, at most; None: the model's context (always a bound)
    max_stop: int = 4  # stop strings per request (OpenAI's limit); each one is checked after every token
    max_stop_length: int = 64  # characters per stop string
    max_batch: int = 16  # cache rows: requests decoded together, joining and leaving at any step
    max_model_len: int | None = None  # slots per row, prompt + completion; None: the model's context
    prefill_chunk: int = 256  # prompt tokens written per step, so new prompts and running streams share each step
    prefix_reuse: bool = True  # a prompt's whole chunks that a cache row already holds are copied, not prefilled
    max_queue: int = 64  # requests waiting for a row; one more is answered 429
    max_body_bytes: int = 1_000_000
    read_timeout: float = 30.0  # seconds a client has to send its headers, and then its body
    api_key: str | None = None  # when set, every request but /health needs `Authorization: Bearer KEY`

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and not (key and key.isascii() and key.isprintable() and key == key.strip()):
            # It travels in an HTTP header, which clients send as ASCII, and is compared byte for byte.
            raise ServeError("the API key must be printable ASCII, not empty, without spaces at its ends")
        for name in COUNTS:
            value, low = getattr(self, name), 0 if name == "max_stop" else 1  # max_stop 0: no stop strings
            if value is None and name in ("max_total_tokens", "max_model_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ServeError(f"{flag(name)} must be an integer of at least {low}, not {value!r}")
        t = self.read_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ServeError(f"{flag('read_timeout')} must be a positive number of seconds, not {t!r}")


COUNTS = (
    "max_tokens_limit",
    "max_total_tokens",
    "max_stop",
    "max_stop_length",
    "max_batch",
    "max_model_len",
    "prefill_chunk",
    "max_queue",
    "max_body_bytes",
)


def flag(name: str) -> str:
    """The `palm serve` option of a field, which is what a user sees in a message."""
    return "--" + name.replace("_", "-")


def check_port(port: int) -> None:
    # The socket layer keeps only the low 16 bits of a port: 70000 would listen on 4464.
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise ServeError(f"--port must be between 0 and {MAX_PORT} (0 picks a free one), not {port!r}")
