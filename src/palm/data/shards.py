"""Token shards: each corpus of a mixture tokenized once, cached, and reused.

    <cache_dir>/<slug>-<key>/train.bin   token ids, documents back to back, <eod> after each
    <cache_dir>/<slug>-<key>/val.bin     the held-out documents, laid out the same way
    <cache_dir>/<slug>-<key>/meta.json   key, dtype, split mode, token/document/byte counts

The key hashes the corpus's fingerprint, the tokenizer, the validation fraction and the unit size,
so a changed file or vocabulary builds a new folder and an unchanged one is reused as is. A corpus
is tokenized unit by unit (palm.data.units) by several processes at once (palm.data.shardbuild), in
`<cache_dir>/.<slug>-<key>.build/`; the units are then joined in corpus order, so the shard is
byte-identical however many processes built it, and under torchrun every rank tokenizes its share
(`tokenize_corpora`) before rank 0 joins them (`prepare_data`). Folders appear by rename from a
temporary folder, so one that exists is complete; a build that was stopped keeps its finished units
and goes on from them, and one that fails on bad input is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import CorpusError, PalmError
from ..text.tokenizer import BYTE_TOKENS, PalmTokenizer
from .choice import in_validation
from .corpora import CorpusPart, part_fingerprint
from .data import TokenData
from .shardbuild import Job, ShareStats, join, read_plan, tokenize_share, unit_table
from .textio import human_size
from .units import UNIT_BYTES, plan, seekable
from .workers import Workers, default_workers

SHARD_FORMAT = 2

__all__ = [
    "SHARD_FORMAT",
    "ShardReport",
    "in_validation",
    "prepare_data",
    "token_byte_lengths",
    "token_dtype",
    "tokenize_corpora",
    "tokenizer_sha256",
]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def token_byte_lengths(tokenizer: PalmTokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for: byte tokens 1, special tokens 0, other pieces their text's length.

    The vocabulary is BPE over raw characters with no space escape, so a piece's text is exactly
    the text it decodes to, and the byte lengths of a text's tokens sum to the text's byte length.
    """
    backend = tokenizer.hf.backend_tokenizer
    table = np.zeros(len(tokenizer), dtype=np.int64)
    byte_pieces = set(BYTE_TOKENS)
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    for piece, i in backend.get_vocab(with_added_tokens=True).items():
        if piece in byte_pieces:
            table[i] = 1
        elif piece not in special:
            table[i] = len(piece.encode("utf-8"))
    return table


def tokenizer_sha256(tokenizer: PalmTokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name).strip("._")[:40] or "corpus"


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _load_shard(folder: Path, key: str) -> dict | None:
    """The shard's meta.json if the folder holds a complete shard for `key`, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta["key"] != key or meta["format"] != SHARD_FORMAT:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if (folder / f"{split}.bin").stat().st_size != meta[split]["tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _position_val_tokens(n_tokens: int, val_fraction: float, seq_len: int) -> int:
    """Validation tokens cut off the end of a small corpus: val_fraction of it, at least one sequence
    when training keeps a sequence's worth too, and none rather than a lone token."""
    if val_fraction == 0:
        return 0
    n_val = min(max(math.ceil(val_fraction * n_tokens), seq_len + 1), n_tokens - (seq_len + 1))
    return n_val if n_val >= 2 else 0


def _shard_key(part: CorpusPart, tokenizer_sha256: str, val_fraction: float, unit_bytes: int) -> str:
    spec = f"{SHARD_FORMAT}\0{part_fingerprint(part)}\0{tokenizer_sha256}\0{val_fraction!r}\0{unit_bytes}"
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


@dataclass
class ShardReport:
    """What preparing one corpus took: for the command line to show."""

    corpus: str
    built: bool  # False: an existing shard was reused
    tokens: int  # <eod> included
    docs: int
    bytes: int  # UTF-8 bytes of text
    seconds: float = 0.0
    workers: int = 1
    units: int = 0
    reused_units: int = 0  # finished by an earlier, interrupted build (or by other ranks)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens - self.docs, 1)

    def line(self) -> str:
        docs = f"{self.docs:,} document{'s' if self.docs != 1 else ''}"
        return (
            f"tokenized {self.corpus}: {human_size(self.bytes)}, {docs}, {self.tokens:,} tokens "
            f"({self.bytes_per_token:.2f} bytes/token) in {self.seconds:.1f} s "
            f"({self.bytes / 1e6 / max(self.seconds, 1e-9):.2f} MB/s, {self.workers} "
            f"worker{'s' if self.workers > 1 else ''}, {self.units} unit{'s' if self.units != 1 else ''}"
            + (f", {self.reused_units} from an earlier run" if self.reused_units else "")
            + ")"
        )


@dataclass
class _Shard:
    """Where one corpus's shard and its build live."""

    part: CorpusPart
    key: str
    folder: Path
    build: Path

    @classmethod
    def of(cls, part: CorpusPart, cache_dir: Path, tok_sha: str, val_fraction: float, unit_bytes: int) -> _Shard:
        key = _shard_key(part, tok_sha, val_fraction, unit_bytes)
        folder = cache_dir / f"{_slug(part.name)}-{key}"
        return cls(part, key, folder, cache_dir / f".{folder.name}.build")


def _tokenize(
    shard: _Shard, workers: Workers, dtype: np.dtype, unit_bytes: int, progress: bool, rank: int = 0, world: int = 1
) -> ShareStats:
    """Tokenize this process's share of the units not finished yet (all of them in one process)."""
    shard.build.mkdir(exist_ok=True)
    mine = (lambda i: i % world == rank) if world > 1 else (lambda i: True)
    units = plan(shard.part, unit_bytes, lambda i: mine(i) and unit_table(shard.build, i, dtype) is None)
    total, many = None, True
    if seekable(shard.part):  # the plan costs only metadata reads: make it whole, for the bar's total
        units = list(units)  # type: ignore[assignment]
        total = sum(u.size for u in units if mine(u.index))
        many = sum(1 for u in units if mine(u.index)) > 1
    with tqdm(
        desc=f"tokenizing {shard.part.name}",
        total=total,
        unit="B",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        return tokenize_share(shard.part, iter(units), workers, shard.build, dtype, mine, bar, many)


def _build(
    shard: _Shard,
    tokenizer: PalmTokenizer,
    tok_sha: str,
    val_fraction: float,
    workers: Workers,
    unit_bytes: int,
    progress: bool,
) -> tuple[dict, ShardReport]:
    """Tokenize what is left of the corpus, join the units into the shard folder; (meta, report)."""
    started = time.perf_counter()
    dtype = token_dtype(len(tokenizer))
    part = shard.part
    planned = read_plan(shard.build)
    if planned is not None and all(unit_table(shard.build, k, dtype) is not None for k in range(planned)):
        stats = ShareStats(units=planned, reused=planned)
    else:
        stats = _tokenize(shard, workers, dtype, unit_bytes, progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shard.folder.name}.tmp-", dir=shard.folder.parent))
    try:
        counts = join(shard.build, stats.units, tmp, dtype, val_fraction, part.name)
        meta = {
            "format": SHARD_FORMAT,
            "key": shard.key,
            "corpus": part.name,
            "source": part.source,
            "tokenizer_sha256": tok_sha,
            "val_fraction": val_fraction,
            "vocab_size": len(tokenizer),
            "dtype": dtype.name,
            **counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # Another process may have finished the same shard meanwhile: its copy is as good as ours and
        # may already be in use, so it stays. Anything else there is a damaged shard and goes.
        finished = _load_shard(shard.folder, shard.key)
        if finished is None:
            if shard.folder.exists():
                shutil.rmtree(shard.folder)
            try:
                tmp.rename(shard.folder)
            except OSError:
                finished = _load_shard(shard.folder, shard.key)
                if finished is None:
                    raise
        meta = finished or meta
        shutil.rmtree(shard.build, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    docs = meta["train"]["docs"] + meta["val"]["docs"]
    report = ShardReport(
        part.name,
        True,
        tokens,
        docs,
        meta["train"]["bytes"] + meta["val"]["bytes"],
        time.perf_counter() - started,
        workers.count,
        stats.units,
        stats.reused,
    )
    return meta, report


def _ensure_shard(
    part: CorpusPart,
    tokenizer: PalmTokenizer,
    cache_dir: Path,
    tok_sha: str,
    val_fraction: float,
    workers: Workers,
    unit_bytes: int,
    progress: bool,
) -> tuple[Path, dict, ShardReport]:
    """The shard folder of one corpus and its meta.json, tokenizing the corpus only if no shard matches."""
    shard = _Shard.of(part, cache_dir, tok_sha, val_fraction, unit_bytes)
    meta = _load_shard(shard.folder, shard.key)
    if meta is None:
        try:
            meta, report = _build(shard, tokenizer, tok_sha, val_fraction, workers, unit_bytes, progress)
            return shard.folder, meta, report
        except PalmError:
            meta = _load_shard(shard.folder, shard.key)  # finished by another process after all?
            if meta is None:
                workers.close()  # first, so that no worker writes into the folder as it goes
                shutil.rmtree(shard.build, ignore_errors=True)  # bad input: nothing worth resuming
                raise
    tokens, docs = meta["train"]["tokens"] + meta["val"]["tokens"], meta["train"]["docs"] + meta["val"]["docs"]
    return (
        shard.folder,
        meta,
        ShardReport(part.name, False, tokens, docs, meta["train"]["bytes"] + meta["val"]["bytes"]),
    )


def _job(tokenizer: PalmTokenizer) -> Job:
    backend = tokenizer.hf.backend_tokenizer
    return Job(backend.to_str(), tokenizer.eod_id, token_dtype(len(tokenizer)).name)


def tokenize_corpora(
    parts: list[CorpusPart],
    tokenizer: PalmTokenizer,
    cache_dir: Path,
    rank: int,
    world: int,
    val_fraction: float = 0.05,
    workers: int | None = None,
    progress: bool = False,
    unit_bytes: int = UNIT_BYTES,
) -> list[ShareStats]:
    """Rank `rank` of `world` tokenizes its share (every world-th unit) of each corpus that has no shard
    yet; `prepare_data` on one rank then joins them. Each rank may use several worker processes."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_sha, dtype = tokenizer_sha256(tokenizer), token_dtype(len(tokenizer))
    out = []
    with Workers(_job(tokenizer), workers or default_workers()) as pool:
        for part in parts:
            shard = _Shard.of(part, cache_dir, tok_sha, val_fraction, unit_bytes)
            if _load_shard(shard.folder, shard.key) is None:
                out.append(_tokenize(shard, pool, dtype, unit_bytes, progress, rank, world))
    return out


def prepare_data(
    parts: list[CorpusPart],
    tokenizer: PalmTokenizer,
    cache_dir: Path,
    seq_len: int,
    val_fraction: float = 0.05,
    progress: bool = True,
    workers: int | None = None,
    unit_bytes: int = UNIT_BYTES,
) -> TokenData:
    """Token streams for a mixture of corpora, tokenizing each corpus at most once per tokenizer, with
    `workers` processes (default: every processor this process may use). `TokenData.reports` says
    what each corpus took.

    Documents are held out whole for validation by a hash of their position in the corpus, so the
    split is the same on every run and machine; a corpus of fewer than 20 documents instead gives
    the last `val_fraction` of its tokens. Raises CorpusError for an empty corpus, or one whose
    training stream cannot fill a single sequence of `seq_len + 1` tokens.
    """
    if not parts:
        raise CorpusError("no corpus given")
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"validation fraction must be at least 0 and below 1, not {val_fraction}")
    if seq_len < 1:
        raise CorpusError(f"sequence length must be positive, not {seq_len}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_sha = tokenizer_sha256(tokenizer)
    byte_table = token_byte_lengths(tokenizer)
    out = TokenData([], [], [], [], [], vocab_size=len(tokenizer), seq_len=seq_len, byte_table=byte_table)
    with Workers(_job(tokenizer), workers or default_workers()) as pool:
        shards = [
            _ensure_shard(part, tokenizer, cache_dir, tok_sha, val_fraction, pool, unit_bytes, progress)
            for part in parts
        ]
    for part, (folder, meta, report) in zip(parts, shards):
        dtype = np.dtype(meta["dtype"])
        train = _open_tokens(folder / "train.bin", dtype, meta["train"]["tokens"])
        if meta["split"] == "position":
            cut = len(train) - _position_val_tokens(len(train), val_fraction, seq_len)
            train, val = train[:cut], train[cut:]
            # A block at a time: the lookup is int64, 8 bytes a token, and a 20 GB corpus holds hundreds of
            # millions of held-out tokens (one pass over it made a 3 GB temporary).
            step = 1 << 22
            val_bytes = sum(int(byte_table[val[i : i + step]].sum()) for i in range(0, len(val), step))
        else:
            val = _open_tokens(folder / "val.bin", dtype, meta["val"]["tokens"])
            val_bytes = int(meta["val"]["bytes"])
        if len(train) < seq_len + 1:
            raise CorpusError(
                f"corpus {part.name} is too small: {len(train)} training tokens, "
                f"need at least {seq_len + 1} for one sequence"
            )
        out.names.append(part.name)
        out.weights.append(part.weight)
        out.train.append(train)
        out.val.append(val)
        out.val_bytes.append(val_bytes)
        out.shard_dirs.append(folder)
        out.reports.append(report)
    return out
