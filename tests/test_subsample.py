"""The tokenizer's sample: a byte budget of documents chosen by a hash of their position, the same every time."""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_one_line_error, corpus_texts, run_cli

from palm.core.errors import CorpusError
from palm.data.choice import position_hash
from palm.data.corpora import CorpusPart, part_pieces
from palm.data.subsample import parse_size, sample_corpora
from palm.text.tokenizer import train_tokenizer


@pytest.fixture
def parts(tmp_path):
    texts = corpus_texts()
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:50]), encoding="utf-8")
    (tmp_path / "b").mkdir()
    for i, text in enumerate(texts[50:]):
        (tmp_path / "b" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return [CorpusPart(str(tmp_path / "a.jsonl"), 0.5, "path"), CorpusPart(str(tmp_path / "b"), 0.5, "path")]


def test_a_corpus_within_the_budget_is_used_whole_and_in_order(parts):
    sample = sample_corpora(parts, 10**9)
    assert sample.texts == [text for part in parts for text, _ in part_pieces(part)]
    assert sample.bytes_kept == sample.bytes_total and "(the whole corpus)" in sample.line()


def test_the_sample_is_the_lowest_hashes_that_fit_and_the_same_every_time(parts):
    pieces = [
        (position_hash(p, i), text) for p, part in enumerate(parts) for i, (text, _) in enumerate(part_pieces(part))
    ]
    total = sum(len(t.encode()) for _, t in pieces)
    budget = total // 3
    sample = sample_corpora(parts, budget)
    assert sample == sample_corpora(parts, budget) and sample.bytes_kept <= budget < total
    expected, kept = set(), 0
    for _, text in sorted(pieces):
        if kept + len(text.encode()) > budget:
            break
        expected.add(text)
        kept += len(text.encode())
    assert set(sample.texts) == expected and sample.bytes_kept == kept
    order = [t for _, t in pieces]
    assert sample.texts == sorted(sample.texts, key=order.index)  # in corpus order
    assert set(sample.texts) <= set(sample_corpora(parts, 2 * budget).texts)  # a larger budget only adds
    assert "budget" in sample.line() and f"{sample.pieces_kept:,} of {len(pieces):,}" in sample.line()


def test_the_same_sample_trains_the_same_tokenizer(parts, tmp_path):
    for name in ("x", "y"):
        sample = sample_corpora(parts, 60_000)
        train_tokenizer(lambda: sample.texts, vocab_size=600).save(tmp_path / name)
    assert (tmp_path / "x" / "tokenizer.json").read_bytes() == (tmp_path / "y" / "tokenizer.json").read_bytes()


def test_sizes_and_budgets():
    assert parse_size("200MB") == 200_000_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("256MiB") == 256 << 20 and parse_size("12345") == 12345 and parse_size(7) == 7
    for bad in ("lots", "5ib", "-1MB"):
        with pytest.raises(CorpusError, match="must be a size"):
            parse_size(bad, "--sample-bytes")
    with pytest.raises(CorpusError, match="at least 1 byte"):
        sample_corpora([], 0)


def test_the_command_reports_its_sample(capsys, parts, tmp_path):
    code, out, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--corpus",
        parts[0].name,
        "--corpus",
        parts[1].name,
        "--vocab-size",
        "600",
        "--sample-bytes",
        "40kB",
        "--out",
        str(tmp_path / "tok"),
    )
    assert code == 0, err
    assert "budget 40.0 kB (--sample-bytes)" in out and "(the whole corpus)" not in out and "600-token" in out
    code, _, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--corpus",
        parts[0].name,
        "--sample-bytes",
        "lots",
        "--out",
        str(tmp_path / "tok2"),
    )
    assert_one_line_error(code, err, "--sample-bytes", "lots")


def test_the_progress_bar_counts_the_text_read_not_the_compressed_file(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    text = "".join(f"document {i} " * 40 + "\n\n" for i in range(3000))  # ~1.3 MB, compresses ~100x
    path = tmp_path / "corpus.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    sample = sample_corpora([CorpusPart(str(path), 1.0, "path")], 10**6, progress=True)
    bar = capsys.readouterr().err.strip().split("\r")[-1]
    assert bar.startswith("reading for the tokenizer's sample") and path.stat().st_size < 50_000
    shown = float(re.search(r": ([\d.]+)MB ", bar).group(1))  # tqdm's unit_scale: 1.33MB
    assert abs(shown * 1e6 - sample.bytes_total) < 0.01e6 and sample.bytes_total > 1e6
    sample_corpora([CorpusPart(str(path), 1.0, "path")], 10**6)  # progress off: nothing on stderr
    assert capsys.readouterr().err == ""
