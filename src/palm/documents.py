"""Reading corpora: the documents behind a path, in a fixed order.

A corpus path is a UTF-8 text file (one document), a `.jsonl` file (one document per line, in its
`text` field) or a folder of such files, searched recursively in sorted order so that every run
sees the documents in the same order. A binary file named directly is an error; binary files
inside a folder (compiled caches, images) are passed over.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import CorpusError, PalmError
from .tokenizer import not_unicode

_SNIFF_BYTES = 8192


def corpus_files(paths: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """(file, found in a folder) behind corpus paths, checked to exist; folders expand to their visible files."""
    if not paths:
        raise CorpusError("no corpus given")
    files: list[tuple[Path, bool]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CorpusError(f"corpus folder {path} holds no files")
            files.extend((p, True) for p in found)
        elif path.is_file():
            files.append((path, False))
        else:
            raise CorpusError(f"corpus path {path} does not exist")
    return files


class BinaryFileError(CorpusError):
    """A corpus file that is not UTF-8 text."""


def read_text(path: Path) -> str:
    """A file's text; a file that is not UTF-8 text (NUL bytes or undecodable) is a BinaryFileError."""
    data = path.read_bytes()
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise BinaryFileError(f"{path} is a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BinaryFileError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def jsonl_rows(path: Path, error: type[PalmError] = CorpusError, what: str = "file") -> Iterator[tuple[str, Any]]:
    """(place, value) for every non-blank line of a JSONL file, the place ("PATH:LINE") for messages.

    A file that is missing or not UTF-8 text, or a line that is not JSON, raises `error`.
    """
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        text = read_text(path)
    except BinaryFileError as e:
        raise error(f"{what} {e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from None
        problem = not_unicode(json.dumps(value, ensure_ascii=False))
        if problem:
            raise error(f"{where}: not valid Unicode text ({problem.removeprefix('it holds ')})")
        yield where, value


def _jsonl_documents(path: Path) -> Iterator[str]:
    for where, record in jsonl_rows(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'{where}: expected an object with a string "text" field')
        yield record["text"]


def iter_documents(paths: Sequence[str | Path]) -> Iterator[str]:
    """Every non-empty document of the corpus, in a fixed order. Raises CorpusError if there is none."""
    empty = True
    for path, in_folder in corpus_files(paths):
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(path)
        else:
            try:
                docs = iter([read_text(path)])
            except BinaryFileError:
                if in_folder:
                    continue
                raise
        for doc in docs:
            if doc:
                empty = False
                yield doc
    if empty:
        raise CorpusError(f"corpus {', '.join(map(str, paths))} is empty: it holds no text")
