"""A corpus cut into units: every unit readable on its own, and the units in order are exactly the corpus."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from palm.core.errors import CorpusError
from palm.data.corpora import CorpusPart
from palm.data.documents import iter_pieces
from palm.data.units import plan, unit_pieces


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("".join(f"line {i}: 我们一起去公园散步吧。\n" for i in range(400)), encoding="utf-8")
    rows = "".join(json.dumps({"text": f"row {i} " + "word " * (i % 20)}) + "\n" for i in range(200))
    (root / "b.jsonl").write_text(rows, encoding="utf-8")
    (root / "c.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    pq.write_table(
        pa.table({"text": [f"parquet row {i} " * (1 + i % 5) for i in range(300)]}),
        root / "d.parquet",
        row_group_size=20,
    )
    return root


def documents(pieces):
    out, parts = [], []
    for text, last in pieces:
        parts.append(text)
        if last:
            out.append("".join(parts))
            parts = []
    assert not parts  # the last piece ends a document
    return out


def joined(units, column="text"):
    """The documents of the units, read unit by unit (a document may run on into the next unit)."""
    return documents(piece for unit in units for piece in unit_pieces(unit, column))


def test_units_in_order_are_exactly_the_corpus(corpus):
    part = CorpusPart(str(corpus), 1.0, "path")
    units = list(plan(part, 2000))
    assert [u.index for u in units] == list(range(len(units))) and len(units) > 10
    assert joined(units) == documents(iter_pieces([corpus]))
    assert joined(list(plan(part, 10**9))) == joined(units)  # however it is cut


def test_segments_start_at_lines_and_cover_their_files(corpus):
    units = list(plan(CorpusPart(str(corpus), 1.0, "path"), 1500))
    for name, kind in (("a.txt", "text"), ("b.jsonl", "jsonl")):
        data = (corpus / name).read_bytes()
        segments = [s for u in units for s in u.segments if s.path.endswith(name)]
        assert len(segments) > 2 and {s.kind for s in segments} == {kind}
        assert [s.start for s in segments[1:]] == [s.stop for s in segments[:-1]]
        assert segments[0].start == 0 and segments[-1].stop == len(data)
        assert all(data[s.start - 1 : s.start] == b"\n" for s in segments[1:])
    groups = [s for u in units for s in u.segments if s.kind == "parquet"]
    assert groups[0].start == 0 and groups[-1].stop == 15
    assert [s.start for s in groups[1:]] == [s.stop for s in groups[:-1]]


def test_a_stream_keeps_only_the_units_wanted(corpus):
    part = CorpusPart(str(corpus / "c.jsonl.gz"), 1.0, "path")
    units = list(plan(part, 1000, wanted=lambda i: i % 2 == 0))
    assert len(units) > 3 and all(u.stream for u in units)
    assert all((u.pieces is None) == (u.index % 2 == 1) for u in units)
    with pytest.raises(CorpusError, match="read past"):
        list(unit_pieces(units[1], "text"))
    every = list(plan(part, 1000))
    assert [u.size for u in every] == [u.size for u in units] and joined(every) == documents(iter_pieces([part.name]))
