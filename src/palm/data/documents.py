"""Reading corpora: the documents behind a path, in a fixed order, streamed in bounded pieces.

A corpus path is a file or a folder of files, searched recursively in sorted order so that every run
sees the documents in the same order. By what a file holds (the suffix under any `.gz` or `.zst`):

    .jsonl      one document per line, in a text field (`text` unless another column is named)
    .parquet    one document per row of a text column, read row group by row group
    .arrow      one document per row of a text column (as `datasets` writes them)
    otherwise   UTF-8 text, the whole file one document

A folder saved by `datasets`' `save_to_disk` gives its Arrow files in the dataset's order (a
DatasetDict its train split); hidden files are passed over. A binary file named directly is an
error; binary files inside a folder (compiled caches, images) are passed over.

Documents come as pieces, (text, ends the document): a long document is cut into pieces of at most
`textio.PIECE_CHARS` characters at line boundaries, which concatenated are exactly the document (see
palm.data.textio for how a cut can change token ids, and when it cannot).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import CorpusError, PalmError
from ..text.tokenizer import not_unicode
from . import columnar, textio
from .textio import BinaryFileError

DEFAULT_TEXT_COLUMN = "text"
RECORD_KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}

Piece = tuple[str, bool]  # a document's text, or a piece of it; True on its last piece

__all__ = [
    "BinaryFileError",
    "CorpusFile",
    "Piece",
    "corpus_files",
    "iter_documents",
    "iter_pieces",
    "jsonl_rows",
    "read_text",
]


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    kind: str  # "text", "jsonl", "parquet" or "arrow"
    in_folder: bool  # found in a folder (a binary file there is passed over)

    @property
    def seekable(self) -> bool:
        """Whether a part of the file can be read without reading what comes before it."""
        return self.kind in ("parquet", "arrow") or textio.compression(self.path) is None


def file_kind(path: Path) -> str:
    return RECORD_KINDS.get(textio.inner_suffix(path), "text")


def _walk(folder: Path, seen: set[Path]) -> list[CorpusFile]:
    real = folder.resolve()
    if real in seen:  # a symbolic link back up the tree
        return []
    seen.add(real)
    saved = columnar.saved_dataset(folder)
    if saved is not None:
        return [CorpusFile(p, "arrow", True) for p in saved]
    found: list[CorpusFile] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(_walk(entry, seen))
        elif entry.is_file():
            found.append(CorpusFile(entry, file_kind(entry), True))
    return found


def corpus_files(paths: Sequence[str | Path]) -> list[CorpusFile]:
    """The files behind corpus paths, checked to exist; folders expand to their visible files."""
    if not paths:
        raise CorpusError("no corpus given")
    files: list[CorpusFile] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _walk(path, set())
            if not found:
                raise CorpusError(f"corpus folder {path} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(CorpusFile(path, file_kind(path), False))
        else:
            raise CorpusError(f"corpus path {path} does not exist")
    return files


def read_text(path: Path) -> str:
    """A small file's whole text; a file that is not UTF-8 text (NUL bytes or undecodable) is a BinaryFileError."""
    data = path.read_bytes()
    textio.check_not_binary(path, data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BinaryFileError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def _place(path: Path, at: int, lineno: int | None) -> str:
    """ "PATH:LINE" of the line at byte `at`; the line is counted from the start only when a message needs it."""
    if lineno is None:
        lineno = 1 + sum(block.count(b"\n") for block in textio.read_blocks(path, 0, at))
    return f"{path}:{lineno}"


def _json_lines(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int | None, Any]]:
    """(byte offset, line number or None when not counted, value) for every non-blank line of JSON Lines,
    bytes [start, stop) of a plain file (all of any file by default)."""
    blocks = textio.read_blocks(path, start, stop)
    head = next(blocks, b"")
    if start == 0:
        textio.check_not_binary(path, head)
    offset, lineno = start, 0 if start == 0 else None
    for raw in _checked_lines(path, _chain(head, blocks), start):
        at, offset = offset, offset + len(raw)
        lineno = None if lineno is None else lineno + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BinaryFileError(f"{path} is not UTF-8 text (invalid byte at offset {at + e.start})") from None
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{_place(path, at, lineno)}: not valid JSON ({e.msg})") from None
        # Only a \uD800-\uDFFF escape can make a lone surrogate out of valid UTF-8, so only such lines are checked.
        if b"\\ud" in raw or b"\\uD" in raw:
            problem = not_unicode(json.dumps(value, ensure_ascii=False))
            if problem:
                raise CorpusError(
                    f"{_place(path, at, lineno)}: not valid Unicode text ({problem.removeprefix('it holds ')})"
                )
        yield at, lineno, value


def _checked_lines(path: Path, blocks: Iterator[bytes], start: int) -> Iterator[bytes]:
    try:
        yield from textio.lines(blocks)
    except textio.LineTooLongError as e:
        where = f"{path}:{e.number}" if start == 0 else f"{path}, a line after byte {start}"
        raise CorpusError(
            f"{where} is a JSON line longer than {textio.human_size(e.limit)}: palm reads a JSONL "
            "document whole, so it refuses one this long"
        ) from None


def _chain(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from rest


def jsonl_rows(path: Path, error: type[PalmError] = CorpusError, what: str = "file") -> Iterator[tuple[str, Any]]:
    """(place, value) for every non-blank line of a JSONL file (`.gz`/`.zst` too), the place ("PATH:LINE")
    for messages. The file is read line by line.

    A file that is missing or not UTF-8 text, or a line that is not JSON, raises `error`.
    """
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        for at, lineno, value in _json_lines(path):
            yield _place(path, at, lineno), value
    except BinaryFileError as e:
        raise error(f"{what} {e}") from None
    except CorpusError as e:
        raise (e if error is CorpusError else error(str(e))) from None


def jsonl_texts(path: Path, column: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The non-empty documents of the JSON Lines in bytes [start, stop) of a file (all of it by default)."""
    for at, lineno, record in _json_lines(path, start, stop):
        if not isinstance(record, dict) or not isinstance(record.get(column), str):
            raise CorpusError(f'{_place(path, at, lineno)}: expected an object with a string "{column}" field')
        if record[column]:
            yield record[column]


def as_pieces(texts: Iterator[str], piece_chars: int = textio.PIECE_CHARS) -> Iterator[Piece]:
    """Whole non-empty documents as pieces: each cut to at most `piece_chars`, True on its last piece."""
    for text in texts:
        if not text:
            continue
        pieces = textio.cut_text(text, piece_chars)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def ending(pieces: Iterator[str], last: bool = True) -> Iterator[Piece]:
    """The pieces of one stretch of a document, the final one marked as the document's end if `last`."""
    previous = None
    for piece in pieces:
        if previous is not None:
            yield previous, False
        previous = piece
    if previous is not None:
        yield previous, last


def record_texts(f: CorpusFile, column: str) -> Iterator[str]:
    """The documents of a file of records (JSON Lines, Parquet, Arrow), whole."""
    if f.kind == "jsonl":
        return jsonl_texts(f.path, column)
    if f.kind == "parquet":
        return columnar.parquet_texts(f.path, column)
    return columnar.arrow_texts(f.path, column)


def file_pieces(f: CorpusFile, column: str = DEFAULT_TEXT_COLUMN) -> Iterator[Piece]:
    """The pieces of every document of one corpus file, in order; none for a binary file in a folder."""
    if f.kind != "text":
        yield from as_pieces(record_texts(f, column))
        return
    try:
        yield from ending(textio.text_pieces(textio.decode(f.path, textio.read_blocks(f.path))))
    except BinaryFileError:
        if not f.in_folder:
            raise


def iter_pieces(paths: Sequence[str | Path], column: str = DEFAULT_TEXT_COLUMN) -> Iterator[Piece]:
    """The pieces of every non-empty document of the corpus, in order. Raises CorpusError if there is none."""
    empty = True
    for f in corpus_files(paths):
        for piece in file_pieces(f, column):
            empty = False
            yield piece
    if empty:
        raise CorpusError(f"corpus {', '.join(map(str, paths))} is empty: it holds no text")


def iter_documents(paths: Sequence[str | Path], column: str = DEFAULT_TEXT_COLUMN) -> Iterator[str]:
    """Every non-empty document of the corpus, whole, in a fixed order (for corpora of modest documents:
    a document is held in memory; palm itself reads pieces)."""
    parts: list[str] = []
    for piece, last in iter_pieces(paths, column):
        parts.append(piece)
        if last:
            yield "".join(parts)
            parts = []
