"""The three application examples (examples/summarize.py, qa.py, translate.py): their data is in the public
schema it claims and reads back through palm.data.taskdata, and one runs end to end on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from palm.data.taskdata import Schema, read_task_rows

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KEYS = {
    "summarize": {"id", "article", "highlights"},
    "qa": {"id", "context", "question", "answers"},
    "translate": {"id", "translation"},
}


def example(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=EXAMPLES.parent,
    )


@pytest.mark.parametrize("name", list(KEYS))
def test_the_data_is_in_its_schema_and_splits_are_disjoint(name, tmp_path):
    example(name, "--out", str(tmp_path), "--data-only")
    splits = {
        k: [json.loads(line) for line in open(tmp_path / "data" / f"{k}.jsonl", encoding="utf-8")]
        for k in ("train", "dev", "test")
    }
    assert len(splits["train"]) > 500 and len(splits["test"]) >= 150 and len(splits["dev"]) >= 50
    assert all(set(row) == KEYS[name] for rows in splits.values() for row in rows)
    ids = [{r["id"].rsplit(".", 1)[0] if name == "qa" else r["id"] for r in rows} for rows in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    langs = dict(source_lang="en", target_lang="zh") if name == "translate" else {}
    rows = read_task_rows(tmp_path / "data" / "test.jsonl", Schema(name, **langs))
    assert len(rows) == len(splits["test"]) and all(r.completion for r in rows)
    if name == "qa":  # SQuAD's answer_start points at the answer in the context
        assert all(
            r["context"][r["answers"]["answer_start"][0] :].startswith(r["answers"]["text"][0]) for r in splits["test"]
        )


def test_an_example_runs_end_to_end_and_writes_its_table(model_dir, tmp_path):
    done = example(
        "qa", "--model", model_dir, "--out", str(tmp_path), "--steps", "2", "--recipes", "lora", "--threads", "1"
    )
    results = json.loads((tmp_path / "results.json").read_text())
    models = [r["model"] for r in results["table"]]
    assert models[0].startswith("baseline") and "before" in models[1] and "lora" in models[2]
    assert all({"f1", "exact_match"} <= set(r) for r in results["table"])
    assert results["table"][0]["f1"] > 0  # the first sentence holds the answer among other words
    assert "| model | f1 | exact_match | minutes |" in done.stdout
