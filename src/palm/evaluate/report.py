"""The `palm eval` report: what was asked for, run on one loaded model, as a dict and as tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..weights import modeldir
from .errors import EvaluationError, require
from .harness import HarnessConfig, run_harness
from .perplexity import CorpusEvalConfig, TextScore, evaluate_corpora
from .scoring import evaluate_task
from .tasks import load_tasks

if TYPE_CHECKING:
    from ..model.model import PalmForCausalLM
    from ..text.tokenizer import PalmTokenizer

# lm-eval's results also carry its whole configuration and (when asked) every request: large, and
# not all of it JSON. These are the parts a report needs to be read and compared later.
HARNESS_KEYS = ("results", "versions", "n-shot", "configs")


def load_model(model_dir: str | Path, dtype: str = "auto") -> tuple[PalmForCausalLM, PalmTokenizer]:
    """A palm model directory's model (in eval mode, on the GPU if there is one) and tokenizer."""
    return modeldir.load_model(model_dir, dtype=dtype)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (floats to 4 places)."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = [[h.ljust(w) for h, w in zip(header, widths)], ["-" * w for w in widths]]
    lines += [[c.ljust(w) for c, w in zip(r, widths)] for r in cells]
    return "\n".join("  ".join(line).rstrip() for line in lines)


def corpus_table(scores: Sequence[TextScore]) -> str:
    return format_table(
        ["corpus", "tokens", "bytes", "perplexity", "bits/byte"],
        [(s.name, s.tokens, int(s.bytes), s.perplexity, s.bits_per_byte) for s in scores],
    )


def task_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per task and metric, then sacreBLEU's signature of each BLEU and chrF score shown."""
    rows = [
        (r["task"], r["kind"], r["shots"], r["examples"], metric, value)
        for r in results
        for metric, value in r["metrics"].items()
    ]
    signed = [f"{r['task']} {name}: {sig}" for r in results for name, sig in r.get("signatures", {}).items()]
    return "\n".join([format_table(["task", "kind", "shots", "n", "metric", "value"], rows), *signed])


@dataclass
class EvalRequest:
    """What `palm eval` is asked to measure. An empty part is not run; a None setting takes its default."""

    corpus: Sequence[str] = ()  # a mixture spec: bits per byte on each corpus's held-out split
    tasks: Sequence[str] = ()  # task files (.jsonl or .yaml), comma-separated or one per string
    harness: Sequence[str] = ()  # lm-eval task names
    include_path: Sequence[str | Path] = ()  # folders of lm-eval task YAMLs (harness only)
    shots: int | None = None  # tasks: 0 when None; harness: each task's own
    seed: int = 0  # chooses the few-shot examples
    limit: int | None = None  # the first N examples of each task
    seq_len: int | None = None  # corpus windows: the run's training length, else the model's context
    stride: int | None = None  # corpus windows: seq_len
    max_tokens: int | None = None  # held-out tokens scored per corpus, at most
    val_fraction: float | None = None  # the run's, else 0.05
    cache_dir: str | Path | None = None  # token shards: the run's cache, else beside the model
    batch_size: int = 8

    def __post_init__(self) -> None:
        # The command line hands over None for an option not given; it means the same as empty.
        for name in ("corpus", "tasks", "harness", "include_path"):
            if getattr(self, name) is None:
                setattr(self, name, ())

    def validate(self) -> None:
        """An EvaluationError for a request that cannot be run, before anything is loaded."""
        if not (self.corpus or self.tasks or self.harness):
            raise EvaluationError("give --corpus, --tasks or --harness (or several)")
        if self.include_path and not self.harness:
            raise EvaluationError("--include-path only applies to --harness tasks")
        if self.batch_size < 1:
            raise EvaluationError(f"--batch-size must be positive, not {self.batch_size}")

    def corpus_config(self) -> CorpusEvalConfig:
        return CorpusEvalConfig(
            corpus=list(self.corpus),
            seq_len=self.seq_len,
            stride=self.stride,
            val_fraction=self.val_fraction,
            max_tokens=self.max_tokens,
            batch_size=self.batch_size,
            cache_dir=str(self.cache_dir) if self.cache_dir else None,
        )

    def harness_config(self) -> HarnessConfig:
        return HarnessConfig(
            tasks=list(self.harness),
            include_path=[str(p) for p in self.include_path],
            shots=self.shots,
            limit=self.limit,
            batch_size=self.batch_size,
            seed=self.seed,
        )


def eval_report(
    model_dir: str | Path, request: EvalRequest, *, progress: bool = False, echo: Callable[[str], Any] | None = None
) -> tuple[dict[str, Any], str]:
    """(the report, as `palm eval --out` writes it; its tables as text) for one model directory.

    Everything that can be checked without the model is checked first, task files included, so a
    typo fails in a second rather than after a large model has loaded. The model loads once and
    serves the corpora and the tasks; lm-eval loads its own copy. `echo`, if given, is called with
    each table as soon as its part has run (the text returned holds them all); `progress` shows
    tokenizing progress for corpora not yet in the cache.
    """
    request.validate()
    task_list = load_tasks(request.tasks) if request.tasks else []
    report: dict[str, Any] = {"model": str(model_dir)}
    tables: list[str] = []

    def show(table: str) -> None:
        tables.append(table)
        if echo is not None:
            echo(table)

    if request.corpus or task_list:
        model, tokenizer = load_model(model_dir)
    if request.corpus:
        scores = evaluate_corpora(model, tokenizer, request.corpus_config(), model_dir=model_dir, progress=progress)
        show(corpus_table(scores))
        report["corpora"] = [s.to_dict() for s in scores]
    if task_list:
        results = [
            evaluate_task(
                model,
                tokenizer,
                t,
                shots=request.shots or 0,
                seed=request.seed,
                limit=request.limit,
                batch_size=request.batch_size,
            )
            for t in task_list
        ]
        show(task_table(results))
        report["tasks"] = results
    if request.harness:
        harness = run_harness(model_dir, request.harness_config())
        show(require("lm_eval.utils", "--harness", "lm-eval").make_table(harness))
        report["harness"] = {k: harness[k] for k in HARNESS_KEYS if k in harness}
    return report, "\n".join(tables)
