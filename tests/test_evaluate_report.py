"""palm.evaluate.report: `eval_report` checks a request before loading anything, and reports what the parts compute."""

import json
import shutil

import pytest

import palm.evaluate.report as report_module
from palm.evaluate import (
    CorpusEvalConfig,
    EvalRequest,
    EvaluationError,
    TaskError,
    corpus_table,
    eval_report,
    evaluate_corpora,
    evaluate_task,
    load_model,
    load_task,
    task_table,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tasks_in(folder):
    """A generation task (YAML, with a few-shot split) and a multiple-choice one (JSONL)."""
    write_jsonl(
        folder / "test.jsonl", [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(6)]
    )
    write_jsonl(folder / "train.jsonl", [{"prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(50, 56)])
    yaml = folder / "arith.yaml"
    yaml.write_text(
        'file: test.jsonl\nkind: generate\ntemplate: "Q: {prompt}\\nA:"\ntarget_delimiter: " "\n'
        "fewshot_file: train.jsonl\nmax_new_tokens: 4\n",
        encoding="utf-8",
    )
    mc = write_jsonl(
        folder / "mc.jsonl",
        [{"prompt": f"{i} + {i} =", "choices": [f" {2 * i}", f" {2 * i + 1}"], "answer": 0} for i in range(4)],
    )
    return yaml, mc


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the report loads a model."""

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the request was checked")

    monkeypatch.setattr(report_module, "load_model", refuse)


@pytest.mark.parametrize(
    "request_fields,error,words",
    [
        ({}, EvaluationError, "--corpus, --tasks or --harness"),
        ({"tasks": ["{ok}"], "include_path": ["{dir}"]}, EvaluationError, "--include-path only applies to --harness"),
        ({"tasks": ["{ok}"], "batch_size": 0}, EvaluationError, "--batch-size must be positive"),
        ({"tasks": ["{ok},{missing}"]}, TaskError, "does not exist"),
        ({"tasks": ["{bad}"], "corpus": ["nowhere-corpus"]}, TaskError, '"answer"'),
        ({"tasks": [","]}, TaskError, "no task given"),
    ],
    ids=[
        "nothing-asked",
        "include-path-without-harness",
        "batch-size",
        "missing-task-file",
        "bad-task-file",
        "no-task",
    ],
)
def test_a_bad_request_fails_before_any_model_loads(no_model, tmp_path, request_fields, error, words):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "1 + 1 =", "answer": "2"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1 + 1 ="}])
    names = {"ok": ok, "bad": bad, "missing": tmp_path / "missing.jsonl", "dir": tmp_path}
    fields = {k: [v.format(**names) for v in vs] if isinstance(vs, list) else vs for k, vs in request_fields.items()}
    # The model directory does not exist either: had it been looked at, the error would be a CheckpointError.
    with pytest.raises(error, match=words) as info:
        eval_report(tmp_path / "no-model-here", EvalRequest(**fields))
    assert "\n" not in str(info.value)


def test_none_means_not_asked(no_model, tmp_path):
    """The command line passes None for an option it was not given."""
    request = EvalRequest(corpus=None, tasks=None, harness=None, include_path=None)
    assert (request.corpus, request.tasks, request.harness, request.include_path) == ((), (), (), ())
    with pytest.raises(EvaluationError, match="--corpus, --tasks or --harness"):
        eval_report(tmp_path, request)


def test_the_report_holds_what_the_parts_compute(monkeypatch, model_dir, corpus_dir, tmp_path):
    yaml, mc = tasks_in(tmp_path)
    loads = []
    real_load = report_module.load_model
    monkeypatch.setattr(report_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    shown = []
    request = EvalRequest(
        corpus=[str(corpus_dir)],
        tasks=[f"{yaml},{mc}"],
        shots=2,
        seed=3,
        limit=4,
        seq_len=64,
        stride=32,
        max_tokens=300,
        cache_dir=tmp_path / "cache",
        batch_size=3,
    )
    report, text = eval_report(model_dir, request, echo=shown.append)
    assert len(loads) == 1  # one model serves the corpora and the tasks

    model, tokenizer = load_model(model_dir)
    scores = evaluate_corpora(
        model,
        tokenizer,
        CorpusEvalConfig(
            corpus=[str(corpus_dir)],
            seq_len=64,
            stride=32,
            max_tokens=300,
            cache_dir=str(tmp_path / "cache"),
            batch_size=3,
        ),
        model_dir=model_dir,
    )
    tasks = [
        evaluate_task(model, tokenizer, load_task(path), shots=2, seed=3, limit=4, batch_size=3) for path in (yaml, mc)
    ]
    assert report["model"] == str(model_dir)
    assert report["corpora"] == [s.to_dict() for s in scores]
    assert report["tasks"] == tasks
    assert "harness" not in report
    assert shown == [corpus_table(scores), task_table(tasks)]
    assert text == "\n".join(shown)
    json.dumps(report)  # what `palm eval --out` writes


def test_a_runs_settings_are_read_and_a_nested_run_file_falls_back(model_dir, corpus_dir, tmp_path):
    """RUN/final is scored with RUN/run.json's seq_len; settings of the wrong type or nested are ignored."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    model, tokenizer = load_model(run / "final")
    cache = str(tmp_path / "cache")

    def score(seq_len=None, model_dir=run / "final"):
        cfg = CorpusEvalConfig(corpus=[str(corpus_dir)], seq_len=seq_len, max_tokens=200, cache_dir=cache)
        (s,) = evaluate_corpora(model, tokenizer, cfg, model_dir=model_dir)
        return s.nll, s.tokens

    (run / "run.json").write_text(json.dumps({"seq_len": 32, "loop": {"seq_len": 8}}), encoding="utf-8")
    assert score() == score(seq_len=32)
    assert score() != score(seq_len=64)
    (run / "run.json").write_text(
        json.dumps({"seq_len": "long", "val_fraction": {"x": 1}, "cache_dir": 3, "loop": {"seq_len": 8}}),
        encoding="utf-8",
    )
    assert score() == score(model_dir=None)  # the model's context and palm train's defaults
    (run / "run.json").write_text("[1, 2]", encoding="utf-8")
    assert score() == score(model_dir=None)
