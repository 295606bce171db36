"""Columnar corpora: Parquet files (read row group by row group) and Arrow files, as `datasets` writes
them with `save_to_disk` (record batch by record batch), one document per row of a text column.

Only the text column is read, and a row group or record batch at a time, so memory follows the
largest group rather than the file. Null cells are empty documents, passed over like an empty line.
A missing column, one that does not hold strings, and a file pyarrow cannot read are CorpusErrors
that name the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import CorpusError
from . import textio

_BATCH_ROWS = 1024
# Column chunks are streamed through a buffer of this size, not pre-buffered whole (pyarrow's default): a
# row group's chunk is tens of MB, and whole-chunk reads between the Python strings made from them left the
# heap fragmented (sampling 2 GB of Parquet for the tokenizer peaked at 1.29 GB pre-buffered, 0.94 GB so).
_READ_BUFFER = 1 << 20
_ARROW_MAGIC = b"ARROW1"


def _pyarrow():
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet

    return pyarrow


def _unreadable(path: Path, what: str, e: Exception) -> CorpusError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CorpusError(f"{path} is not a readable {what} file ({detail})")


def check_column(schema, column: str, path: Path) -> int:
    """The index of `column` in `schema`, which must hold strings."""
    pa = _pyarrow()
    index = schema.get_field_index(column)
    if index < 0:
        names = ", ".join(schema.names) or "none"
        raise CorpusError(f"{path} has no column {column!r} (its columns: {names}); choose one with --text-column")
    kind = schema.field(index).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    textual = (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or getattr(pa.types, "is_string_view", bool)(kind)
    )
    if not textual:
        raise CorpusError(f"{path}: column {column!r} holds {schema.field(index).type}, not text")
    return index


def _texts(column, path: Path, first_row: int) -> Iterator[str]:
    """The non-empty strings of a column; a cell longer than textio.MAX_LINE_BYTES is refused, naming its row,
    before the column becomes Python strings (a document that long is a crafted file, not a text)."""
    if len(column):
        import pyarrow.compute as pc

        longest = pc.max(pc.binary_length(column)).as_py() or 0
        if longest > textio.MAX_LINE_BYTES:
            row = first_row + pc.index(pc.binary_length(column), longest).as_py()
            raise CorpusError(
                f"{path}: row {row + 1} holds a text of {textio.human_size(longest)}, more than the "
                f"{textio.human_size(textio.MAX_LINE_BYTES)} palm takes as one document"
            )
    for value in column.to_pylist():
        if value:
            yield value


# ---- Parquet -------------------------------------------------------------------------------------


def _parquet(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(str(path), buffer_size=_READ_BUFFER, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _unreadable(path, "Parquet", e) from None


def parquet_groups(path: Path, column: str) -> list[int]:
    """Uncompressed bytes of `column` in each row group of a Parquet file (checked to hold text)."""
    pf = _parquet(path)
    check_column(pf.schema_arrow, column, path)
    meta = pf.metadata
    leaf = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == column), None)
    if leaf is None:
        raise CorpusError(f"{path}: column {column!r} is nested, not a plain text column")
    return [meta.row_group(i).column(leaf).total_uncompressed_size for i in range(meta.num_row_groups)]


def parquet_texts(path: Path, column: str, groups: range | None = None) -> Iterator[str]:
    """The non-empty texts of `column` in row groups `groups` (all by default)."""
    pa = _pyarrow()
    pf = _parquet(path)
    check_column(pf.schema_arrow, column, path)
    chosen = list(range(pf.metadata.num_row_groups) if groups is None else groups)
    try:
        seen = sum(pf.metadata.row_group(i).num_rows for i in range(chosen[0])) if chosen else 0
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=chosen, columns=[column], use_threads=False):
            yield from _texts(batch.column(0), path, seen)
            seen += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, "Parquet", e) from None


# ---- Arrow (IPC stream or file, as `datasets` saves) ------------------------------------------------


def _arrow_batches(path: Path, column: str | None):
    """(column index, iterator of record batches) of an Arrow file, memory-mapped (index None: every column)."""
    pa = _pyarrow()
    try:
        source = pa.memory_map(str(path))
        if source.read(len(_ARROW_MAGIC)) == _ARROW_MAGIC:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            schema, batches = reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            schema, batches = reader.schema, iter(reader)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _unreadable(path, "Arrow", e) from None
    return (None if column is None else check_column(schema, column, path)), batches


def arrow_batch_sizes(path: Path, column: str) -> list[int]:
    """Bytes of `column` in each record batch (memory-mapped: the text itself is not read)."""
    pa = _pyarrow()
    index, batches = _arrow_batches(path, column)
    try:
        return [batch.column(index).nbytes for batch in batches]
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, "Arrow", e) from None


def arrow_texts(path: Path, column: str, batches: range | None = None) -> Iterator[str]:
    pa = _pyarrow()
    index, stream = _arrow_batches(path, column)
    seen = 0
    try:
        for i, batch in enumerate(stream):
            if batches is not None and i >= batches.stop:
                break
            if batches is None or i >= batches.start:
                yield from _texts(batch.column(index), path, seen)
            seen += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, "Arrow", e) from None


# ---- whole records (fine-tuning data in its data set's schema) -----------------------------------------


def records(path: Path) -> Iterator[dict]:
    """Every row of a Parquet or Arrow file as a dict of all its columns, a batch of rows at a time."""
    pa = _pyarrow()
    if path.suffix == ".parquet":
        what, batches = "Parquet", _parquet(path).iter_batches(batch_size=_BATCH_ROWS, use_threads=False)
    else:
        what, batches = "Arrow", _arrow_batches(path, None)[1]
    try:
        for batch in batches:
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, what, e) from None


# ---- datasets' save_to_disk folders -----------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise CorpusError(f"{path} is not a datasets metadata file")
    return value


def saved_dataset(folder: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder in the dataset's order, or None if it is not one.

    A Dataset folder lists its files in state.json. A DatasetDict folder (dataset_dict.json) gives
    its `train` split, or every split in its order when it has no `train`: the other splits are
    usually held out by the dataset's authors, and palm carves its own validation documents.
    """
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not splits:
            raise CorpusError(f"{folder / 'dataset_dict.json'} lists no splits")
        chosen = ["train"] if "train" in splits else [str(s) for s in splits]
        files: list[Path] = []
        for split in chosen:
            found = saved_dataset(folder / split)
            if found is None:
                raise CorpusError(f"{folder / split} is not a saved dataset split (no state.json)")
            files.extend(found)
        return files
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        entries = _read_json(folder / "state.json").get("_data_files")
        if not isinstance(entries, list):
            raise CorpusError(f"{folder / 'state.json'} lists no data files")
        files = [folder / str(entry.get("filename", "")) for entry in entries if isinstance(entry, dict)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CorpusError(f"{folder} lacks the data files {', '.join(missing)} that its state.json lists")
        return files
    return None
