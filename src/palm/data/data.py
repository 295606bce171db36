"""The token streams training reads: the batch of any step, and validation windows.

`get_batch` draws the batch of any step from a mixture's training streams as a pure function of the
seed and the step; `val_windows` walks the held-out tokens for evaluation in bits per byte. The
streams themselves come from `palm.data.shards.prepare_data`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CorpusError


@dataclass
class TokenData:
    """Tokenized corpora of a mixture: per corpus a training and a validation token stream."""

    names: list[str]
    weights: list[float]
    train: list[np.ndarray]
    val: list[np.ndarray]
    val_bytes: list[int]  # UTF-8 bytes of each validation stream's text
    vocab_size: int
    seq_len: int
    byte_table: np.ndarray | None = None  # token_byte_lengths of the tokenizer, for exact byte counts
    shard_dirs: list[Path] = field(default_factory=list)
    reports: list = field(
        default_factory=list
    )  # palm.data.shards.ShardReport per corpus: built or reused, counts, time


def get_batch(data: TokenData, step: int, seed: int, batch_size: int, rows: range | None = None) -> torch.Tensor:
    """Rows `rows` (all by default) of the global batch at `step`: int64 token ids, [len(rows), seq_len + 1].

    Row r comes from a generator keyed by (seed, step, r) alone: it picks a corpus by weight and a
    start in that corpus's packed training stream. So a batch never depends on earlier batches (a
    resumed run sees the same data), and a data-parallel rank that asks for its slice of rows
    gets exactly those rows of the global batch.
    """
    rows = range(batch_size) if rows is None else rows
    if rows.step != 1 or rows.start < 0 or rows.stop > batch_size:
        raise ValueError(f"rows {rows} is not a contiguous slice of a batch of {batch_size}")
    width = data.seq_len + 1
    cumulative = np.cumsum(data.weights)
    cumulative /= cumulative[-1]
    out = np.empty((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, step, r])
        part = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(cumulative) - 1)
        stream = data.train[part]
        start = int(rng.integers(0, len(stream) - width + 1))
        out[i] = stream[start : start + width]
    return torch.from_numpy(out)


def val_windows(data: TokenData, part_index: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """[1, ≤ seq_len + 1] windows over a corpus's validation stream that predict each token once.

    Consecutive windows share one token (the last input of one is the first of the next), so that
    together their targets are exactly val[1 : 1 + n], with n at most `max_tokens`: the n that
    `val_bytes_for` takes. The last window may be shorter, but has at least one target.
    """
    val = data.val[part_index]
    limit = max(len(val) - 1, 0)
    if max_tokens is not None:
        limit = min(limit, max_tokens)
    for start in range(0, limit, data.seq_len):
        end = min(start + data.seq_len, limit)
        yield torch.from_numpy(np.asarray(val[start : end + 1], dtype=np.int64)).unsqueeze(0)


def val_bytes_for(data: TokenData, part_index: int, tokens_covered: int) -> float:
    """UTF-8 bytes behind the first `tokens_covered` targets of `val_windows` (val[1 : 1 + n]).

    Exact when the data carries its tokenizer's byte table; otherwise a proportional share.
    """
    val = data.val[part_index]
    n = min(tokens_covered, max(len(val) - 1, 0))
    if data.byte_table is not None:
        return float(data.byte_table[np.asarray(val[1 : 1 + n])].sum())
    return data.val_bytes[part_index] * n / max(len(val) - 1, 1)


def unigram_bits_per_byte(data: TokenData, part_index: int, byte_table: np.ndarray) -> float:
    """A baseline: bits per byte of a unigram model (add-one smoothed, fit on train) on the validation targets.

    Scores val[1:], the tokens `val_windows` predicts, so it compares directly with a model's bpb.
    """
    val = np.asarray(data.val[part_index][1:])
    target_bytes = int(byte_table[val].sum())
    if target_bytes == 0:
        raise CorpusError(f"corpus {data.names[part_index]} has no validation text to score")
    counts = np.bincount(np.asarray(data.train[part_index]), minlength=data.vocab_size).astype(np.float64) + 1.0
    log2_p = np.log2(counts) - np.log2(counts.sum())
    return float(-log2_p[val].sum() / target_bytes)
