"""Tokenizing a corpus with many processes into a shard that does not depend on how many there were.

Every unit of the corpus (palm.data.units) is tokenized on its own, in a worker process (palm.data.workers) or
in this one, into a file of its own in a build folder:

    <build>/unit-NNNNNNN.bin        the unit's token ids, <eod> after each document that ends in it
    <build>/unit-NNNNNNN.docs.npy   one row per stretch of a document: tokens, UTF-8 bytes, ends (0/1)
    <build>/plan.json               the number of units, once some process has planned them all

Each file is written under a temporary name, fsynced and renamed, the docs table last, so a unit is
complete exactly when its table exists and its token file has the size the table gives. A build that
is stopped or killed keeps its complete units and redoes the rest when run again. `join` then lays
the units end to end in corpus order, each document into train or validation by a hash of its index,
which gives the same bytes whichever processes tokenized which units.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import TEMP_MARK, OutputError, fsync_dir
from ..core.errors import CorpusError, TokenizerError
from .choice import in_validation
from .corpora import CorpusPart
from .units import Unit, unit_pieces

_BATCH_CHARS = 1 << 18  # text per encode call: big enough to amortise the call, small enough for its memory
# (a 1 MiB call held about 40 MiB more of the tokenizer's own allocations per process)
# Below this many documents a by-document split would leave validation empty or erratic.
MIN_DOCS_FOR_DOCUMENT_SPLIT = 20


@dataclass(frozen=True)
class Job:
    """What every unit shares: the vocabulary and how its ids are stored."""

    tokenizer_json: str
    eod_id: int
    dtype: str


@dataclass(frozen=True)
class Task:
    unit: Unit
    column: str  # of JSONL, Parquet and Arrow rows
    build: str  # the folder the unit's files go to


def unit_files(build: Path, index: int) -> tuple[Path, Path]:
    return build / f"unit-{index:07d}.bin", build / f"unit-{index:07d}.docs.npy"


def unit_table(build: Path, index: int, dtype: np.dtype) -> np.ndarray | None:
    """A complete unit's table of document stretches, or None if the unit is missing or half-written."""
    tokens, docs = unit_files(build, index)
    try:
        table = np.load(docs, allow_pickle=False)
        if table.ndim != 2 or table.shape[1] != 3 or tokens.stat().st_size != int(table[:, 0].sum()) * dtype.itemsize:
            return None
    except (OSError, ValueError, EOFError):
        return None
    return table


class Encoder:
    def __init__(self, job: Job):
        from tokenizers import Tokenizer

        self.job = job
        self.backend = Tokenizer.from_str(job.tokenizer_json)
        self.backend.encode_special_tokens = True  # as PalmTokenizer: the text "<s>" is text
        self.dtype = np.dtype(job.dtype)

    def encode(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        except TypeError:  # what `tokenizers` says of a str it cannot pass to Rust: a lone surrogate
            raise TokenizerError("a document is not valid Unicode text (it holds a lone surrogate)") from None


def _write(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tokenize_unit(encoder: Encoder, task: Task) -> dict:
    """Tokenize one unit into its files; returns its counts."""
    unit = task.unit
    arrays: list[np.ndarray] = []  # a batch's ids at a time: Python ints would take 36 bytes each
    rows: list[tuple[int, int, int]] = []
    tokens = nbytes = 0  # of the document stretch not yet ended

    def flush(batch: list) -> None:
        nonlocal tokens, nbytes
        encoded = encoder.encode([text for text, _ in batch])
        for (text, last), piece_ids in zip(batch, encoded):
            if last:
                piece_ids.append(encoder.job.eod_id)
            tokens += len(piece_ids)
            nbytes += len(text.encode("utf-8"))
            if last:
                rows.append((tokens, nbytes, 1))
                tokens = nbytes = 0
        count = sum(len(x) for x in encoded)
        arrays.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=encoder.dtype, count=count))

    batch, chars = [], 0
    for piece in unit_pieces(unit, task.column):
        batch.append(piece)
        chars += len(piece[0])
        if chars >= _BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    flush(batch)
    if tokens or nbytes:
        rows.append((tokens, nbytes, 0))  # the document goes on in the next unit
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=encoder.dtype)
    total = len(flat)
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    bin_path, docs_path = unit_files(Path(task.build), unit.index)
    try:
        _write(bin_path, flat.tofile)
        _write(docs_path, lambda f: np.save(f, table, allow_pickle=False))
    except FileNotFoundError:
        raise CorpusError(
            f"the build folder {task.build} was removed while unit {unit.index} was written "
            "(another process finished or abandoned the same shard)"
        ) from None
    except OSError as e:  # a full disk, most likely
        raise OutputError(f"cannot write {bin_path.parent}: {e.strerror or e}") from None
    return {
        "index": unit.index,
        "size": unit.size,
        "tokens": total,
        "docs": int(table[:, 2].sum()),
        "bytes": int(table[:, 1].sum()),
    }


# ---- joining the units -----------------------------------------------------------------------------


def read_plan(build: Path) -> int | None:
    try:
        return int(json.loads((build / "plan.json").read_text(encoding="utf-8"))["units"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_plan(build: Path, units: int) -> None:
    _write(build / "plan.json", lambda f: f.write(json.dumps({"units": units}).encode()))


class _Split:
    """One of train.bin / val.bin being written, with the counts meta.json records."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.tokens = self.docs = self.bytes = 0

    def add(self, tokens: np.ndarray, table: np.ndarray) -> None:
        tokens.tofile(self.file)
        self.tokens += len(tokens)
        self.docs += int(table[:, 2].sum())
        self.bytes += int(table[:, 1].sum())

    def counts(self) -> dict[str, int]:
        return {"tokens": self.tokens, "docs": self.docs, "bytes": self.bytes}


def join(build: Path, units: int, out: Path, dtype: np.dtype, val_fraction: float, name: str) -> dict:
    """train.bin and val.bin in `out` from the complete units of `build`; returns meta.json's counts."""
    tables = []
    for k in range(units):
        table = unit_table(build, k, dtype)
        if table is None:
            raise CorpusError(f"unit {k} of corpus {name} is missing from {build}")
        tables.append(int(table[:, 2].sum()))
    by_document = sum(tables) >= MIN_DOCS_FOR_DOCUMENT_SPLIT
    train, val = _Split(out / "train.bin"), _Split(out / "val.bin")
    done = 0  # documents ended before the current unit
    with train.file, val.file:
        for k in range(units):
            table = unit_table(build, k, dtype)
            tokens = np.fromfile(unit_files(build, k)[0], dtype=dtype)
            if not by_document:
                # Too few documents to hold some out whole: all go to train.bin, and prepare_data cuts
                # the validation stretch off its end for the sequence length at hand.
                train.add(tokens, table)
                continue
            index = done + np.cumsum(table[:, 2]) - table[:, 2]  # each stretch's document
            held = np.fromiter((in_validation(int(i), val_fraction) for i in index), dtype=bool, count=len(index))
            mask = np.repeat(held, table[:, 0])
            train.add(tokens[~mask], table[~held])
            val.add(tokens[mask], table[held])
            done += int(table[:, 2].sum())
        # A document cut at a unit's end is counted once, in the unit where it ends.
    if train.tokens + val.tokens == 0:
        raise CorpusError(f"corpus {name} is empty: it holds no text")
    return {"split": "document" if by_document else "position", "train": train.counts(), "val": val.counts()}


# ---- one process's share ---------------------------------------------------------------------------


@dataclass
class ShareStats:
    units: int = 0  # in the whole plan, if it was read to the end
    tokenized: int = 0
    reused: int = 0
    tokens: int = 0
    bytes: int = 0
    docs: int = 0
    seconds: float = 0.0


def tokenize_share(
    part: CorpusPart,
    units: Iterator[Unit],
    workers,
    build: Path,
    dtype: np.dtype,
    mine: Callable[[int], bool],
    bar=None,
    many: bool = True,
) -> ShareStats:
    """Tokenize the units of `units` that are `mine` and not complete already, with `workers` (a
    palm.data.workers.Workers); writes plan.json at the end."""
    stats = ShareStats()
    start = time.perf_counter()
    count = 0

    def todo() -> Iterator[Task]:
        nonlocal count
        for unit in units:
            count = unit.index + 1
            if not mine(unit.index):
                continue
            if unit_table(build, unit.index, dtype) is not None:
                stats.reused += 1
                if bar is not None:
                    bar.update(unit.size)
                continue
            yield Task(unit, part.text_column, str(build))

    def done(result: dict) -> None:
        stats.tokenized += 1
        stats.tokens += result["tokens"]
        stats.bytes += result["bytes"]
        stats.docs += result["docs"]
        if bar is not None:
            bar.set_postfix_str(f"{stats.docs:,} docs, {stats.tokens:,} tokens", refresh=False)
            bar.update(result["size"])

    workers.run(todo(), done, many)
    stats.units = count
    write_plan(build, count)
    fsync_dir(build)
    stats.seconds = time.perf_counter() - start
    return stats
