"""Fine-tuning rows and their loss masks: prompt/completion pairs, task rows and chat conversations.

An encoded example is (ids, scored): the token ids of one row and, per token, whether training scores
it. A prompt/completion row `<s> template(prompt) completion </s>` scores the completion and its
`</s>` (prompt and completion are tokenized apart, as they are at inference); a conversation scores
every assistant turn and the `</s>` that closes each (palm.text.chat). With a task, rows come in their data
set's schema (palm.data.taskdata), and one too long for the window loses the tail of its document, never the
instruction or the document's head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import PalmError
from ..data.documents import jsonl_rows
from ..data.taskdata import Schema, TaskDataError, TaskRow, read_task_rows
from ..model.loss import IGNORE_INDEX
from ..text.chat import ChatError, check_messages, encode_conversation
from ..text.tokenizer import PalmTokenizer

FORMATS = ("completion", "chat")

Encoded = tuple[list[int], list[bool]]


class DataError(PalmError):
    """A fine-tuning data file that cannot be used."""


def read_rows(path: str | Path, format: str = "completion", schema: Schema | None = None) -> list[dict] | list[TaskRow]:
    """The rows of a JSONL file: `{"prompt": str, "completion": str}`, or with `format="chat"`
    `{"messages": [{"role", "content"}, ...]}`; with a task's `schema`, the rows of any file palm.data.taskdata
    reads. DataError names the first bad row."""
    if schema is not None and format != "chat":
        try:
            return read_task_rows(path, schema)
        except TaskDataError as e:
            raise DataError(str(e)) from None
    rows = []
    for where, row in jsonl_rows(Path(path), DataError, "data file"):
        rows.append(_chat_row(where, row) if format == "chat" else _completion_row(where, row))
    if not rows:
        raise DataError(f"data file {path} holds no examples")
    return rows


def _completion_row(where: str, row) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object with prompt and completion")
    for key in ("prompt", "completion"):
        if key not in row:
            raise DataError(f"{where} has no {key!r} field")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, not {type(row[key]).__name__}")
    if not row["completion"]:
        raise DataError(f"{where}: 'completion' is empty")
    return row


def _chat_row(where: str, row) -> dict:
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(f'{where} is not a JSON object with "messages" (a chat row)')
    try:
        return {"messages": check_messages(row["messages"], need_assistant=True)}
    except ChatError as e:
        raise DataError(f"{where}: {e}") from None


def encode_row(tok: PalmTokenizer, row: dict | TaskRow, max_len: int) -> tuple[Encoded, bool]:
    """(a row in at most max_len + 1 ids, whether it was cut). A task row too long for the window loses
    the tail of its document (instruction and head kept); a plain prompt its beginning; a conversation its
    earliest turns; a completion is never cut."""
    if isinstance(row, TaskRow):
        return _encode_task_row(tok, row, max_len)
    if "messages" in row:
        ids, scored = encode_conversation(tok, row["messages"])
        cut = len(ids) > max_len + 1
        ids, scored = ids[-(max_len + 1) :], scored[-(max_len + 1) :]
        if not any(scored[1:]):
            raise DataError(f"a conversation's last assistant turn is longer than --seq-len {max_len} allows")
        return (ids, scored), cut
    prompt = tok.encode(row["prompt"], bos=False)
    completion = _completion(tok, row["completion"], max_len)
    room = max_len - len(completion)
    cut = len(prompt) > room
    prompt = prompt[len(prompt) - room :] if cut else prompt
    return ([tok.bos_id] + prompt + completion, [False] * (1 + len(prompt)) + [True] * len(completion)), cut


def _completion(tok: PalmTokenizer, text: str, max_len: int) -> list[int]:
    completion = tok.encode(text, bos=False) + [tok.eos_id]
    if len(completion) > max_len:
        raise DataError(f"a completion is {len(completion)} tokens, more than --seq-len {max_len} allows")
    return completion


def _encode_task_row(tok: PalmTokenizer, row: TaskRow, max_len: int) -> tuple[Encoded, bool]:
    completion = _completion(tok, row.completion, max_len)
    fitted = row.fitted(tok, max_len - len(completion), bos=False)
    if fitted is None:
        raise DataError(f"a row's instruction and completion alone are longer than --seq-len {max_len} allows")
    prompt, cut = fitted
    return ([tok.bos_id] + prompt + completion, [False] * (1 + len(prompt)) + [True] * len(completion)), cut


def collate(examples: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, T], right-padded; targets that are not scored, and padding, are IGNORE_INDEX.

    Padding sits after each row's last token, so causal attention never lets a real token see it.
    """
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, scored) in enumerate(examples):
        t = torch.tensor(ids)
        x[r, : len(ids) - 1] = t[:-1]
        # Target j is ids[j + 1], kept where that token is scored.
        y[r, : len(ids) - 1] = torch.where(torch.tensor(scored[1:]), t[1:], IGNORE_INDEX)
    return x, y


@dataclass
class Examples:
    """The encoded rows of a fine-tuning run."""

    train: list[Encoded]
    val: list[Encoded]
    pad_id: int
    cut: int = 0  # rows (train and validation) cut to fit the window
    _orders: dict = field(default_factory=dict, repr=False)

    def order(self, seed: int, epoch: int) -> list[int]:
        """A shuffle of the training rows per epoch, keyed by (seed, epoch) alone."""
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.train), generator=gen).tolist()}
        return self._orders[epoch]


def load_examples(
    data: str,
    val: str | None,
    format: str,
    schema: Schema | None,
    seq_len: int,
    val_fraction: float,
    seed: int,
    tok: PalmTokenizer,
) -> Examples:
    """The run's training and validation rows, encoded; without `val`, a seeded share of `data` is held out.
    Prompt/completion rows without a task's schema are taken as they are."""
    rows: list = read_rows(data, format, schema)
    if val is not None:
        val_rows: list = read_rows(val, format, schema)
    else:
        if len(rows) < 2:
            raise DataError(f"{data} has one example: nothing to hold out for validation (pass --val FILE)")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=gen).tolist()
        n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
        held = set(order[:n_val])
        val_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    train, val_encoded = ([encode_row(tok, r, seq_len) for r in rs] for rs in (rows, val_rows))
    cut = sum(c for _, c in train) + sum(c for _, c in val_encoded)
    return Examples([e for e, _ in train], [e for e, _ in val_encoded], tok.pad_id, cut=cut)
