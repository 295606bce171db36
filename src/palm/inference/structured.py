"""Structured output: a row's next token restricted to what keeps its text inside a grammar, JSON or a JSON
schema (OpenAI's `response_format`, and `tools` calls), with xgrammar.

xgrammar was chosen over llguidance and outlines-core because it builds its token table from a vocabulary
of raw pieces with `<0xXX>` byte fallback, which is what a palm vocabulary is (spaces are ordinary
characters, no `▁`), compiles a schema in milliseconds, and fills a row's mask as a packed bitmask that
is applied in place; other vocabularies (an imported model's byte-level BPE) go through its Transformers
reader. One `Grammars` per model (a compiler and its cache); one `Constraint` per request row, which the
engine asks for a mask before each of the row's tokens and tells each token it chose.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from ..core.errors import PalmError
from ..text.tokenizer import PalmTokenizer


class GrammarError(PalmError):
    """A schema the grammar compiler cannot build, or structured output without its library."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise GrammarError("structured output needs xgrammar: pip install 'palm[structured]'") from None
    return xgrammar


def tokenizer_info(tokenizer: PalmTokenizer, vocab_size: int, stop_ids: list[int]):
    """xgrammar's view of a model's vocabulary: a palm vocabulary as its raw pieces with `<0xXX>` byte
    fallback (spaces are ordinary characters), any other through xgrammar's Transformers reader."""
    xgr = _xgrammar()
    if not tokenizer.own:
        return xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=vocab_size, stop_token_ids=stop_ids)
    pieces = [""] * vocab_size
    for piece, index in tokenizer.hf.backend_tokenizer.get_vocab().items():
        pieces[index] = piece
    return xgr.TokenizerInfo(
        pieces,
        vocab_type=xgr.VocabType.BYTE_FALLBACK,
        vocab_size=vocab_size,
        stop_token_ids=stop_ids,
        add_prefix_space=False,
    )


class Grammars:
    """Compiles JSON grammars for one model's vocabulary (compiled grammars are cached by the compiler)."""

    def __init__(self, tokenizer: PalmTokenizer, vocab_size: int, stop_ids: list[int]):
        xgr = _xgrammar()
        info = tokenizer_info(tokenizer, vocab_size, stop_ids)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info)
        # xgrammar's JSON strings admit raw control characters, which JSON (and Python's json.loads) refuses:
        # tokens holding one are kept out of every JSON reply (no whitespace but spaces is asked for either).
        # They are cleared from a packed mask of the vocabulary that every row's grammar mask is ANDed with.
        banned = [
            i
            for i, piece in enumerate(info.decoded_vocab)
            if i not in stop_ids and any(b < 0x20 or b == 0x7F for b in piece)
        ]
        keep = torch.ones(_words(vocab_size) * 32, dtype=torch.bool)
        keep[banned] = False
        self.keep = _pack(keep)

    def json(self, schema: dict | None = None):
        """The grammar of any JSON object (None) or of JSON valid against `schema`, without free whitespace
        (a model that may pad JSON with spaces forever, a random one, would never close it)."""
        try:  # OpenAI's json_object: an object, not any JSON value
            return self.compiler.compile_json_schema(json.dumps(schema or {"type": "object"}), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as e:  # its messages start "[time] file.cc:line: "
            detail = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
            raise GrammarError(f"the JSON schema cannot be compiled: {detail or type(e).__name__}") from None

    def constraint(self, grammar) -> Constraint:
        return Constraint(grammar, self.keep)


class Constraint:
    """One row's place in its grammar."""

    def __init__(self, grammar, keep: torch.Tensor):
        self.matcher = _xgrammar().GrammarMatcher(grammar)
        self.keep = keep  # the packed vocabulary mask of its Grammars

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """Bools [.., 32 W] as xgrammar packs them: int32 words [.., W], token 32 w + b at bit b of word w."""
    bits = allowed.reshape(*allowed.shape[:-1], -1, 32).to(torch.int64) << _SHIFTS.to(torch.int64)
    return bits.sum(-1).to(torch.int32)  # the sum of distinct bits is their OR; past 2^31 it wraps as int32 does


def restrict(logits: torch.Tensor, constraints: list[Constraint | None]) -> None:
    """Set to -inf, in place, the logits [N, V] of tokens that would take row i out of constraints[i]'s grammar
    (a row without one is left alone): every row's mask filled into one packed bitmask, then applied at once
    (xgrammar's own CPU kernel applies a row at a time, six times slower here)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    bitmask = torch.full((len(rows), _words(logits.shape[-1])), -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        constraints[i].matcher.fill_next_token_bitmask(bitmask, j)
        bitmask[j] &= constraints[i].keep
    allowed = (bitmask[:, :, None] >> _SHIFTS).bitwise_and_(1).bool().flatten(1)[:, : logits.shape[-1]]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill_(~allowed.to(logits.device), float("-inf"))


def tool_schema(tools: list[dict], choice: Any) -> dict:
    """The JSON schema of a call of one of `tools` (OpenAI's function tools), or of the one `choice` names:
    {"name": <its name>, "arguments": <its parameters>}."""
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    calls = []
    for tool in tools:
        function = tool.get("function", {})
        if named is not None and function.get("name") != named:
            continue
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function.get("name")},
                    "arguments": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not calls:
        raise GrammarError(f"tool_choice names {named!r}, which is not one of the tools")
    return calls[0] if len(calls) == 1 else {"anyOf": calls}
