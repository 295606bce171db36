"""palm finetune --eval-task/--select: RUN/best is the checkpoint best by the task's metric (not the lowest
validation loss), its metrics are logged and plotted, and they are what RUN/best generates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file

from palm.data.taskdata import Schema, read_task_rows
from palm.training.finetune import FinetuneConfig, finetune
from palm.training.selection import generations, metric_name, task_scores
from palm.weights.modeldir import load_model

ROWS = [{"article": f"item {i} costs {i + 3} coins today.", "highlights": f"item {i}: {i + 3} coins"} for i in range(8)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(model_dir, tmp_path, name, steps, **extra):
    data = write(tmp_path / "train.jsonl", ROWS)
    held = write(tmp_path / "held.jsonl", ROWS[:3])
    return FinetuneConfig.from_settings(
        dict(
            base_model=model_dir,
            data=str(data),
            val=str(data),
            out=str(tmp_path / name),
            task="summarize",
            eval_task=str(held),
            max_steps=steps,
            eval_every=1,
            batch_size=8,
            lr=3e-3,
            dropout=0.0,
            patience=None,
            progress=False,
            threads=1,
            dtype="fp32",
            **extra,
        )
    )


def records(run_dir):
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in json.loads(line)
    ]


def test_best_is_chosen_by_the_metric_where_the_lowest_loss_is_elsewhere(model_dir, tmp_path, monkeypatch):
    # The generations are scripted (right at the second evaluation only) so that the metric's best step is
    # known; the validation loss keeps falling, so the loss's best would be the last step.
    script = iter([["wrong"] * 3, [r["highlights"] for r in ROWS[:3]], ["wrong"] * 3])
    monkeypatch.setattr("palm.training.finetune.generations", lambda *a, **k: next(script))
    run = finetune(config(model_dir, tmp_path, "three", 3, select="rouge2"))
    logged = records(tmp_path / "three")
    assert [r["eval/rouge2"] for r in logged] == [0.0, 1.0, 0.0]
    assert logged[2]["val_loss"] < logged[1]["val_loss"]  # by loss, step 3 would have been kept
    assert run.extra["best_step"] == 2 and logged[-1]["best/rouge2"] == 1.0
    script = iter([["wrong"] * 3, [r["highlights"] for r in ROWS[:3]]])
    finetune(config(model_dir, tmp_path, "two", 2, select="rouge2"))  # the same run, stopped at step 2
    best, at_two = (
        load_file(tmp_path / "three" / "best" / "model.safetensors"),
        load_file(tmp_path / "two" / "final" / "model.safetensors"),
    )
    assert all(torch.equal(best[k], at_two[k]) for k in at_two)
    final = load_file(tmp_path / "three" / "final" / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in final)


def test_the_logged_metrics_are_what_best_generates(model_dir, tmp_path, capsys):
    cfg = config(model_dir, tmp_path, "real", 2)
    finetune(cfg)
    logged = records(tmp_path / "real")
    assert {"eval/rouge1", "eval/rouge2", "eval/rouge_l", "eval/rouge_lsum", "best/rouge2"} <= set(logged[-1])
    step = logged[-1]["best_step"]
    model, tok = load_model(tmp_path / "real" / "best", device="cpu", dtype="fp32")
    rows = read_task_rows(tmp_path / "held.jsonl", Schema("summarize"))
    predictions = generations(model, tok, rows, max_new_tokens=64, context=model.config.max_position_embeddings)
    want = next(r for r in logged if r["step"] == step)
    assert task_scores(predictions, rows, ["rouge1", "rouge2"]) == pytest.approx(
        {"rouge1": want["eval/rouge1"], "rouge2": want["eval/rouge2"]}
    )
    code, out, err = run_cli(capsys, "plot", str(tmp_path / "real"))
    assert code == 0 and (tmp_path / "real" / "curves.png").stat().st_size > 0, err


def test_select_names_and_bad_settings(model_dir, tmp_path, capsys):
    assert metric_name("exact") == "exact_match" and metric_name("chrf") == "chrf" and metric_name("rouge2") == "rouge2"
    data = write(tmp_path / "d.jsonl", ROWS)
    base = ["finetune", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "1"]
    for extra, words in [
        (["--task", "summarize", "--eval-task", str(data), "--select", "meteor"], "'meteor'"),
        (["--eval-task", str(data)], "give --task"),
        (["--task", "summarize", "--select", "f1"], "--eval-task"),
        (["--task", "summarize", "--eval-task", str(tmp_path / "nope.jsonl")], "nope.jsonl"),
    ]:
        code, _, err = run_cli(capsys, *base, *extra)
        assert_one_line_error(code, err, words)


@pytest.mark.parametrize(
    "extra",
    [
        dict(dtype="bf16", activation_checkpointing="full", micro_batch_size=4),
        dict(compile=True, lora_r=4, optimizer="adamw"),
    ],
    ids=["bf16-checkpointing-microbatches", "compiled-lora"],
)
def test_selection_runs_with_the_other_options(model_dir, tmp_path, extra):
    cfg = config(model_dir, tmp_path, "opts", 2, **{k: v for k, v in extra.items() if k != "dtype"})
    cfg.loop.dtype = extra.get("dtype", cfg.loop.dtype)
    run = finetune(cfg)
    logged = records(tmp_path / "opts")
    assert [r["step"] for r in logged] == [1, 2] and all("eval/rouge2" in r for r in logged)
    assert run.extra["best_step"] in (1, 2) and (tmp_path / "opts" / "final" / "config.json").is_file()
