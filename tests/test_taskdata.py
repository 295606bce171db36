"""Task data as it comes: each named schema (CNN/DailyMail, XSum, LCSTS, SQuAD, CMRC 2018, WMT, .tsv pairs,
prompt/completion) in each container (JSONL, .gz, .zst, Parquet, Arrow, save_to_disk folders) reads as the
same rows; long rows lose their document's tail and are counted; bad rows are one line naming file and row."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import assert_one_line_error, run_cli

from palm.data.taskdata import Schema, TaskDataError, read_task_rows
from palm.training.finetune_data import encode_row, read_rows

ARTICLE = "The city council met on Monday. It approved a new park. Work starts in May."
SCHEMAS = {
    "cnn_dailymail": (
        "summarize",
        [
            {"article": ARTICLE, "highlights": "A park is approved.", "id": "a1"},
            {"article": "Rain fell all week.", "highlights": "It rained.", "id": "a2"},
        ],
    ),
    "xsum": (
        "summarize",
        [
            {"document": ARTICLE, "summary": "A park is approved.", "id": "1"},
            {"document": "Rain fell all week.", "summary": "It rained.", "id": "2"},
        ],
    ),
    "lcsts": (
        "summarize",
        [
            {"text": "市议会周一开会，批准了一个新公园。", "summary": "新公园获批"},
            {"text": "本周一直下雨。", "summary": "下雨"},
        ],
    ),
    "squad": (
        "qa",
        [
            {
                "id": "q1",
                "title": "Park",
                "context": ARTICLE,
                "question": "When does work start?",
                "answers": {"text": ["in May", "May"], "answer_start": [66, 69]},
            },
            {
                "id": "q2",
                "title": "Rain",
                "context": "Rain fell all week.",
                "question": "What fell?",
                "answers": {"text": ["Rain"], "answer_start": [0]},
            },
        ],
    ),
    "cmrc2018": (
        "qa",
        [
            {
                "id": "c1",
                "context": "北京大学位于北京。",
                "question": "北京大学在哪里？",
                "answers": {"text": ["北京"], "answer_start": [6]},
            },
            {
                "id": "c2",
                "context": "今天下雨。",
                "question": "今天天气怎样？",
                "answers": {"text": ["下雨"], "answer_start": [2]},
            },
        ],
    ),
    "wmt": (
        "translate",
        [
            {"translation": {"en": "I like programming.", "zh": "我喜欢编程。"}},
            {"translation": {"en": "It rained.", "zh": "下雨了。"}},
        ],
    ),
    "prompt_completion": (
        "summarize",
        [
            {"prompt": ARTICLE, "completion": "A park is approved."},
            {"prompt": "Rain fell all week.", "completion": "It rained."},
        ],
    ),
}
LANGS = dict(source_lang="en", target_lang="zh")


def write(rows: list[dict], path, container: str):
    """`rows` as `container`: jsonl, jsonl.gz, jsonl.zst, parquet, arrow or a save_to_disk folder."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if container == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_bytes(text)
    elif container == "jsonl.gz":
        path = path.with_suffix(".jsonl.gz")
        path.write_bytes(gzip.compress(text))
    elif container == "jsonl.zst":
        path = path.with_suffix(".jsonl.zst")
        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    elif container == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=1)
    elif container == "arrow":
        path = path.with_suffix(".arrow")
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


CONTAINERS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "save_to_disk"]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_schema_reads_the_same_from_every_container(name, container, tmp_path):
    task, rows = SCHEMAS[name]
    schema = Schema(task, **(LANGS if task == "translate" else {}))
    got = read_task_rows(write(rows, tmp_path / name, container), schema)
    want = read_task_rows(write(rows, tmp_path / "reference", "jsonl"), schema)
    assert got == want and len(got) == 2
    first = got[0]
    if task == "summarize":
        assert first.prompt().startswith("Summarize the text.\n\n") and first.completion in rows[0].values()
    elif task == "qa":
        assert first.prompt() == f"{rows[0]['context']}\n\nQuestion: {rows[0]['question']}\nAnswer: "
        assert first.references == rows[0]["answers"]["text"] and first.completion == rows[0]["answers"]["text"][0]
    else:
        assert first.prompt() == "Translate from English to Chinese:\nI like programming.\nChinese: "
        assert first.completion == "我喜欢编程。"


def test_prompt_completion_rows_read_as_before(tmp_path):
    from palm.text.templates import format_prompt

    path = write(SCHEMAS["prompt_completion"][1], tmp_path / "pc", "jsonl")
    for task in ("summarize", "qa", "translate"):
        row = read_task_rows(path, Schema(task))[0]
        assert row.prompt() == format_prompt(ARTICLE, task) and row.completion == "A park is approved."


def test_language_columns_tab_separated_pairs_and_column_names(tmp_path):
    columns = write([{"en": "Good morning.", "de": "Guten Morgen."}], tmp_path / "cols", "parquet")
    row = read_task_rows(columns, Schema("translate", source_lang="de", target_lang="en"))[0]
    assert (
        row.prompt() == "Translate from German to English:\nGuten Morgen.\nEnglish: "
        and row.completion == "Good morning."
    )
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("I like tea.\t我喜欢茶。\n\nIt rained.\t下雨了。\n", encoding="utf-8")
    rows = read_task_rows(tsv, Schema("translate"))
    assert [r.completion for r in rows] == ["我喜欢茶。", "下雨了。"] and rows[0].values["source"] == "I like tea."
    other = write([{"body": ARTICLE, "tldr": "Park approved."}], tmp_path / "other", "jsonl")
    row = read_task_rows(other, Schema("summarize", columns={"document": "body", "summary": "tldr"}))[0]
    assert row.values["document"] == ARTICLE and row.completion == "Park approved."


def test_a_long_document_loses_its_tail_and_keeps_the_instruction_and_head(tokenizer, tmp_path):
    head = "HEADLINE: council approves park. "
    rows = [
        {"article": head + "filler words go on and on. " * 200, "highlights": "park approved"},
        {"article": "short.", "highlights": "short"},
    ]
    path = write(rows, tmp_path / "long", "jsonl")
    task_rows = read_rows(path, schema=Schema("summarize"))
    (ids, scored), cut = encode_row(tokenizer, task_rows[0], 96)
    assert cut and len(ids) == 97  # filled to the window: the longest head that fits
    prompt = tokenizer.decode(ids[: scored.index(True)])
    assert prompt.startswith("Summarize the text.\n\n" + head) and prompt.endswith("\n\nSummary: ")
    assert tokenizer.decode(ids[scored.index(True) :]) == "park approved"
    assert not encode_row(tokenizer, task_rows[1], 96)[1]


def test_finetune_reports_the_rows_it_cut(model_dir, tmp_path, capsys):
    rows = [{"article": "long text goes on. " * 100, "highlights": "long"}] * 3 + [
        {"article": "a b", "highlights": "c"}
    ] * 3
    path = write(rows, tmp_path / "d", "parquet")
    code, out, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(path),
        "--out",
        str(tmp_path / "run"),
        "--task",
        "summarize",
        "--steps",
        "1",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--dtype",
        "fp32",
        "--threads",
        "1",
    )
    assert code == 0, err
    assert "3 of 6 rows are longer than --seq-len 64: each lost the tail of its document" in err


BAD = {
    "no summary": ("summarize", [{"article": "x"}], "row 1: no summary"),
    "answer not text": ("qa", [{"question": "q?", "context": "c", "answers": {"text": [3]}}], "row 1: the answer"),
    "no direction": ("translate", [{"translation": {"en": "a", "zh": "b"}}], "--source-lang"),
    "missing language": ("translate", [{"translation": {"en": "a", "de": "b"}}], "'zh'"),
    "summary not text": (
        "summarize",
        [{"article": "x", "highlights": "y"}, {"article": "x", "highlights": 5}],
        ":2: summary must be text",
    ),  # JSONL: mixed types are no Parquet column
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_are_one_line_naming_file_and_row(case, model_dir, tmp_path, capsys):
    task, rows, words = BAD[case]
    path = write(rows, tmp_path / "bad", "jsonl" if case == "summary not text" else "parquet")
    extra = ["--source-lang", "en", "--target-lang", "zh"] if case == "missing language" else []
    code, _, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(path),
        "--out",
        str(tmp_path / "run"),
        "--task",
        task,
        "--steps",
        "1",
        *extra,
    )
    assert_one_line_error(code, err, str(path), words)


def test_bad_settings_are_one_line(model_dir, tmp_path, capsys):
    path = write(SCHEMAS["xsum"][1], tmp_path / "x", "jsonl")
    base = ["finetune", "--model", model_dir, "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "1"]
    for extra, words in [
        (["--task", "summarize", "--columns", "body"], "FIELD=COLUMN"),
        (["--task", "summarize", "--columns", "answer=x"], "answer"),
        (["--columns", "document=x"], "give --task"),
        (["--task", "translate", "--source-lang", "en"], "together"),
        (["--task", "summarize", "--columns", "document=body"], "no column 'body'"),
    ]:
        code, _, err = run_cli(capsys, *base, *extra)
        assert_one_line_error(code, err, words)
    with pytest.raises(TaskDataError, match="not a saved dataset"):
        read_task_rows(tmp_path, Schema("qa"))
