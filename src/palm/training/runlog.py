"""RUN/metrics.jsonl: one JSON object per training step or event, appended as the run goes.

A killed run may have logged steps that its last checkpoint does not hold, or half a line; the log
is cut back to the checkpoint's step when the run continues, so every step appears once.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.atomic import write_text
from ..core.errors import CheckpointError


def read_metrics(path: str | Path, strict: bool = True, skipped: list[int] | None = None) -> list[dict]:
    """The log's records. A torn last line (a kill mid-write) is dropped; any other bad line is an
    error when `strict`, else dropped too. The numbers of the lines dropped are added to `skipped`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if number == len(lines) or not strict:
                if skipped is not None:
                    skipped.append(number)
                continue
            raise CheckpointError(f"{path}:{number} is corrupt: {e}") from None
        records.append(record)
    return records


class MetricsLog:
    """Appends records to the log, after cutting it back to the steps up to `keep_through`."""

    def __init__(self, path: Path, keep_through: int):
        records = read_metrics(path, strict=False)
        self.last_step = max((r.get("step", 0) for r in records), default=0)  # what a killed run got to
        kept = [r for r in records if r.get("step", 0) <= keep_through]
        if path.exists():
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
