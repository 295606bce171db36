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
    parallel: Annotated[Optional[str], typer.Option("--parallel", help="none, or ddp / fsdp under torchrun.")] = None,
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
        # The layout may change: checkpoints of either kind load at any world size.
        unchangeable = set(given) - {"max_steps", "checkpoint_every", "eval_every", "compile", "parallel"}
        if unchangeable:
            raise TrainingError(f"--resume continues a run as it was; only --max-steps, --parallel and the intervals may change, not {', '.join(sorted(unchangeable))}")
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
    from . import distributed

    run = train(cfg, resume=resume is not None)
    steps, where, main = run.step, run.path, run.world.is_main
    del run  # the model and optimizer hold the process group; drop them before leaving it
    distributed.teardown()
    if main:
        typer.echo(f"trained {steps} steps; model in {where / 'final'}, metrics in {where / 'metrics.jsonl'}")


@app.command("finetune")
def finetune_command(
    model: Annotated[Optional[Path], typer.Option("--model", help="The model directory to start from.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help='JSONL rows {"prompt": ..., "completion": ...}.')] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder; the model lands in RUN/final.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Prompt template: summarize, qa or translate.")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation rows (default: hold out 5% of --data).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default 500).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over --data instead of --steps.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Rows per step.")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="0.1 as in the paper.")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="Evaluations without a better validation loss before stopping.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Longest row in tokens.")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="palm (Adafactor) or adamw.")] = None,
    hold_steps: Annotated[Optional[int], typer.Option("--hold-steps")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run (--steps extends it).")] = None,
) -> None:
    """Fine-tune on prompt/completion pairs (loss on the completion only); the result is RUN/final."""
    given = {k: v for k, v in locals().items() if v is not None and k != "resume"}
    from .finetune import FinetuneConfig, finetune, load_finetune_config
    from .train import TrainingError

    rename = {"model": "base_model", "steps": "max_steps"}
    given = {rename.get(k, k): (str(v) if isinstance(v, Path) else v) for k, v in given.items()}
    if resume is not None:
        cfg = load_finetune_config(resume)
        unchangeable = set(given) - {"max_steps", "checkpoint_every", "eval_every", "threads"}
        if unchangeable:
            flags = {v: k for k, v in rename.items()}
            named = ", ".join(sorted("--" + flags.get(k, k).replace("_", "-") for k in unchangeable))
            raise TrainingError(f"--resume continues a run as it was; only --steps and the intervals may change, not {named}")
        if "max_steps" in given:
            given["epochs"] = None  # an explicit step count replaces the epochs the run was started with
        cfg = dataclasses.replace(cfg, **given, out=str(resume))
    else:
        if not {"base_model", "data", "out"} <= set(given):
            raise TrainingError("--model, --data and --out are required (or --resume RUN)")
        if "max_steps" in given and "epochs" in given:
            raise TrainingError("give --steps or --epochs, not both")
        cfg = FinetuneConfig(**given)
    run = finetune(cfg, resume=resume is not None)
    best = run.extra.get("best_val_loss")
    note = f", best validation loss {best:.4f} at step {run.extra['best_step']}" if best is not None else ""
    stopped = " (stopped early)" if run.stop else ""
    typer.echo(f"fine-tuned {run.step} steps{stopped}{note}; model in {run.path / 'final'}")


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


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Option("--model", help="A palm model directory (e.g. RUN/final).")],
    corpus: Annotated[
        Optional[list[str]],
        typer.Option("--corpus", help="Perplexity and bits/byte on the held-out split of these corpora (a mixture spec)."),
    ] = None,
    tasks: Annotated[
        Optional[list[str]], typer.Option("--tasks", help="Task files (.jsonl or .yaml); comma-separated or repeated.")
    ] = None,
    harness: Annotated[
        Optional[list[str]], typer.Option("--harness", help="lm-evaluation-harness task names; comma-separated or repeated.")
    ] = None,
    include_path: Annotated[
        Optional[list[Path]], typer.Option("--include-path", help="Folder of lm-eval task YAMLs; repeatable.")
    ] = None,
    shots: Annotated[Optional[int], typer.Option("--shots", help="Examples shown before each question (tasks: 0 by default; harness: each task's own).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Chooses the few-shot examples.")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N examples of each task.")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Window length (default: the run's training length, else the context).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens between window starts (default: --seq-len).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Held-out tokens scored per corpus, at most.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Held-out share (default: the run's, else 0.05).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Token shards (default: the run's cache).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the results as JSON here.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
) -> None:
    """Measure a model: bits/byte on held-out text, few-shot tasks, lm-evaluation-harness tasks."""
    from .evaluate import EvaluationError

    if not (corpus or tasks or harness):
        raise EvaluationError("give --corpus, --tasks or --harness (or several)")
    if include_path and not harness:
        raise EvaluationError("--include-path only applies to --harness tasks")
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be positive, not {batch_size}")
    if threads is not None:
        import torch

        if threads < 1:
            raise EvaluationError(f"--threads must be positive, not {threads}")
        torch.set_num_threads(threads)
    from . import evaluate as ev

    report: dict = {"model": str(model)}
    loaded = None
    task_list = ev.load_tasks(tasks) if tasks else []  # a bad task file fails before the model loads
    if corpus or tasks:
        loaded = ev.load_model(model)
    if corpus:
        cfg = ev.CorpusEvalConfig(corpus=corpus, seq_len=seq_len, stride=stride, val_fraction=val_fraction,
                                  cache_dir=str(cache_dir) if cache_dir else None, max_tokens=max_tokens,
                                  batch_size=batch_size)
        scores = ev.evaluate_corpora(*loaded, cfg, model_dir=model, progress=sys.stderr.isatty())
        typer.echo(ev.corpus_table(scores))
        report["corpora"] = [s.to_dict() for s in scores]
    if task_list:
        results = [ev.evaluate_task(*loaded, t, shots=shots or 0, seed=seed, limit=limit, batch_size=batch_size)
                   for t in task_list]
        typer.echo(ev.task_table(results))
        report["tasks"] = results
    if harness:
        from lm_eval.utils import make_table

        results = ev.run_harness(model, ev.HarnessConfig(
            tasks=harness, include_path=[str(p) for p in include_path or []], shots=shots, limit=limit,
            batch_size=batch_size, seed=seed))
        typer.echo(make_table(results))
        report["harness"] = {k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results}
    if out is not None:
        ev.write_json(out, report)
        typer.echo(f"wrote {out}")


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


@app.command("plan")
def plan_command(
    preset: Annotated[Optional[str], typer.Option("--preset", help="tiny, small, base, palm-8b, palm-62b or palm-540b.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A model's config.json, or its folder, instead of --preset.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 2048,
    tokens: Annotated[float, typer.Option("--tokens", help="Training tokens, e.g. 780e9 (the paper's).")] = 780e9,
    device: Annotated[str, typer.Option("--device", help="tpu-v4, a100, h100, h200, cpu, or any name with --peak-tflops.")] = "tpu-v4",
    devices: Annotated[int, typer.Option("--devices", help="Number of chips.")] = 1,
    dp: Annotated[Optional[int], typer.Option("--dp", help="Replicated data-parallel degree (default: what is left).")] = None,
    fsdp: Annotated[Optional[int], typer.Option("--fsdp", help="Fully sharded data-parallel degree.")] = None,
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor (model) parallel degree.")] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="MFU to reckon the time at (the paper's 0.462).")] = 0.462,
    tokens_per_s: Annotated[Optional[float], typer.Option("--tokens-per-s", help="Observed throughput: report its MFU.")] = None,
    batch_tokens: Annotated[Optional[float], typer.Option("--batch-tokens", help="Tokens per forward/backward, all devices (default: one sequence per dp x fsdp rank).")] = None,
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", help="Peak bf16 TFLOP/s per device, overriding the table.")] = None,
    param_bytes: Annotated[int, typer.Option("--param-bytes", help="Bytes per stored weight (2: bf16, 4: fp32).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Parameters, FLOPs (PaLM Appendix B), per-device memory and training time for a model and a layout."""
    import json

    from .plan import make_plan, render

    overrides: dict = {}
    if config is not None:
        path = config / "config.json" if config.is_dir() else config
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}".splitlines()[0]) from None
        from .config import PalmConfig

        fields = set(PalmConfig.__annotations__)
        overrides = {k: v for k, v in raw.items() if k in fields} if isinstance(raw, dict) else {}
    elif preset is None:
        raise ConfigError("give --preset or --config")
    plan = make_plan(preset if config is None else None, seq_len, tokens, device, devices, dp, fsdp, tp, mfu,
                     tokens_per_s, batch_tokens, peak_tflops, overrides, param_bytes=param_bytes)
    typer.echo(plan.to_json() if as_json else render(plan))


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
