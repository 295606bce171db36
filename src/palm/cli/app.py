"""The Typer application the command modules register on, and what they share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build PaLM-style language models: tokenizer, model, training, generation.",
)
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect palm tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it already exists.")]


def given(options: dict[str, Any], *cli_only: str, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The options the user gave (not None), as config field names and plain values: the mapping from
    flags to the config dataclasses, which refuse any name they do not have."""
    rename = rename or {}
    return {
        rename.get(k, k): (str(v) if isinstance(v, Path) else v)
        for k, v in options.items()
        if v is not None and k not in cli_only
    }
