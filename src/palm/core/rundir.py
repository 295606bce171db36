"""The layout of a run folder, named in one place.

RUN/run.json            the run's settings (what `--resume` continues with)
RUN/metrics.jsonl       one JSON object per step (and per event: loss spikes, rewinds)
RUN/data.json           what the batches depend on: each corpus's fingerprint, the tokenizer's hash
RUN/tokenizer/          the tokenizer (pretraining)
RUN/base/               the starting model's config and tokenizer (fine-tuning)
RUN/checkpoints/step-N/ training checkpoints, newest last
RUN/best/               fine-tuning's weights with the lowest validation loss so far
RUN/final/              the finished model: a Transformers directory
RUN/adapter/            a LoRA fine-tuning run's adapter, in peft's format
RUN/curves.png          `palm plot`'s picture of the metrics
RUN/tensorboard/        --report-to tensorboard: event files (`tensorboard --logdir RUN/tensorboard`)
RUN/wandb/              --report-to wandb: offline runs (`wandb sync`) and the id a resumed run continues
RUN/mlflow/             --report-to mlflow: a SQLite store, its artifacts, and the id a resumed run continues
RUN/.lock               held by the process that trains the run
RUN/../.palm-cache/     token shards, shared by the runs beside this one
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

_STEP = re.compile(r"step-(\d+)")


def _entry(name: str):
    return field(init=False, compare=False, repr=False, metadata={"name": name})


@dataclass(frozen=True)
class RunLayout:
    root: Path
    settings: Path = _entry("run.json")
    metrics: Path = _entry("metrics.jsonl")
    data: Path = _entry("data.json")
    tokenizer: Path = _entry("tokenizer")
    base: Path = _entry("base")
    checkpoints: Path = _entry("checkpoints")
    best: Path = _entry("best")
    final: Path = _entry("final")
    adapter: Path = _entry("adapter")
    curves: Path = _entry("curves.png")
    tensorboard: Path = _entry("tensorboard")
    wandb: Path = _entry("wandb")
    mlflow: Path = _entry("mlflow")
    lock: Path = _entry(".lock")

    def __post_init__(self):
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        for entry in fields(self):
            if "name" in entry.metadata:
                object.__setattr__(self, entry.name, root / entry.metadata["name"])

    def default_cache(self) -> Path:
        return self.root.resolve().parent / ".palm-cache"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    @classmethod
    def of_model(cls, model_dir: str | Path) -> RunLayout | None:
        """The run whose RUN/final (or RUN/best) is `model_dir`, if it is one."""
        model_dir = Path(model_dir)
        layout = cls(model_dir.parent)
        return layout if model_dir.name in ("final", "best") and layout.settings.is_file() else None


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder holds, from its name; None for anything else (temporary folders)."""
    match = _STEP.fullmatch(path.name)
    return int(match.group(1)) if match else None
