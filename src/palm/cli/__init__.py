"""The `palm` command line: the only place that prints errors, chooses exit codes and sets process-wide
state (threads). Commands turn flags into the library's config dataclasses and call the library.

    training.py   palm tokenizer train, init, train, finetune
    runs.py       palm plan, palm plot
    inference.py  palm generate, eval, serve
    adapters.py   palm merge
    export.py     palm export

May import: every package (it is the top).
"""

from __future__ import annotations

import logging
import sys

import typer

from ..core.errors import PalmError
from ..model.config import ConfigError
from . import adapters, export, inference, runs, training  # noqa: F401  (their commands register themselves on `app`)
from .app import app

__all__ = ["app", "main"]


class _StderrHandler(logging.Handler):
    """One line per warning, to whatever sys.stderr is when it is written (tests swap it)."""

    palm_cli = True

    def emit(self, record: logging.LogRecord) -> None:
        print(f"palm: warning: {record.getMessage()}", file=sys.stderr)


def _report_warnings() -> None:
    """palm's library logs what the user should know (a corrupt checkpoint passed over); show it as one line."""
    logger = logging.getLogger("palm")
    if not any(getattr(h, "palm_cli", False) for h in logger.handlers):
        handler = _StderrHandler(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False  # no second copy through the root logger's last-resort handler


def main(argv: list[str] | None = None) -> None:
    _report_warnings()
    try:
        app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("palm: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: unknown option, bad value, missing argument
        print(f"palm: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (PalmError, ConfigError) as e:
        print(f"palm: error: {e}", file=sys.stderr)
        sys.exit(1)
