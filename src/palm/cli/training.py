"""Commands that make models: palm tokenizer train, init, train, finetune."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..core.runtime import torch_threads
from .app import Force, app, given, tokenizer_app

TextColumn = Annotated[
    Optional[str],
    typer.Option(
        "--text-column", help="The field or column of JSONL, Parquet and Arrow rows that holds the text (default text)."
    ),
]
SampleBytes = Annotated[
    Optional[str],
    typer.Option(
        "--sample-bytes",
        help="Train the tokenizer on this much text, documents chosen by a hash of their position (default 200MB).",
    ),
]

ReportTo = Annotated[
    Optional[str],
    typer.Option(
        "--report-to",
        help="Also log every step to tensorboard, wandb (offline) or mlflow (a local store), in the run folder; "
        'comma-separated for several, or none (default). Needs pip install -e ".[tracking]".',
    ),
]


def use_persistent_compile_cache() -> None:
    """Keep torch.compile's caches where /tmp cleaning does not reach, so a resumed or repeated run
    reuses the compiled block instead of compiling it again (minutes on a small CPU)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "palm" / "torch-compile"))


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: Annotated[
        list[Path],
        typer.Option(
            "--corpus",
            help="Text, JSONL, Parquet or Arrow file (.gz/.zst too), or a folder of them, or a save_to_disk folder; repeatable.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the tokenizer to.")],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Vocabulary size, specials and bytes included.")
    ] = 8192,
    text_column: TextColumn = None,
    sample_bytes: SampleBytes = None,
    force: Force = False,
) -> None:
    """Train a lossless PaLM vocabulary (digits split, UTF-8 byte fallback) on a sample of a corpus."""
    from ..core.atomic import atomic_directory
    from ..data.corpora import CorpusPart
    from ..data.documents import corpus_files
    from ..data.subsample import DEFAULT_SAMPLE_BYTES, parse_size, sample_corpora
    from ..text.tokenizer import train_tokenizer

    budget = parse_size(sample_bytes, "--sample-bytes") if sample_bytes is not None else DEFAULT_SAMPLE_BYTES
    corpus_files(corpus)  # every path exists, before any is read
    parts = [CorpusPart(str(path), 1.0, "path", text_column or "text") for path in corpus]
    sample = sample_corpora(parts, budget, progress=sys.stderr.isatty())
    tok = train_tokenizer(lambda: sample.texts, vocab_size)
    with atomic_directory(out, overwrite=force) as tmp:
        tok.save(tmp)
    typer.echo(sample.line())
    typer.echo(f"wrote a {len(tok)}-token vocabulary to {out}")


@contextmanager
def _data_lines():
    """palm.data's records (what sampling and tokenizing the corpora took), held and shown on stderr by
    the `flush` this yields, which the train command calls at its first step: a run that fails before
    it trains shows its one error line alone."""
    held: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: held.append(record.getMessage())
    log = logging.getLogger("palm.data")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)

    def flush(*_) -> None:
        for line in held:
            typer.echo(f"palm: {line}", err=True)
        held.clear()

    try:
        yield flush
        flush()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@app.command("init")
def init_model(
    preset: Annotated[str, typer.Option("--preset", help="tiny, small, base, 1b, palm-8b, palm-62b or palm-540b.")],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="Folder of a palm tokenizer.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model to.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    force: Force = False,
) -> None:
    """Write a randomly initialised model with its tokenizer, loadable by AutoModelForCausalLM."""
    from ..weights.modeldir import init_model_dir

    n_params = init_model_dir(preset, tokenizer, out, seed=seed, overwrite=force)
    typer.echo(f"wrote a {n_params / 1e6:.1f}M-parameter {preset} model to {out}")


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
    compile: Annotated[
        Optional[bool], typer.Option("--compile/--no-compile", help="Compile each block (regional).")
    ] = None,
    activation_checkpointing: Annotated[
        Optional[str], typer.Option("--activation-checkpointing", help="none, full or selective.")
    ] = None,
    parallel: Annotated[Optional[str], typer.Option("--parallel", help="none, or ddp / fsdp under torchrun.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    report_to: ReportTo = None,
    text_column: TextColumn = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            help="Processes that tokenize the corpora (per rank under torchrun; default: the processors available).",
        ),
    ] = None,
    sample_bytes: SampleBytes = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue this run (--max-steps extends it).")
    ] = None,
    allow_data_change: Annotated[
        bool, typer.Option("--allow-data-change", help="Resume even though the corpus changed (not exact).")
    ] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML or YAML file with the same keys.")] = None,
) -> None:
    """Pretrain a PaLM with the paper's recipe; the result is RUN/final, a Transformers directory."""
    flags = given(locals(), "resume", "config", "allow_data_change")  # first, while locals() holds only the options
    from ..core import settings
    from ..data.subsample import parse_size
    from ..training import distributed
    from ..training.tracking import tracker_names
    from ..training.train import TrainConfig, TrainingError, load_run_config, train

    if "sample_bytes" in flags:
        flags["sample_bytes"] = parse_size(flags["sample_bytes"], "--sample-bytes")
    if "report_to" in flags:
        flags["report_to"] = tracker_names(flags["report_to"])
    if resume is not None:
        cfg = load_run_config(resume).resumed(flags)
        cfg.out = str(resume)
    else:
        values = {**(settings.read_file(config) if config else {}), **flags}
        if not values.get("corpus") or not values.get("out"):
            raise TrainingError("--corpus and --out are required (or --resume RUN)")
        if isinstance(values["corpus"], str):
            values["corpus"] = [values["corpus"]]
        if isinstance(values.get("report_to"), str):  # a config file's "tensorboard,wandb"
            values["report_to"] = tracker_names(values["report_to"])
        cfg = TrainConfig.from_settings(values)
    cfg.validate()  # before anything runs, threads included
    if cfg.loop.compile:
        use_persistent_compile_cache()
    with torch_threads(cfg.loop.threads), _data_lines() as flush:
        run = train(cfg, resume=resume is not None, allow_data_change=allow_data_change, on_step=flush)
    steps, where, main = run.step, run.layout, run.world.is_main
    del run  # the model and optimizer hold the process group; drop them before leaving it
    distributed.teardown()
    if main:
        typer.echo(f"trained {steps} steps; model in {where.final}, metrics in {where.metrics}")


@app.command("finetune")
def finetune_command(
    model: Annotated[Optional[Path], typer.Option("--model", help="The model directory to start from.")] = None,
    data: Annotated[
        Optional[Path],
        typer.Option(
            "--data",
            help='JSONL rows {"prompt": ..., "completion": ...}; with --task also Parquet, Arrow, save_to_disk folders, .tsv, .gz/.zst.',
        ),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder; the model lands in RUN/final.")] = None,
    task: Annotated[
        Optional[str],
        typer.Option(
            "--task",
            help="summarize, qa or translate: rows in their data set's schema (CNN/DailyMail, XSum, LCSTS, SQuAD, CMRC 2018, WMT, .tsv pairs, prompt/completion), with the task's prompt template.",
        ),
    ] = None,
    columns: Annotated[
        Optional[str],
        typer.Option(
            "--columns",
            help="With --task: FIELD=COLUMN,... for other schemas (document, summary; context, question, answer; source, target).",
        ),
    ] = None,
    source_lang: Annotated[
        Optional[str], typer.Option("--source-lang", help="--task translate: the source language's code (en, zh, ...).")
    ] = None,
    target_lang: Annotated[
        Optional[str], typer.Option("--target-lang", help="--task translate: the target language's code.")
    ] = None,
    format: Annotated[
        Optional[str],
        typer.Option("--format", help='completion (prompt/completion rows) or chat ({"messages": [...]} rows).'),
    ] = None,
    lora_r: Annotated[
        Optional[int], typer.Option("--lora-r", help="Train rank-R LoRA adapters (peft) instead of every weight.")
    ] = None,
    lora_alpha: Annotated[
        Optional[float], typer.Option("--lora-alpha", help="LoRA scale numerator (default 16).")
    ] = None,
    lora_dropout: Annotated[
        Optional[float], typer.Option("--lora-dropout", help="Dropout on the adapters' input (default 0.05).")
    ] = None,
    lora_targets: Annotated[
        Optional[str], typer.Option("--lora-targets", help="Comma-separated: in_proj,attn_out,mlp_out (default all).")
    ] = None,
    val: Annotated[
        Optional[Path], typer.Option("--val", help="Validation rows (default: hold out 5% of --data).")
    ] = None,
    eval_task: Annotated[
        Optional[Path],
        typer.Option(
            "--eval-task",
            help="With --task: held-out rows generated on at each evaluation; RUN/best is the checkpoint best by --select.",
        ),
    ] = None,
    select: Annotated[
        Optional[str],
        typer.Option(
            "--select",
            help="The metric RUN/best is chosen by: rouge2, f1, exact, bleu, chrf, ... (default: rouge2 / f1 / bleu by task).",
        ),
    ] = None,
    eval_max_new_tokens: Annotated[
        Optional[int], typer.Option("--eval-max-new-tokens", help="Tokens generated per --eval-task row (default 64).")
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default 500).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over --data instead of --steps.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Rows per step.")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="0.1 as in the paper.")] = None,
    patience: Annotated[
        Optional[int], typer.Option("--patience", help="Evaluations without a better validation loss before stopping.")
    ] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Longest row in tokens.")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="palm (Adafactor) or adamw.")] = None,
    hold_steps: Annotated[Optional[int], typer.Option("--hold-steps")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    micro_batch_size: Annotated[
        Optional[int],
        typer.Option("--micro-batch-size", help="Rows per forward pass; the rest is gradient accumulation."),
    ] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto, bf16 or fp32.")] = None,
    compile: Annotated[
        Optional[bool], typer.Option("--compile/--no-compile", help="Compile each block (regional).")
    ] = None,
    activation_checkpointing: Annotated[
        Optional[str], typer.Option("--activation-checkpointing", help="none, full or selective.")
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.")] = None,
    report_to: ReportTo = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run (--steps extends it).")] = None,
    allow_data_change: Annotated[
        bool, typer.Option("--allow-data-change", help="Resume even though --data changed (not exact).")
    ] = False,
) -> None:
    """Fine-tune on prompt/completion pairs (loss on the completion only); the result is RUN/final."""
    flags = given(locals(), "resume", "allow_data_change", rename={"model": "base_model", "steps": "max_steps"})
    from ..training.finetune import FinetuneConfig, TrainingError, finetune, load_finetune_config
    from ..training.tracking import tracker_names

    if "report_to" in flags:
        flags["report_to"] = tracker_names(flags["report_to"])
    if "lora_targets" in flags:
        flags["lora_targets"] = [t.strip() for t in flags["lora_targets"].split(",") if t.strip()]

    if resume is not None:
        cfg = load_finetune_config(resume).resumed(flags)
        cfg.out = str(resume)
    else:
        if not {"base_model", "data", "out"} <= set(flags):
            raise TrainingError("--model, --data and --out are required (or --resume RUN)")
        if "max_steps" in flags and "epochs" in flags:
            raise TrainingError("give --steps or --epochs, not both")
        cfg = FinetuneConfig.from_settings(flags)
    cfg.validate()
    if cfg.loop.compile:
        use_persistent_compile_cache()
    with torch_threads(cfg.loop.threads):
        run = finetune(cfg, resume=resume is not None, allow_data_change=allow_data_change)
    best, chosen = run.extra.get("best_val_loss"), cfg.selected()
    note = f", best validation loss {best:.4f} at step {run.extra['best_step']}" if best is not None else ""
    if chosen is not None and run.extra.get("best_metric") is not None:
        note = f", best {chosen} {run.extra['best_metric']:.4f} at step {run.extra['best_step']} (in {run.layout.best})"
    stopped = " (stopped early)" if run.stop else ""
    adapter = (
        f", LoRA adapter ({run.extra['trainable_params']:,} parameters) in {run.layout.adapter}" if cfg.lora_r else ""
    )
    typer.echo(f"fine-tuned {run.step} steps{stopped}{note}; model in {run.layout.final}{adapter}")
