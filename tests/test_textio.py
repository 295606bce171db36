"""Corpus files in bounded pieces: lossless cuts, safe cuts that leave token ids alone, .gz and .zst,
UTF-8 checked as it streams."""

from __future__ import annotations

import gzip

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palm.core.errors import CorpusError
from palm.data import textio
from palm.data.textio import BinaryFileError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LINES = st.lists(st.text(alphabet=st.sampled_from(list("ab c\t\u3000\r我,.1😀")), max_size=12), max_size=30).map(
    "\n".join
)


def stream(path, **kw):
    return "".join(textio.text_pieces(textio.decode(path, textio.read_blocks(path)), **kw))


@SETTINGS
@given(LINES, st.integers(min_value=1, max_value=40))
def test_pieces_are_bounded_and_concatenate_to_the_text(text, size):
    pieces = textio.cut_text(text, size)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= size for p in pieces) or text == ""


@SETTINGS
@given(LINES)
def test_a_safe_cut_changes_no_token_id(tokenizer, text):
    whole = tokenizer.encode(text, bos=False)
    for match in textio.SAFE_CUT.finditer(text):
        cut = match.end()
        assert tokenizer.encode(text[:cut], bos=False) + tokenizer.encode(text[cut:], bos=False) == whole, cut


def test_a_cut_that_is_not_safe_can_change_ids_but_not_the_text(tokenizer):
    text = "def f():\n    return 1\n"
    cut = text.index("\n") + 1  # before an indented line: the indentation's pieces change
    left, right = tokenizer.encode(text[:cut], bos=False), tokenizer.encode(text[cut:], bos=False)
    assert tokenizer.decode(left + right) == text


def test_cuts_prefer_safe_places_then_line_ends():
    text = "one\n    two\nthree four five"
    assert textio.last_cut(text, 1, 20) == text.index("three")  # after "two\n": a safe cut
    text = "one\n    two  \n three"
    assert textio.last_cut(text, 1, 17) == text.index(" three")  # a newline, one more space, then text: safe
    text = "one\n    two  \n   three"
    assert textio.last_cut(text, 1, 17) == text.index("   three")  # no safe place: after the last newline
    assert textio.last_cut("x" * 50, 10, 20) == 20  # one long line: cut mid-line


def test_a_stream_is_read_in_blocks_and_comes_back_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "READ_BYTES", 1000)
    text = "".join(f"line {i} 我们一起去公园散步吧 {'x' * (i % 7)}\n" for i in range(2000))
    plain, gz, zst = tmp_path / "a.txt", tmp_path / "a.txt.gz", tmp_path / "a.txt.zst"
    plain.write_text(text, encoding="utf-8")
    gz.write_bytes(gzip.compress(text.encode()))
    compressor = zstandard.ZstdCompressor()
    zst.write_bytes(compressor.compress(text[:5000].encode()) + compressor.compress(text[5000:].encode()))  # 2 frames
    for path in (plain, gz, zst):
        assert stream(path, piece_chars=300) == text
        assert all(len(p) <= 300 for p in textio.text_pieces(textio.decode(path, textio.read_blocks(path)), 300))
    assert textio.inner_suffix(gz) == ".txt" and textio.inner_suffix(tmp_path / "b.jsonl.zst") == ".jsonl"


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_and_corrupt_compressed_files_are_corpus_errors(tmp_path, kind):
    data = ("some text to squeeze\n" * 5000).encode()
    packed = gzip.compress(data) if kind == "gz" else zstandard.ZstdCompressor().compress(data)
    cut = tmp_path / f"cut.txt.{kind}"
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(CorpusError, match="truncated"):
        stream(cut)
    junk = tmp_path / f"junk.txt.{kind}"
    junk.write_bytes(b"this is not compressed at all" * 10)
    with pytest.raises(CorpusError, match="not a readable"):
        stream(junk)


def test_bad_utf8_first_is_binary_and_later_is_an_error_with_its_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "READ_BYTES", 100)
    early = tmp_path / "early.txt"
    early.write_bytes(b"ok \xff then")
    with pytest.raises(BinaryFileError, match="offset 3"):
        stream(early)
    late = tmp_path / "late.txt"
    late.write_bytes(b"a" * 250 + "é".encode() + b"b" * 50 + b"\xfe")
    with pytest.raises(CorpusError, match="offset 302") as info:
        stream(late)
    assert not isinstance(info.value, BinaryFileError)  # text before it may be in use: not passed over
    nul = tmp_path / "nul.bin"
    nul.write_bytes(b"GIF89a\x00\x01")
    with pytest.raises(BinaryFileError, match="binary file"):
        stream(nul)


def test_a_character_split_across_blocks_decodes(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "READ_BYTES", 7)
    path = tmp_path / "zh.txt"
    path.write_text("我们一起去公园散步吧。" * 10, encoding="utf-8")
    assert stream(path, piece_chars=5) == "我们一起去公园散步吧。" * 10


def test_text_boundaries_fall_on_safe_cuts_or_character_starts(tmp_path):
    path = tmp_path / "t.txt"
    text = "我们一起去公园散步吧。\nnext line\n" * 200
    path.write_text(text, encoding="utf-8")
    data = path.read_bytes()
    for offset in range(0, len(data), 97):
        b = textio.text_boundary(path, offset, window=400)
        assert b >= offset
        data[:b].decode("utf-8")  # a character boundary
        assert b == len(data) or data[b - 1 : b] == b"\n" or b - offset < 4
    assert textio.line_start_after(path, 0) == 0
    first = textio.line_start_after(path, 5)
    assert data[first - 1 : first] == b"\n" and first == data.index(b"\n") + 1


def zstd_bomb(path, unit: bytes, copies: int, tail: bytes = b"") -> None:
    """A .zst that expands to `unit` x copies (+ tail): one frame written `copies` times (frames concatenate),
    a few kB on disk for gigabytes of text."""
    frame = zstandard.ZstdCompressor(level=19).compress(unit)
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(frame)
        if tail:
            f.write(zstandard.ZstdCompressor().compress(tail))


def peak_rss_mb(code: str) -> float:
    """Peak RSS (MB) of a fresh interpreter running `code` (measured by a launcher: ru_maxrss of a child
    starts at its spawner's)."""
    import subprocess
    import sys

    launcher = (
        "import resource, subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", launcher, code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_a_zstd_bomb_is_read_in_bounded_blocks(tmp_path):
    """512 MB of text with no line break from a .zst of a few kB: the pieces stay within PIECE_CHARS and
    reading it all adds less than 150 MB to the process (decompressed whole, one compressed read made 999 MB
    at once)."""
    bomb = tmp_path / "bomb.txt.zst"
    zstd_bomb(bomb, b"a" * (64 << 20), 8)
    assert bomb.stat().st_size < 200_000
    code = (
        "from pathlib import Path; from palm.data import textio\n"
        f"p = Path({str(bomb)!r}); n = biggest = 0\n"
        "for piece in textio.text_pieces(textio.decode(p, textio.read_blocks(p))):\n"
        "    n += len(piece); biggest = max(biggest, len(piece))\n"
        "assert n == 8 << 26 and biggest <= textio.PIECE_CHARS, (n, biggest)\n"
    )
    baseline = peak_rss_mb("from palm.data import textio")  # the interpreter, torch and transformers
    assert peak_rss_mb(code) - baseline < 150


def test_a_jsonl_line_past_the_limit_is_refused_naming_file_and_line(tmp_path, monkeypatch):
    from palm.data.documents import jsonl_rows

    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 1 << 20)
    monkeypatch.setattr(textio.lines, "__defaults__", (1 << 20,))
    bomb = tmp_path / "rows.jsonl.zst"
    zstd_bomb(bomb, b"x" * (1 << 20), 64, tail=b'"}\n')
    with open(bomb, "rb") as f:
        body = f.read()
    with open(bomb, "wb") as f:  # a first, ordinary row, then one 64 MB line
        f.write(zstandard.ZstdCompressor().compress(b'{"text": "fine"}\n{"text": "'))
        f.write(body)
    rows = jsonl_rows(bomb)
    assert next(rows)[1] == {"text": "fine"}
    with pytest.raises(CorpusError, match=r"rows\.jsonl\.zst:2 is a JSON line longer than 1\.0 MB"):
        next(rows)
