"""Documents chosen by a hash of their position, never by a random draw or by the order work was done:
the validation split of the token shards and the tokenizer's training sample, the same on every run,
machine and number of processes.
"""

from __future__ import annotations

import hashlib


def position_hash(*position: int) -> int:
    """A 64-bit hash of a position (a document's index, or a corpus's and a piece's)."""
    digest = hashlib.sha256(":".join(map(str, position)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def in_validation(index: int, val_fraction: float) -> bool:
    """Whether document `index` of a corpus is held out for validation."""
    return position_hash(index) < val_fraction * (1 << 64)
