"""Commands for LoRA adapters: palm merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import Force, app


@app.command("merge")
def merge_command(
    base: Annotated[Path, typer.Option("--base", help="The palm model directory the adapter was trained on.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="A LoRA adapter directory (e.g. RUN/adapter).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    force: Force = False,
) -> None:
    """Merge a LoRA adapter into its base: a plain palm directory, loadable by AutoModelForCausalLM."""
    from ..weights.lora import merge

    typer.echo(f"wrote {merge(base, adapter, out, overwrite=force)}: {base} with the adapter {adapter} merged in")
