"""Corpus files read in bounded pieces: `.gz` and `.zst` undone on the fly, UTF-8 checked as it streams,
long text cut at line boundaries.

Nothing here holds a whole file. Blocks of at most READ_BYTES are read, decoded strictly and cut into
pieces of at most PIECE_CHARS characters. The pieces of a text concatenated are exactly the text, so
decoding their tokens gives it back whatever the cuts. Their token ids can differ from those of the
whole text only at a cut: the tokenizer never merges across a cut, so the whitespace run around it
(or, for a line longer than a piece, the word it falls in) may be split into other pieces than it
would be whole. `last_cut` therefore prefers cuts that cannot change anything under palm's
pre-tokenizer (which splits whitespace runs before their last character and keeps a newline between
two non-space characters alone): after a newline that sits between two non-space characters, or
after a newline followed by exactly one more whitespace character and then a non-space one. Only
when a stretch has no such place does it fall back to the last newline, and a line longer than a
whole piece is cut mid-line.
"""

from __future__ import annotations

import codecs
import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import CorpusError

READ_BYTES = 1 << 20
PIECE_CHARS = 1 << 18
SNIFF_BYTES = 8192  # a NUL byte in the first this many bytes marks a binary file
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# zstd's densest block (RLE) turns 4 bytes into 128 KiB, and a decompressor object returns all it makes at
# once: fed 1 KiB at a time, one call makes at most 32 MiB, however the file was crafted (a 91 KB bomb fed
# whole made 999 MB in one call). Ordinary text comes out at about the speed of whole reads.
ZSTD_SLICE = 1 << 10
# The longest line palm holds whole (a JSONL document is one line and cannot be cut): past it, one line naming
# the file and line, rather than memory that grows with whatever a file says.
MAX_LINE_BYTES = 64 << 20

# Unicode's White_Space characters, which is what the tokenizer's regex engine means by \s.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
SAFE_CUT = re.compile(f"(?<=[^{_WS}])\n(?=[^{_WS}])|\n(?=[{_WS}][^{_WS}])")


class BinaryFileError(CorpusError):
    """A corpus file that is not UTF-8 text."""


def human_size(n: int) -> str:
    """A byte count as reports show it: 12.3 kB, 45.6 MB, 7.89 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n} B"


def compression(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix.lower())


def inner_suffix(path: Path) -> str:
    """The suffix that says what a file holds, under any compression suffix: `.jsonl` of `a.jsonl.gz`."""
    return Path(path.stem).suffix.lower() if compression(path) else path.suffix.lower()


def _slices(fh, size: int) -> Iterator[bytes]:
    """The file's bytes, read READ_BYTES at a time, in slices of `size`."""
    while data := fh.read(READ_BYTES):
        view = memoryview(data)
        for at in range(0, len(data), size):
            yield bytes(view[at : at + size])


def _zstd_blocks(fh, path: Path) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:
        raise CorpusError(f"{path}: reading .zst files needs the zstandard package: pip install zstandard") from None
    maker = zstandard.ZstdDecompressor()
    frame, inside = maker.decompressobj(), False
    try:
        for chunk in _slices(fh, ZSTD_SLICE):
            while chunk:
                out = frame.decompress(chunk)
                inside = True
                for at in range(0, len(out), READ_BYTES):  # blocks of the usual size, whatever one call made
                    yield out[at : at + READ_BYTES]
                if not frame.eof:
                    break
                # One decompressor per frame: only then does `eof` tell a cut-off last frame from a whole one.
                chunk, frame, inside = frame.unused_data, maker.decompressobj(), False
    except zstandard.ZstdError as e:
        raise CorpusError(f"{path}: not a readable zstd file ({e})") from None
    if inside:
        raise CorpusError(f"{path}: the zstd stream is truncated (it ends inside a frame)")


def _gzip_blocks(path: Path) -> Iterator[bytes]:
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                yield block
    except EOFError:
        raise CorpusError(f"{path}: the gzip stream is truncated (it ends before its end marker)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise CorpusError(f"{path}: not a readable gzip file ({e})") from None


def read_blocks(path: Path, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """The bytes of a file (decompressed), in blocks of at most READ_BYTES; [start, stop) of a plain file."""
    kind = compression(path)
    try:
        if kind == "gzip":
            yield from _gzip_blocks(path)
        elif kind == "zstd":
            with open(path, "rb") as fh:
                yield from _zstd_blocks(fh, path)
        else:
            with open(path, "rb") as f:
                f.seek(start)
                left = None if stop is None else stop - start
                while left is None or left > 0:
                    block = f.read(READ_BYTES if left is None else min(READ_BYTES, left))
                    if not block:
                        break
                    if left is not None:
                        left -= len(block)
                    yield block
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror or e}") from None


def check_not_binary(path: Path, head: bytes) -> None:
    if b"\x00" in head[:SNIFF_BYTES]:
        raise BinaryFileError(f"{path} is a binary file, not UTF-8 text")


def decode(path: Path, blocks: Iterator[bytes], offset: int = 0, sniff: bool = True) -> Iterator[str]:
    """The text of UTF-8 `blocks` that start at byte `offset` of `path`.

    With `sniff`, a NUL byte in the first bytes or an undecodable first block is a BinaryFileError (a
    binary file, which a folder passes over); a bad byte further on is a CorpusError, as text of the
    file may already have been used.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    first = sniff
    for block in blocks:
        if first:
            check_not_binary(path, block)
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as e:
            pending = len(decoder.getstate()[0])
            at = offset - pending + e.start
            kind = BinaryFileError if first else CorpusError
            raise kind(f"{path} is not UTF-8 text (invalid byte at offset {at})") from None
        first = False
        offset += len(block)
        if text:
            yield text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not UTF-8 text (it ends inside a character, at offset {offset})") from None


def last_cut(text: str, lo: int, hi: int) -> int:
    """Where to cut `text` in (lo, hi]: the last safe cut (see the module), else the last line end, else hi.

    `text` should run at least two characters past hi when it goes on, for the safe cut's look-ahead.
    """
    best = None
    for match in SAFE_CUT.finditer(text, lo, min(len(text), hi + 2)):
        if match.end() <= hi:
            best = match.end()
    if best is not None:
        return best
    newline = text.rfind("\n", lo, hi)
    return newline + 1 if newline >= 0 else hi


def first_cut(text: str) -> int:
    """The first place (after index 0) to begin a piece in `text`: a safe cut, else a line start, else 0."""
    match = SAFE_CUT.search(text, 1)
    if match:
        return match.end()
    newline = text.find("\n", 0, max(len(text) - 1, 0))
    return newline + 1 if newline >= 0 else 0


def cut_text(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """`text` as pieces of at most `piece_chars`, concatenating to exactly `text`."""
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = last_cut(text, start + piece_chars // 2, start + piece_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def text_pieces(texts: Iterator[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """A streamed text (as `decode` gives it) cut into pieces of at most `piece_chars` characters."""
    buf = ""
    for text in texts:
        buf += text
        while len(buf) >= piece_chars + 2:
            cut = last_cut(buf, piece_chars // 2, piece_chars)
            yield buf[:cut]
            buf = buf[cut:]
    yield from (p for p in cut_text(buf, piece_chars) if p)


class LineTooLongError(CorpusError):
    """A line longer than palm holds whole; `number` is its line number (1-based)."""

    def __init__(self, number: int, limit: int):
        super().__init__(f"line {number} is longer than {human_size(limit)}")
        self.number, self.limit = number, limit


def lines(blocks: Iterator[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a byte stream, each with its newline (the last one may lack it); a line longer than
    `limit` bytes is a LineTooLongError as soon as that many bytes of it are in, whatever it would grow to."""
    carry, number = b"", 0
    for block in blocks:
        parts = (carry + block).split(b"\n")
        carry = parts.pop()
        for part in parts:
            number += 1
            if len(part) >= limit:
                raise LineTooLongError(number, limit)
            yield part + b"\n"
        if len(carry) >= limit:
            raise LineTooLongError(number + 1, limit)
    if carry:
        yield carry


def line_start_after(path: Path, offset: int) -> int:
    """The first line start at or after byte `offset` of a plain file (its size if there is none)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()  # the rest of the line that holds byte offset - 1
        return f.tell()


def text_boundary(path: Path, offset: int, window: int = 1 << 16) -> int:
    """A byte offset at or after `offset` where a plain text file may be cut between two pieces: the first
    safe cut in the next `window` bytes, else the first line start there, else the next character start."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(window)
    skip = 0
    while skip < min(len(data), 4) and data[skip] & 0xC0 == 0x80:  # UTF-8 continuation bytes
        skip += 1
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data[skip:])
    cut = first_cut(text) if "\ufffd" not in text else 0
    return offset + skip + len(text[:cut].encode("utf-8"))
