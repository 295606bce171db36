"""Reading corpora: long documents in pieces that concatenate to them, folders (save_to_disk ones too),
JSONL line by line with its line numbers, compressed files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from palm.core.errors import CorpusError
from palm.data import documents, textio
from palm.data.documents import corpus_files, iter_documents, iter_pieces, jsonl_rows, jsonl_texts


def test_a_long_text_document_comes_in_pieces_that_are_exactly_it(tmp_path):
    text = "".join(f"{i}: 我们一起去公园散步吧 and some English words.\n" for i in range(20_000))
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_pieces([path]))
    assert len(pieces) > 3 and all(len(p) <= textio.PIECE_CHARS for p, _ in pieces)
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p for p, _ in pieces) == text and list(iter_documents([path])) == [text]


def test_folders_walk_in_order_and_pass_over_what_is_not_text(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("beta".encode()))
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "c.pyc").write_bytes(b"\x00\x01binary")
    (tmp_path / "d.tar.gz").write_bytes(gzip.compress(b"\x00" * 100))  # a binary inside the compression
    datasets.Dataset.from_dict({"text": ["gamma", "delta"]}).save_to_disk(str(tmp_path / "e"))
    assert list(iter_documents([tmp_path])) == ["alpha", "beta", "gamma", "delta"]
    assert [f.kind for f in corpus_files([tmp_path]) if f.path.name.startswith("data-")] == ["arrow"]


def test_a_bad_byte_after_the_first_block_is_an_error_even_in_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "READ_BYTES", 64)
    (tmp_path / "late.txt").write_bytes(b"text " * 40 + b"\xff")
    with pytest.raises(CorpusError, match=r"late.txt is not UTF-8 text \(invalid byte at offset 200\)"):
        list(iter_documents([tmp_path]))


def test_jsonl_is_read_line_by_line_with_its_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "READ_BYTES", 50)
    rows = [json.dumps({"text": f"row {i}", "n": i}) for i in range(40)]
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(rows[:20]) + "\n\n" + "\n".join(rows[20:]) + "\n").encode()))
    got = list(jsonl_rows(path))
    assert [v["n"] for _, v in got] == list(range(40)) and got[20][0] == f"{path}:22"  # the blank line counts
    plain = tmp_path / "bad.jsonl"
    plain.write_text("\n".join(rows[:30]) + "\n{oops\n", encoding="utf-8")
    start = textio.line_start_after(plain, 300)  # a stretch that starts midway still names the right line
    with pytest.raises(CorpusError, match=r"bad.jsonl:31: not valid JSON"):
        list(jsonl_texts(plain, "text", start))
    assert list(jsonl_texts(plain, "text", 0, start)) == [
        f"row {i}" for i in range(len(plain.read_bytes()[:start].splitlines()))
    ]


def test_file_kinds_look_under_the_compression():
    assert [documents.file_kind(Path(n)) for n in ("a.jsonl.zst", "b.parquet", "c.arrow", "d.txt.gz", "e.json")] == [
        "jsonl",
        "parquet",
        "arrow",
        "text",
        "text",
    ]
