"""A corpus cut into units of work: stretches of about UNIT_BYTES, numbered in corpus order, that any
process can tokenize on its own and that join back, in order, into exactly the corpus.

A unit is a list of segments (byte ranges of plain text and JSONL files, starting at a line start;
row groups of Parquet files; record batches of Arrow files), so that a worker reads its own share of
a file without reading what comes before it. What cannot be entered midway (a compressed file, a
named corpus generated in Python) is read here, in order, and cut into units that carry their pieces.
The cut points depend only on the files and UNIT_BYTES, never on how many processes share the
work: a large text file is cut at `textio.text_boundary` near every multiple of the unit size, which
is also a piece boundary (see palm.data.textio for what a cut may change).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import CorpusError
from . import columnar, documents, textio
from .corpora import CorpusPart, named_documents
from .documents import CorpusFile, Piece

UNIT_BYTES = 8 << 20


@dataclass(frozen=True)
class Segment:
    path: str
    kind: str  # "text", "jsonl", "parquet", "arrow"
    start: int  # bytes of text and JSONL files; row groups of Parquet, record batches of Arrow
    stop: int
    last: bool = True  # text: the stretch ends its file's document
    in_folder: bool = False


@dataclass
class Unit:
    index: int
    size: int  # bytes of input (file bytes, or text bytes of a stream), for progress
    segments: tuple[Segment, ...] = ()
    pieces: list[Piece] | None = field(default=None, repr=False)  # read already, from a stream
    stream: bool = False


def seekable(part: CorpusPart) -> bool:
    """Whether every unit of the corpus is a set of segments (so the whole plan is cheap to make)."""
    return part.source == "path" and all(f.seekable for f in documents.corpus_files([part.name]))


def _ranges(bounds: list[int], end: int) -> list[tuple[int, int]]:
    cuts = sorted({b for b in bounds if 0 < b < end})
    edges = [0, *cuts, end]
    return list(zip(edges[:-1], edges[1:]))


def _text_segments(f: CorpusFile, unit_bytes: int) -> list[tuple[Segment, int]]:
    size = f.path.stat().st_size
    if size <= unit_bytes:
        return [(Segment(str(f.path), "text", 0, size, True, f.in_folder), size)] if size else []
    try:  # a binary file is found out before its stretches are handed to different workers
        next(textio.decode(f.path, textio.read_blocks(f.path, 0, textio.READ_BYTES)), None)
    except textio.BinaryFileError:
        if f.in_folder:
            return []
        raise
    window = min(unit_bytes, 1 << 16)
    bounds = [textio.text_boundary(f.path, k, window) for k in range(unit_bytes, size, unit_bytes)]
    return [(Segment(str(f.path), "text", a, b, b == size, f.in_folder), b - a) for a, b in _ranges(bounds, size)]


def _jsonl_segments(f: CorpusFile, unit_bytes: int) -> list[tuple[Segment, int]]:
    size = f.path.stat().st_size
    bounds = [textio.line_start_after(f.path, k) for k in range(unit_bytes, size, unit_bytes)]
    return [(Segment(str(f.path), "jsonl", a, b), b - a) for a, b in _ranges(bounds, size)]


def _grouped(f: CorpusFile, sizes: list[int], unit_bytes: int) -> list[tuple[Segment, int]]:
    """Consecutive row groups (or record batches) of about unit_bytes, at least one each."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= unit_bytes or i == len(sizes) - 1:
            out.append((Segment(str(f.path), f.kind, start, i + 1, True, f.in_folder), total))
            start, total = i + 1, 0
    return out


def file_segments(f: CorpusFile, column: str, unit_bytes: int) -> list[tuple[Segment, int]]:
    """The segments of a seekable corpus file and their sizes in bytes."""
    if f.kind == "parquet":
        return _grouped(f, columnar.parquet_groups(f.path, column), unit_bytes)
    if f.kind == "arrow":
        return _grouped(f, columnar.arrow_batch_sizes(f.path, column), unit_bytes)
    if f.kind == "jsonl":
        return _jsonl_segments(f, unit_bytes)
    return _text_segments(f, unit_bytes)


class _Planner:
    def __init__(self, unit_bytes: int, wanted: Callable[[int], bool]):
        self.unit_bytes, self.wanted = unit_bytes, wanted
        self.segments: list = []
        self.index, self.size = 0, 0

    def _emit(self, **kw) -> Unit:
        unit = Unit(self.index, **kw)
        self.index += 1
        return unit

    def add(self, segment: Segment, size: int) -> Iterator[Unit]:
        self.segments.append(segment)
        self.size += size
        if self.size >= self.unit_bytes:
            yield from self.flush()

    def flush(self) -> Iterator[Unit]:
        if self.segments:
            yield self._emit(size=self.size, segments=tuple(self.segments))
            self.segments, self.size = [], 0

    def stream(self, pieces: Iterator[Piece]) -> Iterator[Unit]:
        """Units that carry their pieces, cut after the piece that brings one to unit_bytes characters;
        pieces of units that are not wanted are read past, not kept."""
        yield from self.flush()
        held: list[Piece] = []
        size, keep = 0, self.wanted(self.index)
        for piece in pieces:
            if keep:
                held.append(piece)
            size += len(piece[0])
            if size >= self.unit_bytes:
                yield self._emit(size=size, pieces=held if keep else None, stream=True)
                held, size, keep = [], 0, self.wanted(self.index)
        if size:
            yield self._emit(size=size, pieces=held if keep else None, stream=True)


def plan(
    part: CorpusPart, unit_bytes: int = UNIT_BYTES, wanted: Callable[[int], bool] = lambda index: True
) -> Iterator[Unit]:
    """The units of a corpus, in order. Units read from a stream carry their pieces if `wanted(index)`,
    and None otherwise (the stream is still read past them, to find where the next one starts)."""
    if unit_bytes < 1:
        raise CorpusError(f"the unit size must be positive, not {unit_bytes}")
    planner = _Planner(unit_bytes, wanted)
    if part.source == "named":
        yield from planner.stream(documents.as_pieces(named_documents(part.name)))
        return
    for f in documents.corpus_files([part.name]):
        if f.seekable:
            segments = file_segments(f, part.text_column, unit_bytes)
            if len(segments) > 1:  # a large file's stretches are units of their own; small files share
                yield from planner.flush()
            for segment, size in segments:
                yield from planner.add(segment, size)
                if len(segments) > 1:
                    yield from planner.flush()
        else:
            yield from planner.stream(documents.file_pieces(f, part.text_column))
    yield from planner.flush()


def segment_pieces(segment: Segment, column: str) -> Iterator[Piece]:
    path = Path(segment.path)
    if segment.kind == "jsonl":
        return documents.as_pieces(documents.jsonl_texts(path, column, segment.start, segment.stop))
    if segment.kind == "parquet":
        return documents.as_pieces(columnar.parquet_texts(path, column, range(segment.start, segment.stop)))
    if segment.kind == "arrow":
        return documents.as_pieces(columnar.arrow_texts(path, column, range(segment.start, segment.stop)))
    return _text_segment(segment)


def _text_segment(segment: Segment) -> Iterator[Piece]:
    path = Path(segment.path)
    texts = textio.decode(
        path, textio.read_blocks(path, segment.start, segment.stop), segment.start, sniff=segment.start == 0
    )
    try:
        yield from documents.ending(textio.text_pieces(texts), segment.last)
    except textio.BinaryFileError:
        if not segment.in_folder:
            raise


def unit_pieces(unit: Unit, column: str) -> Iterator[Piece]:
    """The pieces of a unit, in order."""
    if unit.stream:
        if unit.pieces is None:
            raise CorpusError(f"unit {unit.index} was read past, not kept")
        yield from unit.pieces
        return
    for segment in unit.segments:
        yield from segment_pieces(segment, column)
