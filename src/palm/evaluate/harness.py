"""lm-evaluation-harness on a palm directory: its `hf` model, run in this process.

In this process palm is imported, so the Auto classes know the model type and lm-eval needs no
`trust_remote_code`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.runtime import pick_device, pick_dtype
from ..weights.modeldir import check_model_dir
from .errors import EvaluationError, TaskError, require
from .tasks import split_names


@dataclass
class HarnessConfig:
    """Which lm-eval tasks to run on a palm directory, and how."""

    tasks: list[str]
    include_path: list[str] = field(default_factory=list)
    shots: int | None = None  # None: each task's own num_fewshot
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    device: str | None = None  # None: cuda if there is one, else cpu
    dtype: str = "auto"  # palm's choice (bf16 where native, else fp32), or "bf16" / "fp32"
    bootstrap_iters: int = 1000  # lm-eval's default, 100000, takes minutes for chrF/BLEU stderr on a CPU
    log_samples: bool = False  # keep every request's inputs and outputs in results["samples"]


def _task_manager(include_path: list[str], names: list[str]) -> Any:
    """An lm-eval TaskManager that knows every task in `names`, or a TaskError naming those it lacks."""
    tasks = require("lm_eval.tasks", "--harness", "lm-eval")
    manager = None
    if include_path:
        # Indexing lm-eval's own ~15,000 task files takes about 20 s; the local folders alone take none.
        manager = tasks.TaskManager(include_path=list(include_path), include_defaults=False)
    if manager is None or any(not manager.match_tasks([n]) for n in names):
        manager = tasks.TaskManager(include_path=list(include_path) or None)
    missing = [n for n in names if not manager.match_tasks([n])]
    if missing:
        raise TaskError(f"lm-eval knows no task {', '.join(missing)} (add its YAML folder with --include-path)")
    return manager


def run_harness(model_dir: str | Path, cfg: HarnessConfig) -> dict[str, Any]:
    """lm-evaluation-harness's `hf` model on a palm directory, in this process; lm-eval's results dict."""
    lm_eval = require("lm_eval", "--harness", "lm-eval")
    model_dir = check_model_dir(model_dir)
    for folder in cfg.include_path:
        if not Path(folder).is_dir():
            raise TaskError(f"--include-path {folder} is not a folder")
    names = split_names(cfg.tasks)
    if not names:
        raise TaskError("no harness task given")
    manager = _task_manager(cfg.include_path, names)
    device = pick_device(cfg.device)
    dtype = str(pick_dtype(cfg.dtype, device)).removeprefix("torch.")
    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype, "backend": "causal"},
            tasks=names,
            num_fewshot=cfg.shots,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            device=str(device),
            task_manager=manager,
            bootstrap_iters=cfg.bootstrap_iters,
            log_samples=cfg.log_samples,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TaskError(
            f"lm-eval could not run {', '.join(names)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if results is None:
        raise EvaluationError("lm-eval returned no results")
    return results
