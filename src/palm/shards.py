"""Token shards: each corpus of a mixture tokenized once, cached, and reused.

    <cache_dir>/<slug>-<key>/train.bin   token ids, documents back to back, <eod> after each
    <cache_dir>/<slug>-<key>/val.bin     the held-out documents, laid out the same way
    <cache_dir>/<slug>-<key>/meta.json   key, dtype, split mode, token/document/byte counts

The key hashes the corpus's fingerprint, the tokenizer and the validation fraction, so a changed
file or vocabulary builds a new folder and an unchanged one is reused as is. Folders appear by
rename from a temporary folder, so one that exists is complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .corpora import CorpusPart, part_documents, part_fingerprint
from .data import TokenData
from .errors import CorpusError
from .tokenizer import BYTE_TOKENS, PalmTokenizer

SHARD_FORMAT = 1
_TOKENIZE_CHUNK = 1000
# Below this many documents a by-document split would leave validation empty or erratic.
_MIN_DOCS_FOR_DOCUMENT_SPLIT = 20


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


def in_validation(index: int, val_fraction: float) -> bool:
    """Whether document `index` is held out: a hash of its position, so the split never depends on run order."""
    digest = hashlib.sha256(f"{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * (1 << 64)


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


class _Stream:
    """A token file being written, with the counts meta.json records."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.file = open(path, "wb")
        self.dtype = dtype
        self.tokens = self.docs = self.bytes = 0

    def write(self, ids: list[int], text_bytes: int) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.tokens += len(ids)
        self.docs += 1
        self.bytes += text_bytes

    def counts(self) -> dict[str, int]:
        return {"tokens": self.tokens, "docs": self.docs, "bytes": self.bytes}


def _build_shard(
    part: CorpusPart, tokenizer: PalmTokenizer, folder: Path, dtype: np.dtype, val_fraction: float, progress: bool
) -> dict:
    """Tokenize the corpus into `folder` (train.bin, val.bin); returns the counts for meta.json."""
    train = _Stream(folder / "train.bin", dtype)
    val = _Stream(folder / "val.bin", dtype)
    docs = iter(part_documents(part))
    held: list[tuple[list[int], int]] = []  # the first documents, kept back until the split mode is known
    by_document = False
    index = 0
    with train.file, val.file, tqdm(desc=f"tokenizing {part.name}", unit="doc", disable=not progress, file=sys.stderr) as bar:
        while chunk := list(itertools.islice(docs, _TOKENIZE_CHUNK)):
            for text, ids in zip(chunk, tokenizer.encode_batch(chunk, bos=False)):
                ids.append(tokenizer.eod_id)
                item = (ids, len(text.encode("utf-8")))
                if not by_document:
                    held.append(item)
                    if len(held) < _MIN_DOCS_FOR_DOCUMENT_SPLIT:
                        continue
                    by_document = True
                    for i, (held_ids, held_bytes) in enumerate(held):
                        (val if in_validation(i, val_fraction) else train).write(held_ids, held_bytes)
                    index, held = len(held), []
                    continue
                (val if in_validation(index, val_fraction) else train).write(*item)
                index += 1
            bar.update(len(chunk))
        if not by_document:
            # Too few documents to hold some out whole: all go to train.bin, and prepare_data cuts
            # the validation stretch off its end for the sequence length at hand.
            for held_ids, held_bytes in held:
                train.write(held_ids, held_bytes)
    if train.tokens + val.tokens == 0:
        raise CorpusError(f"corpus {part.name} is empty: it holds no text")
    return {"split": "document" if by_document else "position", "train": train.counts(), "val": val.counts()}


def _position_val_tokens(n_tokens: int, val_fraction: float, seq_len: int) -> int:
    """Validation tokens cut off the end of a small corpus: val_fraction of it, at least one sequence
    when training keeps a sequence's worth too, and none rather than a lone token."""
    if val_fraction == 0:
        return 0
    n_val = min(max(math.ceil(val_fraction * n_tokens), seq_len + 1), n_tokens - (seq_len + 1))
    return n_val if n_val >= 2 else 0


def _shard_key(part: CorpusPart, tokenizer_sha256: str, val_fraction: float) -> str:
    spec = f"{SHARD_FORMAT}\0{part_fingerprint(part)}\0{tokenizer_sha256}\0{val_fraction!r}"
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def _ensure_shard(
    part: CorpusPart, tokenizer: PalmTokenizer, cache_dir: Path, tokenizer_sha256: str, val_fraction: float, progress: bool
) -> tuple[Path, dict]:
    """The shard folder of one corpus and its meta.json, tokenizing the corpus only if no shard matches."""
    key = _shard_key(part, tokenizer_sha256, val_fraction)
    folder = cache_dir / f"{_slug(part.name)}-{key}"
    meta = _load_shard(folder, key)
    if meta is not None:
        return folder, meta
    dtype = token_dtype(len(tokenizer))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=cache_dir))
    try:
        counts = _build_shard(part, tokenizer, tmp, dtype, val_fraction, progress)
        meta = {
            "format": SHARD_FORMAT,
            "key": key,
            "corpus": part.name,
            "source": part.source,
            "tokenizer_sha256": tokenizer_sha256,
            "val_fraction": val_fraction,
            "vocab_size": len(tokenizer),
            "dtype": dtype.name,
            **counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # Another process (a data-parallel rank) may have finished the same shard meanwhile: its
        # copy is as good as ours and may already be in use, so it stays. Anything else there is
        # a damaged shard and goes.
        finished = _load_shard(folder, key)
        if finished is not None:
            return folder, finished
        if folder.exists():
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            finished = _load_shard(folder, key)
            if finished is None:
                raise
            return folder, finished
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder, meta


def prepare_data(
    parts: list[CorpusPart],
    tokenizer: PalmTokenizer,
    cache_dir: Path,
    seq_len: int,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> TokenData:
    """Token streams for a mixture of corpora, tokenizing each corpus at most once per tokenizer.

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
    for part in parts:
        folder, meta = _ensure_shard(part, tokenizer, cache_dir, tok_sha, val_fraction, progress)
        dtype = np.dtype(meta["dtype"])
        train = _open_tokens(folder / "train.bin", dtype, meta["train"]["tokens"])
        if meta["split"] == "position":
            cut = len(train) - _position_val_tokens(len(train), val_fraction, seq_len)
            train, val = train[:cut], train[cut:]
            val_bytes = int(byte_table[val].sum())
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
    return out
