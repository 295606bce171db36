"""Commands about runs, before and after: palm plan (what a run at scale needs), palm plot (what a run did)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..model.config import ConfigError
from .app import app


@app.command("plot")
def plot_command(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG path (default RUN/curves.png).")] = None,
) -> None:
    """Draw a run's loss, validation and learning-rate curves to a PNG."""
    from ..core.rundir import RunLayout
    from ..training.plot import plot_run

    skipped: list[int] = []
    written = plot_run(run, out, skipped)
    for number in skipped:
        typer.echo(
            f"palm: warning: {RunLayout(run).metrics}:{number} is torn (a run killed while writing it?); "
            "the plot leaves it out",
            err=True,
        )
    typer.echo(f"wrote {written}")


@app.command("plan")
def plan_command(
    preset: Annotated[
        Optional[str], typer.Option("--preset", help="tiny, small, base, palm-8b, palm-62b or palm-540b.")
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", help="A model's config.json, or its folder, instead of --preset.")
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 2048,
    tokens: Annotated[float, typer.Option("--tokens", help="Training tokens, e.g. 780e9 (the paper's).")] = 780e9,
    device: Annotated[
        str, typer.Option("--device", help="tpu-v4, a100, h100, h200, cpu, or any name with --peak-tflops.")
    ] = "tpu-v4",
    devices: Annotated[int, typer.Option("--devices", help="Number of chips.")] = 1,
    dp: Annotated[
        Optional[int], typer.Option("--dp", help="Replicated data-parallel degree (default: what is left).")
    ] = None,
    fsdp: Annotated[Optional[int], typer.Option("--fsdp", help="Fully sharded data-parallel degree.")] = None,
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor (model) parallel degree.")] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="MFU to reckon the time at (the paper's 0.462).")] = 0.462,
    tokens_per_s: Annotated[
        Optional[float], typer.Option("--tokens-per-s", help="Observed throughput: report its MFU.")
    ] = None,
    batch_tokens: Annotated[
        Optional[float],
        typer.Option(
            "--batch-tokens",
            help="Tokens per forward/backward, all devices (default: one sequence per dp x fsdp rank).",
        ),
    ] = None,
    peak_tflops: Annotated[
        Optional[float], typer.Option("--peak-tflops", help="Peak bf16 TFLOP/s per device, overriding the table.")
    ] = None,
    param_bytes: Annotated[int, typer.Option("--param-bytes", help="Bytes per stored weight (2: bf16, 4: fp32).")] = 2,
    compute_copies: Annotated[
        bool,
        typer.Option(
            "--compute-copies",
            help="fp32 weights computed on as bf16 copies, as palm train runs bf16 on one process (with --param-bytes 4).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Parameters, FLOPs (PaLM Appendix B), per-device memory and training time for a model and a layout."""
    import json

    from ..training.plan import make_plan, render

    overrides: dict = {}
    if config is not None:
        path = config / "config.json" if config.is_dir() else config
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}".splitlines()[0]) from None
        from ..model.config import PalmConfig
        from ..weights.modeldir import check_config

        if not isinstance(raw, dict):
            raise ConfigError(f"{path} is not a JSON object")
        check_config(path, raw)  # each of palm's fields of its type, a consistent shape: one line, never a traceback
        fields = set(PalmConfig.__annotations__)
        overrides = {k: v for k, v in raw.items() if k in fields} if isinstance(raw, dict) else {}
    elif preset is None:
        raise ConfigError("give --preset or --config")
    plan = make_plan(
        preset if config is None else None,
        seq_len,
        tokens,
        device,
        devices,
        dp,
        fsdp,
        tp,
        mfu,
        tokens_per_s,
        batch_tokens,
        peak_tflops,
        overrides,
        param_bytes=param_bytes,
        compute_copies=compute_copies,
    )
    typer.echo(plan.to_json() if as_json else render(plan))
