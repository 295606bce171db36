"""Building token shards in units: byte-identical whatever the number of processes or ranks, resumable
after a kill, and never mistaken for complete while half-written."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from palm.core.errors import PalmError
from palm.data import workers as pool
from palm.data.corpora import CorpusPart
from palm.data.data import get_batch
from palm.data.shards import prepare_data, tokenize_corpora
from palm.data.units import plan

UNIT = 3000  # bytes: small, so that a small corpus makes many units


def write_corpus(root: Path) -> Path:
    """A folder of every kind of file: a large text file cut into many units, small ones packed
    together, JSONL, gzipped JSONL (read as a stream), Parquet with many row groups."""
    root.mkdir()
    lines = [
        f"line {i}: {'我们一起去公园散步吧。' if i % 4 == 0 else 'the owl reads the fox a story.'}" for i in range(900)
    ]
    (root / "big.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i in range(5):
        (root / f"small{i}.txt").write_text(f"small document {i}\n" * (i + 1), encoding="utf-8")
    rows = "".join(json.dumps({"text": f"row {i} " + "word " * (i % 30)}) + "\n" for i in range(300))
    (root / "rows.jsonl").write_text(rows, encoding="utf-8")
    (root / "more.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    pq.write_table(
        pa.table({"text": [f"parquet row {i} " * (1 + i % 9) for i in range(400)]}),
        root / "t.parquet",
        row_group_size=25,
    )
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("shards") / "corpus")


def build(tokenizer, cache, corpus, workers, unit_bytes=UNIT):
    part = CorpusPart(str(corpus), 1.0, "path")
    return prepare_data(
        [part], tokenizer, cache, 16, val_fraction=0.1, progress=False, workers=workers, unit_bytes=unit_bytes
    )


def shard_bytes(data) -> dict[str, bytes]:
    (folder,) = data.shard_dirs
    return {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


@pytest.fixture(scope="module")
def reference(tokenizer, corpus, tmp_path_factory):
    data = build(tokenizer, tmp_path_factory.mktemp("one") / "cache", corpus, workers=1)
    return data, shard_bytes(data)


def test_the_corpus_makes_many_units_of_every_kind(corpus):
    units = list(plan(CorpusPart(str(corpus), 1.0, "path"), UNIT))
    kinds = {s.kind for u in units for s in u.segments} | {"stream" for u in units if u.stream}
    assert len(units) > 10 and kinds == {"text", "jsonl", "parquet", "stream"}
    big = [s for u in units for s in u.segments if s.path.endswith("big.txt")]
    assert len(big) > 5 and [s.last for s in big].count(True) == 1  # one document, many stretches


@pytest.mark.parametrize("workers", [2, 3])
def test_several_processes_give_byte_identical_shards(tokenizer, corpus, reference, tmp_path, workers):
    data = build(tokenizer, tmp_path / "cache", corpus, workers)
    assert shard_bytes(data) == reference[1]
    (report,) = data.reports
    assert report.built and report.workers == workers and report.units > 10 and report.reused_units == 0
    # so the batch at step k is the same function of (seed, k)
    assert all(np.array_equal(get_batch(data, k, 0, 8), get_batch(reference[0], k, 0, 8)) for k in range(5))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [data.shard_dirs[0].name]  # no build left


def test_the_pieces_of_the_big_text_file_are_exactly_its_text(tokenizer, corpus, reference):
    data = reference[0]
    every = np.concatenate([np.asarray(data.train[0]), np.asarray(data.val[0])])
    docs = [tokenizer.decode(d) for d in np.split(every, np.flatnonzero(every == tokenizer.eod_id) + 1) if len(d)]
    assert (corpus / "big.txt").read_text(encoding="utf-8") in docs


def test_jsonl_units_do_not_change_the_tokens(tokenizer, tmp_path, corpus):
    rows = CorpusPart(str(corpus / "rows.jsonl"), 1.0, "path")
    a = prepare_data([rows], tokenizer, tmp_path / "a", 16, progress=False, unit_bytes=500)
    b = prepare_data([rows], tokenizer, tmp_path / "b", 16, progress=False)
    assert a.reports[0].units > 5 and b.reports[0].units == 1
    assert np.array_equal(a.train[0], b.train[0]) and np.array_equal(a.val[0], b.val[0])


def test_ranks_tokenize_their_shares_and_one_joins(tokenizer, corpus, reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    part = CorpusPart(str(corpus), 1.0, "path")
    for rank in (1, 0):  # in any order: each writes only its own units
        (stats,) = tokenize_corpora([part], tokenizer, cache, rank, 2, 0.1, workers=1, unit_bytes=UNIT)
        assert 0 < stats.tokenized < stats.units
    monkeypatch.setattr(pool, "tokenize_unit", lambda *a: pytest.fail("tokenized again"))
    data = build(tokenizer, cache, corpus, workers=1)
    assert shard_bytes(data) == reference[1] and data.reports[0].reused_units == data.reports[0].units


KILLER = textwrap.dedent("""
    import os, signal, sys
    from palm.data import shardbuild
    from palm.data.corpora import CorpusPart
    from palm.data.shards import prepare_data
    from palm.text.tokenizer import PalmTokenizer

    real, written = shardbuild._write, []
    def write(path, fn):  # killed while the fourth unit's table is half-written, before its rename
        if path.name.endswith(".docs.npy") and len([p for p in written if p.name.endswith(".docs.npy")]) == 3:
            with open(path.with_name("." + path.name + ".tmp-half"), "wb") as f:
                f.write(b"\\x93NUMPY half")
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, fn)
        written.append(path)
    shardbuild._write = write
    prepare_data([CorpusPart(sys.argv[1], 1.0, "path")], PalmTokenizer.load(sys.argv[2]), sys.argv[3], 16,
                 val_fraction=0.1, progress=False, workers=1, unit_bytes=int(sys.argv[4]))
""")


def test_a_killed_build_is_never_taken_for_complete_and_resumes(tokenizer, tokenizer_dir, corpus, reference, tmp_path):
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-c", KILLER, str(corpus), tokenizer_dir, str(cache), str(UNIT)],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    (build_dir,) = cache.iterdir()
    assert build_dir.name.startswith(".") and build_dir.name.endswith(".build")  # no shard folder at all
    assert len(list(build_dir.glob("unit-*.docs.npy"))) == 3 and list(build_dir.glob(".*tmp-*"))
    (build_dir / "unit-0000001.bin").write_bytes(b"\0\0")  # a damaged unit is redone, not trusted
    data = build(tokenizer, cache, corpus, workers=2)
    assert shard_bytes(data) == reference[1]
    assert data.reports[0].reused_units == 2
    assert sorted(p.name for p in cache.iterdir()) == [data.shard_dirs[0].name]


def test_a_worker_that_dies_stops_the_build_with_one_line(tokenizer, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "tokenize_unit", lambda *a: os._exit(3))  # inherited by the forked workers
    with pytest.raises(PalmError, match=r"^a tokenizing process died \(exit code 3\)"):
        build(tokenizer, tmp_path / "cache", corpus, workers=2)


def test_a_worker_error_is_raised_in_the_parent(tokenizer, tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    with open(folder / "rows.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "fine"}\n{"text": \n')
    with pytest.raises(PalmError, match=r"rows.jsonl:302: not valid JSON"):
        build(tokenizer, tmp_path / "cache", folder, workers=2, unit_bytes=500)
    assert list((tmp_path / "cache").iterdir()) == []  # bad input: nothing kept to resume


RANKS = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from palm.data.corpora import CorpusPart
    from palm.data.shards import prepare_data, tokenize_corpora
    from palm.text.tokenizer import PalmTokenizer

    dist.init_process_group("gloo")
    corpus, tokenizer, cache, unit = sys.argv[1], PalmTokenizer.load(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    part = CorpusPart(corpus, 1.0, "path")
    (stats,) = tokenize_corpora([part], tokenizer, cache, dist.get_rank(), dist.get_world_size(), 0.1, workers=2,
                                unit_bytes=unit)
    print(f"rank {dist.get_rank()} tokenized {stats.tokenized} of {stats.units}")
    dist.barrier()
    if dist.get_rank() == 0:
        data = prepare_data([part], tokenizer, cache, 16, val_fraction=0.1, progress=False, unit_bytes=unit)
        print(f"joined, reused {data.reports[0].reused_units} of {data.reports[0].units}")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_under_torchrun_every_rank_tokenizes_its_share_with_forked_workers(tokenizer_dir, corpus, reference, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(corpus),
            tokenizer_dir,
            str(tmp_path / "cache"),
            str(UNIT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [int(line.split()[3]) for line in done.stdout.splitlines() if " tokenized " in line]
    total = int(done.stdout.split(" of ")[1].split()[0])
    assert len(shares) == 2 and all(shares) and sum(shares) == total
    assert f"joined, reused {total} of {total}" in done.stdout
    (folder,) = [p for p in (tmp_path / "cache").iterdir()]
    assert {n: (folder / n).read_bytes() for n in ("train.bin", "val.bin", "meta.json")} == reference[1]
