"""Fine-tuning rows and their loss masks: prompt/completion pairs and chat conversations.

An encoded example is (ids, scored): the token ids of one row and, per token, whether training scores
it. A prompt/completion row `<s> template(prompt) completion </s>` scores the completion and its
`</s>` (prompt and completion are tokenized apart, as they are at inference); a conversation scores
every assistant turn and the `</s>` that closes each (palm.chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import ChatError, check_messages, encode_conversation
from .documents import jsonl_rows
from .errors import PalmError
from .loss import IGNORE_INDEX
from .templates import format_prompt
from .tokenizer import PalmTokenizer

FORMATS = ("completion", "chat")

Encoded = tuple[list[int], list[bool]]


class DataError(PalmError):
    """A fine-tuning data file that cannot be used."""


def read_rows(path: str | Path, format: str = "completion") -> list[dict]:
    """The rows of a JSONL file: `{"prompt": str, "completion": str}`, or with `format="chat"`
    `{"messages": [{"role", "content"}, ...]}`; DataError names the first bad line."""
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


def encode_row(tok: PalmTokenizer, row: dict, task: str | None, max_len: int) -> Encoded:
    """A row in at most max_len + 1 ids. A prompt too long for the window loses its beginning, a
    conversation its earliest turns; a completion is never cut."""
    if "messages" in row:
        ids, scored = encode_conversation(tok, row["messages"])
        ids, scored = ids[-(max_len + 1) :], scored[-(max_len + 1) :]
        if not any(scored[1:]):
            raise DataError(f"a conversation's last assistant turn is longer than --seq-len {max_len} allows")
        return ids, scored
    prompt = tok.encode(format_prompt(row["prompt"], task), bos=False)
    completion = tok.encode(row["completion"], bos=False) + [tok.eos_id]
    room = max_len + 1 - 1 - len(completion)
    if room < 0:
        raise DataError(f"a completion is {len(completion)} tokens, more than --seq-len {max_len} allows")
    prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
    return [tok.bos_id] + prompt + completion, [False] * (1 + len(prompt)) + [True] * len(completion)


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
    _orders: dict = field(default_factory=dict, repr=False)

    def order(self, seed: int, epoch: int) -> list[int]:
        """A shuffle of the training rows per epoch, keyed by (seed, epoch) alone."""
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.train), generator=gen).tolist()}
        return self._orders[epoch]


def load_examples(data: str, val: str | None, format: str, task: str | None, seq_len: int, val_fraction: float,
                  seed: int, tok: PalmTokenizer) -> Examples:
    """The run's training and validation rows, encoded; without `val`, a seeded share of `data` is held out."""
    rows = read_rows(data, format)
    if val is not None:
        val_rows = read_rows(val, format)
    else:
        if len(rows) < 2:
            raise DataError(f"{data} has one example: nothing to hold out for validation (pass --val FILE)")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=gen).tolist()
        n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
        held = set(order[:n_val])
        val_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    encode = lambda rs: [encode_row(tok, r, task, seq_len) for r in rs]  # noqa: E731
    return Examples(encode(rows), encode(val_rows), tok.pad_id)
