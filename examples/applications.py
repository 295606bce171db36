"""What the three application examples share (summarize.py, qa.py, translate.py): write the data in its
public data set's schema, score a simple baseline and the model before fine-tuning, fine-tune it with
`palm finetune` (every weight, and LoRA) choosing RUN/best by the task's metric on a dev split, and score
each result on the test split with `palm eval`'s metrics. The table goes to OUT/results.md and .json.

Every number is measured on the test split, which neither fine-tuning nor the checkpoint choice sees.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from palm.data.taskdata import Schema, TaskRow, read_task_rows
from palm.evaluate import evaluate_task, load_model, load_task
from palm.evaluate.metrics import GENERATION_METRICS

RECIPES = {
    "full": ["--lr", "1e-2", "--dropout", "0"],
    # AdamW for the adapters: peft starts B at zero and Adafactor's step is relative to a tensor's scale.
    "lora": [
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0",
        "--optimizer",
        "adamw",
        "--lr",
        "3e-3",
        "--dropout",
        "0",
    ],
}


@dataclass
class Application:
    task: str  # palm finetune --task
    metrics: list[str]  # reported, the first is what RUN/best is chosen by
    baseline_name: str
    baseline: Callable[[TaskRow, list[TaskRow]], str]  # (test row, training rows) -> prediction
    source: str  # where the data came from, for the table
    group: Callable[[dict], str] | None = None  # rows that must share a split
    schema_flags: list[str] = field(default_factory=list)  # --source-lang/--target-lang
    max_new_tokens: int = 48
    steps: int = 1000  # fine-tuning steps of batch 16: a few minutes on 2 cores for the demo model


def arguments(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="demo/run/final",
        help="the palm model to fine-tune (any palm directory, an imported one included); it is not modified",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the example's own)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recipes", default="full,lora")
    ap.add_argument("--data-only", action="store_true", help="write the data files and stop")
    return ap.parse_args()


def split(
    rows: list[dict], group: Callable[[dict], str] | None = None, seed: int = 0, test: int = 150, dev: int = 50
) -> dict[str, list[dict]]:
    """Seeded test, dev and train splits; rows of one group (one function's questions) stay in one split."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row) if group else str(len(groups)), []).append(row)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    out: dict[str, list[dict]] = {"test": [], "dev": [], "train": []}
    for members in order:
        name = "test" if len(out["test"]) < test else "dev" if len(out["dev"]) < dev else "train"
        out[name] += members
    return out


def write_data(out: Path, splits: dict[str, list[dict]], app: Application) -> dict[str, Path]:
    """OUT/data/{train,dev,test}.jsonl in the data set's schema, and test.yaml: the test split as a
    `palm eval` task (the prompts rendered by the task's template, every reference kept)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = data / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    test = read_task_rows(paths["test"], schema(app))
    (data / "test-task.jsonl").write_text(
        "".join(json.dumps({"prompt": r.prompt(), "answer": r.references}, ensure_ascii=False) + "\n" for r in test),
        encoding="utf-8",
    )
    paths["task"] = data / "test.yaml"
    paths["task"].write_text(
        yaml.safe_dump(
            {
                "name": f"{app.task}-test",
                "file": "test-task.jsonl",
                "kind": "generate",
                "metric": app.metrics,
                "max_new_tokens": app.max_new_tokens,
                "stop": ["\n"],
            },
            sort_keys=False,
        ),
        encoding="utf-8",
    )
    return paths


def schema(app: Application) -> Schema:
    flags = dict(zip(app.schema_flags[::2], app.schema_flags[1::2]))
    return Schema(app.task, source_lang=flags.get("--source-lang"), target_lang=flags.get("--target-lang"))


def scored(model_dir: str | Path, task_file: Path) -> dict[str, float]:
    model, tokenizer = load_model(model_dir)
    return evaluate_task(model, tokenizer, load_task(task_file), batch_size=25, samples=False)["metrics"]


def run(app: Application, rows: list[dict], doc: str) -> None:
    args = arguments(doc)
    args.steps = args.steps or app.steps
    out = Path(args.out)
    paths = write_data(out, split(rows, app.group), app)
    sizes = {k: sum(1 for _ in open(paths[k], encoding="utf-8")) for k in ("train", "dev", "test")}
    print(
        f"wrote {paths['train']} ({sizes['train']} rows), dev {sizes['dev']}, test {sizes['test']}, and {paths['task']}"
    )
    if args.data_only:
        return
    train, test = (read_task_rows(paths[k], schema(app)) for k in ("train", "test"))
    guesses = [app.baseline(r, train) for r in test]
    table = [
        {
            "model": f"baseline: {app.baseline_name}",
            "minutes": 0.0,
            **{m: GENERATION_METRICS[m](guesses, [r.references for r in test]) for m in app.metrics},
        }
    ]
    table.append({"model": f"{args.model}, before fine-tuning", "minutes": 0.0, **scored(args.model, paths["task"])})
    for recipe in args.recipes.split(","):
        run_dir = out / recipe
        cmd = [
            sys.executable,
            "-m",
            "palm.cli",
            "finetune",
            "--model",
            args.model,
            "--data",
            str(paths["train"]),
            "--out",
            str(run_dir),
            "--task",
            app.task,
            *app.schema_flags,
            "--eval-task",
            str(paths["dev"]),
            "--select",
            app.metrics[0],
            "--eval-max-new-tokens",
            str(app.max_new_tokens),
            "--steps",
            str(args.steps),
            "--batch-size",
            "16",
            "--seq-len",
            "192",
            "--eval-every",
            str(max(1, args.steps // 5)),
            "--patience",
            "100",
            *RECIPES[recipe],
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
        shutil.rmtree(run_dir, ignore_errors=True)  # the example's own earlier run
        print("$", " ".join(cmd[2:]).replace("palm.cli", "palm"), flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        minutes = (time.time() - start) / 60
        table.append(
            {
                "model": f"fine-tuned ({recipe}, {args.steps} steps)",
                "minutes": round(minutes, 1),
                **scored(run_dir / "final", paths["task"]),
            }
        )
    write_table(out, app, table, sizes)


def write_table(out: Path, app: Application, table: list[dict], sizes: dict[str, int]) -> None:
    head = ["model", *app.metrics, "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [
            row["model"],
            *(f"{row[m]:.3f}" if m not in ("bleu", "chrf", "chrf++") else f"{row[m]:.1f}" for m in app.metrics),
            f"{row['minutes']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"{app.task}: {app.source}; {sizes['train']} training rows, {sizes['test']} test rows (scored), "
        f"RUN/best chosen by {app.metrics[0]} on {sizes['dev']} dev rows."
    )
    text = "\n".join([note, "", *lines]) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"task": app.task, "sizes": sizes, "table": table}, indent=1), encoding="utf-8"
    )
    print(text)
