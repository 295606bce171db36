"""Parquet, Arrow (`datasets`' save_to_disk) and compressed JSONL corpora give the token stream of the same
documents in plain JSONL; bad columnar and compressed input is one line."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import assert_one_line_error, run_cli

from palm.core.errors import CorpusError
from palm.data.corpora import CorpusPart, parse_corpus_spec
from palm.data.documents import iter_documents
from palm.data.shards import prepare_data

DOCS = [
    f"Document {i}: {'我们一起去公园散步吧。' if i % 3 == 0 else 'the owl reads the fox a story.'} " * (1 + i % 4)
    for i in range(60)
]
ROWS = {"text": [*DOCS[:30], None, "", *DOCS[30:]], "id": list(range(62))}  # a null and an empty row are no documents


def jsonl(docs, column="text") -> bytes:
    return "".join(json.dumps({column: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("columnar")
    (root / "plain.jsonl").write_bytes(jsonl(DOCS))
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(jsonl(DOCS)))
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS)))
    table = pa.table(ROWS)
    pq.write_table(table, root / "docs.parquet", row_group_size=7)
    (root / "hub" / "data").mkdir(parents=True)  # laid out as on the Hub, for load_dataset("parquet", ...)
    pq.write_table(table.slice(0, 40), root / "hub" / "data" / "train-00000-of-00002.parquet", row_group_size=9)
    pq.write_table(table.slice(40), root / "hub" / "data" / "train-00001-of-00002.parquet")
    import datasets

    dataset = datasets.Dataset.from_dict(ROWS)
    dataset.save_to_disk(str(root / "saved"), num_shards=3)
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(root / "saved-dict"))
    pq.write_table(pa.table({"content": ROWS["text"], "text": ROWS["id"]}), root / "content.parquet")
    return root


def streams(tokenizer, tmp_path, path, column="text"):
    part = CorpusPart(str(path), 1.0, "path", column)
    data = prepare_data([part], tokenizer, tmp_path / "cache", 16, val_fraction=0.2, progress=False)
    return np.asarray(data.train[0]), np.asarray(data.val[0]), data.val_bytes[0]


@pytest.mark.parametrize("name", ["docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet", "hub", "saved", "saved-dict"])
def test_every_format_gives_the_token_stream_of_plain_jsonl(tokenizer, tmp_path, corpora, name):
    assert list(iter_documents([corpora / name])) == DOCS
    expected = streams(tokenizer, tmp_path / "plain", corpora / "plain.jsonl")
    got = streams(tokenizer, tmp_path / "other", corpora / name)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_another_text_column_and_a_weighted_mixture(tokenizer, tmp_path, corpora):
    assert list(iter_documents([corpora / "content.parquet"], "content")) == DOCS
    parts = parse_corpus_spec([f"{corpora / 'content.parquet'}:3", f"{corpora / 'saved'}:1"], text_column="content")
    assert [p.weight for p in parts] == pytest.approx([0.75, 0.25]) and {p.text_column for p in parts} == {"content"}
    expected = streams(tokenizer, tmp_path / "plain", corpora / "plain.jsonl")
    assert np.array_equal(streams(tokenizer, tmp_path / "c", corpora / "content.parquet", "content")[0], expected[0])


def bad_corpus(tmp_path, case):
    if case == "missing-column":
        path = tmp_path / "nocol.parquet"
        pq.write_table(pa.table({"body": ["a document"] * 30}), path)
    elif case == "not-text":
        path = tmp_path / "numbers.parquet"
        pq.write_table(pa.table({"text": list(range(30))}), path)
    elif case == "corrupt-parquet":
        path = tmp_path / "corrupt.parquet"
        good = tmp_path / "good.parquet"
        pq.write_table(pa.table({"text": ["a document"] * 30}), good)
        path.write_bytes(good.read_bytes()[:40] + b"\x00" * 50 + good.read_bytes()[90:])
    elif case == "corrupt-arrow":
        path = tmp_path / "corrupt.arrow"
        path.write_bytes(b"ARROW1\x00\x00" + b"\x07" * 100)
    elif case == "truncated-gz":
        path = tmp_path / "cut.jsonl.gz"
        path.write_bytes(gzip.compress(jsonl(DOCS * 20))[:500])
    else:  # "missing-field": compressed JSONL rows without the column
        path = tmp_path / "rows.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS, column="body")))
    return path


CASES = ["missing-column", "not-text", "corrupt-parquet", "corrupt-arrow", "truncated-gz", "missing-field"]
WORDS = {
    "missing-column": "no column 'text'",
    "not-text": "holds int64",
    "corrupt-parquet": "Parquet",
    "corrupt-arrow": "Arrow",
    "truncated-gz": "truncated",
    "missing-field": 'string "text" field',
}


@pytest.mark.parametrize("case", CASES)
def test_bad_columnar_and_compressed_input_is_one_line(capsys, tmp_path, tokenizer_dir, case):
    path = bad_corpus(tmp_path, case)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--corpus",
        str(path),
        "--out",
        str(out),
        "--tokenizer",
        tokenizer_dir,
        "--seq-len",
        "16",
        "--max-steps",
        "1",
    )
    assert_one_line_error(code, err, path.name, WORDS[case])
    assert not out.exists()
    code, _, err = run_cli(capsys, "tokenizer", "train", "--corpus", str(path), "--out", str(tmp_path / "tok"))
    assert_one_line_error(code, err, path.name, WORDS[case])
    assert not (tmp_path / "tok").exists()


def test_the_text_column_flag_reaches_the_files(capsys, tmp_path, corpora, tokenizer_dir):
    out = tmp_path / "tok"
    code, stdout, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--corpus",
        str(corpora / "content.parquet"),
        "--text-column",
        "content",
        "--vocab-size",
        "600",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "(the whole corpus)" in stdout and "-token vocabulary" in stdout
    code, _, err = run_cli(
        capsys,
        "train",
        "--corpus",
        str(corpora / "content.parquet"),
        "--text-column",
        "content",
        "--out",
        str(tmp_path / "run"),
        "--tokenizer",
        tokenizer_dir,
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--workers",
        "2",
    )
    assert code == 0, err
    assert "palm: tokenized" in err and "bytes/token" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["text_column"] == "content"


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_a_cell_past_the_document_limit_is_refused_naming_its_row(tmp_path, monkeypatch, kind):
    """A Parquet or Arrow cell longer than palm takes as one document (textio.MAX_LINE_BYTES, lowered here)
    is one line naming the file and row, not a string of whatever size the file holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from palm.data import columnar, textio

    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 1000)
    table = pa.table({"text": ["short"] * 5 + ["x" * 5000] + ["short"]})
    path = tmp_path / f"t.{kind}"
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=3)
        texts = columnar.parquet_texts(path, "text")
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=3):
                writer.write_batch(batch)
        texts = columnar.arrow_texts(path, "text")
    with pytest.raises(CorpusError, match=r"row 6 holds a text of 5\.0 kB"):
        list(texts)
