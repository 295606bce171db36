"""The `palm` command line. The only place that prints errors and chooses exit codes."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

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


def _read_config_file(path: Path) -> dict:
    """Training settings from TOML or YAML; keys are TrainConfig fields (dashes allowed)."""
    from .train import TrainingError

    if not path.is_file():
        raise TrainingError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line for the user
        raise TrainingError(f"config file {path} cannot be parsed: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise TrainingError(f"config file {path} must hold a table of settings")
    return {k.replace("-", "_"): v for k, v in raw.items()}


@app.command("train")
def train_command(
    corpus: Annotated[
        Optional[list[str]],
        typer.Option("--corpus", help="Named corpus, file or folder, optionally :weight; comma-separated or repeated."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset")] = None,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Else one is trained on the corpus.")] = None,
    vocab_size: Annotated[Optional[int], typer.Option("--vocab-size")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Global batch, in sequences.")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option("--micro-batch-size")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="palm (Adafactor recipe) or adamw.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    hold_steps: Annotated[Optional[int], typer.Option("--hold-steps")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto, bf16 or fp32.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run (--max-steps extends it).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML or YAML file with the same keys.")] = None,
) -> None:
    """Pretrain a PaLM with the paper's recipe; the result is RUN/final, a Transformers directory."""
    given = {k: v for k, v in locals().items() if v is not None and k not in ("resume", "config")}
    from .train import TrainConfig, TrainingError, load_run_config, train

    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()}
    if resume is not None:
        cfg = load_run_config(resume)
        unchangeable = set(given) - {"max_steps", "checkpoint_every", "eval_every", "compile"}
        if unchangeable:
            raise TrainingError(f"--resume continues a run as it was; only --max-steps and the intervals may change, not {', '.join(sorted(unchangeable))}")
        cfg = TrainConfig(**{**dataclasses.asdict(cfg), **given, "out": str(resume)})
    else:
        settings = {**(_read_config_file(config) if config else {}), **given}
        if not settings.get("corpus") or not settings.get("out"):
            raise TrainingError("--corpus and --out are required (or --resume RUN)")
        if isinstance(settings["corpus"], str):
            settings["corpus"] = [settings["corpus"]]
        try:
            cfg = TrainConfig(**settings)
        except TypeError as e:
            raise TrainingError(f"unknown setting in {config}: {e}") from None
    run = train(cfg, resume=resume is not None)
    typer.echo(f"trained {run.step} steps; model in {run.path / 'final'}, metrics in {run.path / 'metrics.jsonl'}")


@app.command("plot")
def plot_command(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG path (default RUN/curves.png).")] = None,
) -> None:
    """Draw a run's loss, validation and learning-rate curves to a PNG."""
    from .plot import plot_run

    typer.echo(f"wrote {plot_run(run, out)}")


@app.command("generate")
def generate_command(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' or nothing reads stdin.")] = None,
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")] = Path("demo/run/final"),
    file: Annotated[Optional[Path], typer.Option("--file", help="Prompts, one per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="0 means greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="0 turns it off.")] = 50,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.1,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string; repeatable.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decode step.")] = False,
) -> None:
    """Stream a model's continuation of a prompt to the terminal; a summary goes to stderr."""
    from .errors import GenerationInputError
    from .generate import Generator, SamplingConfig

    if file is not None:
        if not file.is_file():
            raise GenerationInputError(f"prompt file {file} does not exist")
        prompts = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif prompt is None or prompt == "-":
        prompts = [sys.stdin.read()]
    else:
        prompts = [prompt]
    if not any(p.strip() for p in prompts):
        raise GenerationInputError("the prompt is empty")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, stop=stop or [], seed=seed)
    cfg.validate()
    generator = Generator.load(model, compile=compile)
    for p in prompts:
        stats: dict = {}
        sys.stdout.write(p)
        for piece in generator.stream(p, cfg, stats):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        rate = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
        print(f"[{stats['tokens']} tokens, {rate:.1f} tokens/s, {stats['finish_reason']}]", file=sys.stderr)


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask for.")] = 512,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model id clients use (default: the folder name).")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from .serve import serve

    serve(model, host=host, port=port, max_tokens_limit=max_tokens_limit, model_name=model_name)


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
