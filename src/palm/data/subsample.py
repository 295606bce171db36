"""The tokenizer's training sample: a byte budget of a corpus's documents, chosen by a hash of their position.

Training a BPE vocabulary holds what it learns from in memory, so a large corpus is sampled first.
Every document (or piece of a long one, see palm.data.documents) is ranked by a hash of its corpus's index
in the mixture and its own position, and the lowest-ranked ones that fit the budget are kept, in
corpus order: the same corpus gives the same sample, and so the same tokenizer, on every run and
machine, and a corpus within the budget is used whole. The corpus is read once, in bounded pieces;
only the sample is held.
"""

from __future__ import annotations

import heapq
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from ..core.errors import CorpusError
from .choice import position_hash
from .corpora import CorpusPart, part_pieces
from .textio import human_size

DEFAULT_SAMPLE_BYTES = 200_000_000  # enough text for a 32k vocabulary; well under 2 GB of memory to train on
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?", re.IGNORECASE)


def parse_size(text: str | int, flag: str = "size") -> int:
    """Bytes from `200000000`, `200MB`, `1.5GB` or `256MiB` (k, M, G, T: powers of 1000; with i, of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if not match or (match.group(3) and not match.group(2)):
        raise CorpusError(f"{flag} must be a size such as 200MB, 1.5GB or 500000000, not {text!r}")
    number, prefix, binary = match.groups()
    scale = (1024 if binary else 1000) ** ("kmgt".index(prefix.lower()) + 1) if prefix else 1
    return int(float(number) * scale)


@dataclass
class Sample:
    texts: list[str]  # in corpus order
    budget: int
    bytes_total: int  # UTF-8 bytes of the whole corpus
    bytes_kept: int
    pieces_total: int
    pieces_kept: int

    def line(self) -> str:
        whole = " (the whole corpus)" if self.pieces_kept == self.pieces_total else ""
        return (
            f"sampled {human_size(self.bytes_kept)} of {human_size(self.bytes_total)}{whole} for the tokenizer: "
            f"{self.pieces_kept:,} of {self.pieces_total:,} documents and pieces, "
            f"budget {human_size(self.budget)} (--sample-bytes)"
        )


def sample_corpora(parts: Sequence[CorpusPart], budget: int = DEFAULT_SAMPLE_BYTES, progress: bool = False) -> Sample:
    """At most `budget` bytes of the corpora's text: the pieces of lowest hash that fit, in corpus order.
    With `progress`, a bar on stderr counts the text read: decompressed bytes, which for a .gz or .zst can be
    many times the file's size, so a user sees what the wait is for."""
    if budget < 1:
        raise CorpusError(f"the sample budget must be at least 1 byte, not {budget}")
    heap: list[tuple[int, int, str, int]] = []  # (-hash, order, text, bytes): the largest hash on top
    cutoff = 1 << 64  # every piece hashed at or above it is out, whatever comes later
    kept = total = count = 0
    bar = tqdm(
        desc="reading for the tokenizer's sample", unit="B", unit_scale=True, disable=not progress, file=sys.stderr
    )
    for p, part in enumerate(parts):
        for i, (text, _) in enumerate(part_pieces(part)):
            size = len(text.encode("utf-8"))
            total += size
            count += 1
            bar.update(size)
            h = position_hash(p, i)
            if h >= cutoff:
                continue
            heapq.heappush(heap, (-h, count, text, size))
            kept += size
            while kept > budget:
                neg, _, _, dropped = heapq.heappop(heap)
                kept -= dropped
                cutoff = -neg
    bar.close()
    if not heap:
        if total:
            raise CorpusError(f"no document fits the sample budget of {budget:,} bytes; raise --sample-bytes")
        raise CorpusError("the corpus holds no text")
    texts = [text for _, _, text, _ in sorted(heap, key=lambda item: item[1])]
    return Sample(texts, budget, total, kept, count, len(texts))
