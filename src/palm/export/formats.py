"""What `palm export` can write, and the error it raises."""

from __future__ import annotations

from collections.abc import Iterable

from ..core.errors import PalmError

FORMATS = ("cohere", "gguf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
COHERE_TYPES = ("f32", "f16", "bf16")


class ExportError(PalmError):
    """A model that cannot be written in the format asked for, or an export setting that makes no sense."""


def check_type(name: str, allowed: Iterable[str], what: str = "type") -> str:
    """`name` lower-cased once it is one of `allowed`; an ExportError listing them otherwise."""
    allowed = tuple(allowed)
    if name.lower() not in allowed:
        raise ExportError(f"unknown {what} {name!r}: choose one of {', '.join(allowed)}")
    return name.lower()
