"""Commands that use models: palm generate, eval, serve."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .app import app


@app.command("generate")
def generate_command(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; '-' or nothing reads stdin.")] = None,
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")] = Path(
        "demo/run/final"
    ),
    adapter: Annotated[
        Optional[Path], typer.Option("--adapter", help="A LoRA adapter directory (RUN/adapter) to apply to --model.")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="The prompt is a user's turn: prompt with the chat template, print the reply."),
    ] = False,
    system: Annotated[
        Optional[str], typer.Option("--system", help="With --chat: a system turn before the user's.")
    ] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Prompts, one per line.")] = None,
    max_new_tokens: Annotated[
        Optional[int], typer.Option("--max-new-tokens", help="Default: the model's saved default.")
    ] = None,
    temperature: Annotated[
        Optional[float], typer.Option("--temperature", help="0 means greedy (default: the model's).")
    ] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="0 turns it off (default: the model's).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Default: the model's.")] = None,
    repetition_penalty: Annotated[
        Optional[float], typer.Option("--repetition-penalty", help="1 turns it off (default: the model's).")
    ] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string; repeatable.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decode step.")] = False,
    quantize: Annotated[
        str, typer.Option("--quantize", help="Decode weights: none, int8 or fp16 (x86 CPUs).")
    ] = "none",
) -> None:
    """Stream a model's continuation of a prompt (or with --chat, its reply) to the terminal; a summary goes
    to stderr. Sampling settings not given are the ones saved with the model (generation_config.json)."""
    from ..core.errors import GenerationInputError
    from ..inference.generate import Generator, SamplingConfig

    prompts = read_prompts(prompt, file)
    given: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=stop,
        seed=seed,
    )
    SamplingConfig(**{k: v for k, v in given.items() if v is not None}).validate()  # before the model loads
    if system is not None and not chat:
        raise GenerationInputError("--system needs --chat")
    check_quantize(quantize)
    generator = Generator.load(model, adapter=adapter, compile=compile, quantize=quantize)
    cfg = generator.sampling(**given)
    for p in prompts:
        stats: dict = {}
        pieces = generator.stream(chat_prompt(generator, p, system) if chat else p, cfg, stats)
        sys.stdout.write("" if chat else p)
        for piece in reply_pieces(pieces) if chat else pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        rate = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
        print(f"[{stats['tokens']} tokens, {rate:.1f} tokens/s, {stats['finish_reason']}]", file=sys.stderr)


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    """The prompts of `palm generate`: the argument, the lines of --file, or standard input."""
    from ..core.errors import GenerationInputError

    if file is not None:
        from ..data.documents import BinaryFileError, read_text

        if not file.is_file():
            raise GenerationInputError(f"prompt file {file} does not exist")
        try:
            prompts = [line for line in read_text(file).splitlines() if line.strip()]
        except BinaryFileError as e:
            raise GenerationInputError(f"prompt file {e}") from None
    elif prompt is None or prompt == "-":
        try:
            raw = (
                sys.stdin.buffer.read()
                if hasattr(sys.stdin, "buffer")
                else sys.stdin.read().encode("utf-8", "surrogatepass")
            )
            prompts = [raw.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise GenerationInputError(f"standard input is not UTF-8 text (invalid byte at offset {e.start})") from None
    else:
        prompts = [prompt]
    if not any(p.strip() for p in prompts):
        raise GenerationInputError("the prompt is empty")
    return prompts


def chat_prompt(generator, text: str, system: str | None) -> list[int]:
    """The ids that ask for the assistant's reply to `text` (after `system`), as chat fine-tuning trained."""
    from ..text.chat import check_messages, encode_prompt

    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}
    ]
    return encode_prompt(generator.tokenizer, check_messages(messages))


def reply_pieces(pieces):
    """A streamed reply without the space the chat template puts after `Assistant:` (templates.reply_text)."""
    from ..text.templates import reply_text

    first = True
    for piece in pieces:
        if first and piece:
            piece, first = reply_text(piece), False
        if piece:
            yield piece


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")],
    corpus: Annotated[
        Optional[list[str]],
        typer.Option(
            "--corpus", help="Perplexity and bits/byte on the held-out split of these corpora (a mixture spec)."
        ),
    ] = None,
    tasks: Annotated[
        Optional[list[str]], typer.Option("--tasks", help="Task files (.jsonl or .yaml); comma-separated or repeated.")
    ] = None,
    harness: Annotated[
        Optional[list[str]],
        typer.Option("--harness", help="lm-evaluation-harness task names; comma-separated or repeated."),
    ] = None,
    include_path: Annotated[
        Optional[list[Path]], typer.Option("--include-path", help="Folder of lm-eval task YAMLs; repeatable.")
    ] = None,
    shots: Annotated[
        Optional[int],
        typer.Option(
            "--shots", help="Examples shown before each question (tasks: 0 by default; harness: each task's own)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Chooses the few-shot examples.")] = 0,
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="Score only the first N examples of each task.")
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option("--seq-len", help="Window length (default: the run's training length, else the context)."),
    ] = None,
    stride: Annotated[
        Optional[int], typer.Option("--stride", help="Tokens between window starts (default: --seq-len).")
    ] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option("--max-tokens", help="Held-out tokens scored per corpus, at most.")
    ] = None,
    val_fraction: Annotated[
        Optional[float], typer.Option("--val-fraction", help="Held-out share (default: the run's, else 0.05).")
    ] = None,
    cache_dir: Annotated[
        Optional[Path], typer.Option("--cache-dir", help="Token shards (default: the run's cache).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the results as JSON here.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
) -> None:
    """Measure a model: bits/byte on held-out text, few-shot tasks, lm-evaluation-harness tasks."""
    from ..core.runtime import torch_threads
    from ..evaluate import EvalRequest, eval_report, write_json

    request = EvalRequest(
        corpus=corpus,
        tasks=tasks,
        harness=harness,
        include_path=include_path or [],
        shots=shots,
        seed=seed,
        limit=limit,
        seq_len=seq_len,
        stride=stride,
        max_tokens=max_tokens,
        val_fraction=val_fraction,
        cache_dir=cache_dir,
        batch_size=batch_size,
    )
    with torch_threads(threads):
        report, _ = eval_report(model, request, progress=sys.stderr.isatty(), echo=typer.echo)
    if out is not None:
        write_json(out, report)
        typer.echo(f"wrote {out}")


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")],
    adapter: Annotated[
        Optional[list[str]],
        typer.Option(
            "--adapter",
            help="NAME=DIR: a LoRA adapter (RUN/adapter) served beside --model, chosen by a request's model field; repeatable. A bare DIR is merged into the model instead.",
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0 to 65535; 0 picks a free port.")] = 8000,
    model_name: Annotated[
        Optional[str], typer.Option("--model-name", help="Model id clients use (default: the folder name).")
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask for.")
    ] = 512,
    max_total_tokens: Annotated[
        Optional[int],
        typer.Option("--max-total-tokens", help="Largest prompt + max_tokens (default: the model's context)."),
    ] = None,
    max_stop: Annotated[int, typer.Option("--max-stop", help="Stop strings a request may give.")] = 4,
    max_stop_length: Annotated[int, typer.Option("--max-stop-length", help="Characters per stop string.")] = 64,
    max_batch: Annotated[
        int,
        typer.Option("--max-batch", help="KV-cache rows: requests decoded together, joining and leaving at any step."),
    ] = 16,
    max_model_len: Annotated[
        Optional[int],
        typer.Option(
            "--max-model-len", help="Slots per cache row, prompt + completion (default: the model's context)."
        ),
    ] = None,
    prefill_chunk: Annotated[
        int, typer.Option("--prefill-chunk", help="Prompt tokens prefilled per step, between decode steps.")
    ] = 256,
    prefix_reuse: Annotated[
        bool,
        typer.Option(
            "--prefix-reuse/--no-prefix-reuse",
            help="Copy a prompt's chunks that a cache row already holds (a shared system prompt) instead of prefilling them.",
        ),
    ] = True,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a row; more get 429.")] = 64,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the decode step (a graph per batch and length window).")
    ] = False,
    quantize: Annotated[
        str,
        typer.Option(
            "--quantize",
            help="Decode weights: none, int8 or fp16 (fp16: x86 CPUs; int8 is batch-exact only on AVX512/AMX CPUs with bf16).",
        ),
    ] = "none",
    read_timeout: Annotated[
        float, typer.Option("--read-timeout", help="Seconds a client has to send its headers, and then its body (408).")
    ] = 30.0,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="PALM_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every request but /health (the environment variable keeps it out of `ps`).",
        ),
    ] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models)."""
    from ..serve import serve

    check_quantize(quantize)
    merged, adapters = served_adapters(adapter or [], model_name or model.resolve().name)
    serve(
        model,
        host=host,
        port=port,
        model_name=model_name,
        compile=compile,
        quantize=quantize,
        adapter=merged,
        adapters=adapters,
        max_tokens_limit=max_tokens_limit,
        max_total_tokens=max_total_tokens,
        max_stop=max_stop,
        max_stop_length=max_stop_length,
        max_batch=max_batch,
        max_model_len=max_model_len,
        prefill_chunk=prefill_chunk,
        prefix_reuse=prefix_reuse,
        max_queue=max_queue,
        read_timeout=read_timeout,
        api_key=api_key,
    )


def served_adapters(specs: list[str], base_name: str) -> tuple[Path | None, dict[str, Path]]:
    """(an adapter to merge in, adapters to serve by name) from `--adapter` values: one bare DIR, or NAME=DIR each."""
    from ..core.errors import CheckpointError

    named = [s for s in specs if "=" in s]
    if named and len(named) != len(specs) or len(specs) > 1 and not named:
        raise CheckpointError(
            "--adapter takes one DIR (merged into the model) or NAME=DIR pairs (served by name), "
            "not a mix or several bare DIRs"
        )
    if not named:
        return (Path(specs[0]) if specs else None), {}
    adapters: dict[str, Path] = {}
    for spec in named:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            raise CheckpointError(f"--adapter {spec!r}: give NAME=DIR")
        if name in adapters or name == base_name:
            raise CheckpointError(f"--adapter {name!r} is served twice (adapter names and the model's must differ)")
        adapters[name] = Path(folder)
    return None, adapters


def check_quantize(quantize: str) -> None:
    """Before a model loads: a misspelt format fails at once."""
    from ..inference.quant import QUANTIZE, QuantizeError

    if quantize not in QUANTIZE:
        raise QuantizeError(f"--quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
