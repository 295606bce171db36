"""Commands that take a palm model elsewhere and bring others in: palm export, palm import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import Force, app


@app.command("export")
def export_command(
    fmt: Annotated[str, typer.Option("--format", help="cohere (Transformers, vLLM) or gguf (llama.cpp).")],
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")],
    out: Annotated[Path, typer.Option("--out", help="cohere: a folder; gguf: a file (e.g. model.gguf).")],
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--type", help="gguf: f32, f16 (the default), bf16 or q8_0; cohere: f32, f16 or bf16 (default: as stored)."
        ),
    ] = None,
    force: Force = False,
) -> None:
    """Write a palm model as Cohere's Command-R layout (CohereForCausalLM, vLLM) or as a GGUF file (llama.cpp)."""
    from ..export import export

    result = export(fmt, model, out, dtype, overwrite=force)
    if fmt.lower() == "cohere":
        typer.echo(f"wrote {out}: CohereForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")
    else:
        typer.echo(f"wrote {out}: `llama-cli -m {out}`" + (f" ({result.note})" if result.exact else ""))


@app.command("import")
def import_command(
    fmt: Annotated[str, typer.Option("--format", help="cohere: a CohereForCausalLM directory (Command R, Aya).")],
    model: Annotated[Path, typer.Option("--model", help="The model directory to import (safetensors weights).")],
    out: Annotated[Path, typer.Option("--out", help="The palm model directory to write.")],
    force: Force = False,
) -> None:
    """Bring a PaLM-architecture model (Cohere's Command-R layout) into palm, with its tokenizer and chat template."""
    from ..export import import_model

    config = import_model(fmt, model, out, overwrite=force)
    typer.echo(
        f"wrote {out}: {config.num_hidden_layers} layers, d={config.hidden_size}, "
        f"{config.num_key_value_heads} K/V heads; every palm command takes it (`palm generate --model {out}`)"
    )
