"""The `palm` command line. The only place that prints errors and chooses exit codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import ConfigError, PalmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build PaLM-style language models: tokenizer, model, training, generation.",
)
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect palm tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")

Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it already exists.")]


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[
        list[Path], typer.Option("--corpus", help="Text file, .jsonl file (text field) or folder; repeatable.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the tokenizer to.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, specials and bytes included.")] = 8192,
    force: Force = False,
) -> None:
    """Train a lossless PaLM vocabulary (digits split, UTF-8 byte fallback) on a corpus."""
    from .checkpoint import atomic_directory
    from .data import iter_documents
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(lambda: iter_documents(corpus), vocab_size)
    with atomic_directory(out, overwrite=force) as tmp:
        tok.save(tmp)
    typer.echo(f"wrote a {len(tok)}-token vocabulary to {out}")


@app.command("init")
def init_model(
    preset: Annotated[str, typer.Option("--preset", help="tiny, small, base, palm-8b, palm-62b or palm-540b.")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="Folder of a palm tokenizer.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Force = False,
) -> None:
    """Write a randomly initialised model with its tokenizer, loadable by AutoModelForCausalLM."""
    from .checkpoint import atomic_directory
    from .checkpoint import init_model_dir

    with atomic_directory(out, overwrite=force) as tmp:
        n_params = init_model_dir(preset, tokenizer, tmp, seed=seed)
    typer.echo(f"wrote a {n_params / 1e6:.1f}M-parameter {preset} model to {out}")


def main(argv: list[str] | None = None) -> None:
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


if __name__ == "__main__":
    main()
