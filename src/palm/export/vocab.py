"""palm's vocabulary as llama.cpp's tokenizer reads it: `tokenizer.ggml.*` in a GGUF file.

llama.cpp's BPE tokenizer splits text with a regex it knows by name, maps every byte to a character
(GPT-2's table), merges by the ranks in the file, and looks the results up. palm's default vocabulary
is BPE over characters, not bytes, with its own regex and `<0xXX>` pieces for characters outside its
alphabet. It is carried over as the closest byte-level equivalent:

- every piece is written as its UTF-8 bytes in GPT-2's characters, and the byte piece for byte b as
  byte b's character (the `<0xXX>` name is kept where that character is already a piece, as for
  ASCII letters: palm never falls back to those bytes, and llama.cpp has one token per text);
- palm starts from characters and llama.cpp from bytes, so merges that build each multi-byte
  character of palm's alphabet from its bytes come first, then palm's merges in palm's order;
- the pre-tokenizer is the one llama.cpp calls `trillion`: GPT-2's regex, and no clean-up of spaces
  before punctuation when decoding (which `gpt-2` does). It splits text at palm's boundaries or at
  coarser ones (digit runs, contractions), and palm's merges never join across a palm boundary, so
  the ids are palm's. (`command-r` splits digits off first, which cuts the whitespace before a digit
  differently from palm: "   2" is "  ", " ", "2" in palm.)
- a character outside palm's alphabet whose first bytes begin one inside it stops half-built (the
  merges are context-free). llama.cpp would drop the bytes of such a piece, so each of these prefixes
  is an extra token after palm's vocabulary that decodes to its bytes (its embedding is a copy of its
  first byte's). Nothing is lost; only lines with such characters get other ids than palm's.

Where the ids differ: combining marks after letters (GPT-2's regex splits them off, palm's keeps them
with the letter) and the characters above. The byte-level vocabulary of bytelevel.py has no gap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..core.errors import TokenizerError
from ..text.tokenizer import BYTE_TOKENS, PRETOKENIZE, PalmTokenizer
from .bytelevel import LLAMA_CPP_PRE, byte_alphabet, is_byte_level

DEFAULT_PRE = "trillion"
# llama.cpp's token types (gguf.TokenType), spelled here so that reading a vocabulary needs no gguf package.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


@dataclass
class LlamaVocab:
    """What a GGUF file says about the vocabulary, and how faithful it is to palm's."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    exact: bool  # llama.cpp's tokenizer gives palm's ids for every text
    # For each token past palm's vocabulary, in order: the palm id whose embedding row it reuses.
    extra_rows: list[int] = field(default_factory=list)

    @property
    def note(self) -> str:
        if self.exact:
            return f"byte-level vocabulary ({self.pre} pre-tokenizer): llama.cpp's tokenizer gives palm's ids"
        return (
            f"palm's character vocabulary as byte-level BPE ({self.pre} pre-tokenizer): llama.cpp's tokenizer "
            f"gives palm's ids except on combining marks and on characters outside palm's alphabet "
            f"({len(self.extra_rows)} extra tokens keep their bytes); feed palm's ids for exact agreement"
        )


def llama_vocab(tokenizer: PalmTokenizer) -> LlamaVocab:
    """The GGUF vocabulary of a palm tokenizer (either kind); a TokenizerError for any other."""
    spec = json.loads(tokenizer.hf.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"cannot convert a {model.get('type')!r} tokenizer for llama.cpp: palm's are BPE")
    if is_byte_level(spec):
        return _byte_level(tokenizer, model)
    split = spec.get("pre_tokenizer") or {}
    if (
        split.get("type") != "Split"
        or split.get("pattern", {}).get("Regex") != PRETOKENIZE
        or not model.get("byte_fallback")
    ):
        raise TokenizerError("the tokenizer is neither palm's default vocabulary nor its byte-level one")
    return _characters(tokenizer, model)


def placeholder_vocab(size: int) -> LlamaVocab:
    """`size` made-up pieces: enough for llama.cpp to run a GGUF file on ids alone (bench/decode.py times
    random weights, which have no tokenizer)."""
    tokens = [f"<{i}>" for i in range(size)]
    # llama.cpp refuses a BPE vocabulary without merges, and the gguf package writes no empty array.
    return LlamaVocab(DEFAULT_PRE, tokens, [NORMAL] * size, [f"{tokens[0]} {tokens[-1]}"], exact=False)


def _pairs(model: dict) -> list[tuple[str, str]]:
    """A tokenizer.json's merges, in either of the two spellings `tokenizers` has used."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def _special_types(tokenizer: PalmTokenizer) -> dict[int, int]:
    special = {i: CONTROL for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.eod_id)}
    special[tokenizer.unk_id] = UNKNOWN
    return special


def _ordered(model: dict) -> list[str]:
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise TokenizerError("the tokenizer's ids are not 0..N-1 without gaps")
    return [piece for piece, _ in by_id]


def _byte_level(tokenizer: PalmTokenizer, model: dict) -> LlamaVocab:
    pieces, special = _ordered(model), _special_types(tokenizer)
    types = [special.get(i, NORMAL) for i in range(len(pieces))]
    merges = [f"{a} {b}" for a, b in _pairs(model)]
    return LlamaVocab(LLAMA_CPP_PRE, pieces, types, merges, exact=True)


def _characters(tokenizer: PalmTokenizer, model: dict) -> LlamaVocab:
    table = byte_alphabet()

    def as_bytes(text: str | bytes) -> str:
        return "".join(table[b] for b in (text.encode("utf-8") if isinstance(text, str) else text))

    pieces, special = _ordered(model), _special_types(tokenizer)
    byte_ids = {piece: b for b, piece in enumerate(BYTE_TOKENS)}
    tokens: list[str | None] = [None] * len(pieces)
    types = [NORMAL] * len(pieces)
    for i, piece in enumerate(pieces):
        if i in special:
            tokens[i], types[i] = piece, special[i]
        elif piece not in byte_ids:
            tokens[i] = as_bytes(piece)
    taken = set(t for t in tokens if t is not None)
    for i, piece in enumerate(pieces):
        if tokens[i] is None:  # a byte piece
            char = table[byte_ids[piece]]
            tokens[i], types[i] = (piece, BYTE) if char in taken else (char, NORMAL)
    taken = set(tokens)

    # Build each multi-byte character from its first two bytes, then one byte at a time: all of these
    # rank before palm's own merges, so characters are whole before palm's merges see them.
    alphabet = sorted({c for i, p in enumerate(pieces) if i not in special and p not in byte_ids for c in p})
    chains: dict[bytes, None] = {}
    for char in alphabet:
        raw = char.encode("utf-8")
        for end in range(2, len(raw) + 1):
            chains.setdefault(raw[:end])
    built = sorted(chains, key=lambda raw: (len(raw), raw))
    merges = [f"{as_bytes(raw[:-1])} {as_bytes(raw[-1:])}" for raw in built]
    merges += [f"{as_bytes(a)} {as_bytes(b)}" for a, b in _pairs(model)]

    extra_rows = []
    first_byte_id = {b: model["vocab"][piece] for piece, b in byte_ids.items()}
    for raw in built:
        text = as_bytes(raw)
        if text not in taken:  # a prefix of a character, not a character: where building can stop
            tokens.append(text)
            types.append(NORMAL)
            extra_rows.append(first_byte_id[raw[0]])
    return LlamaVocab(DEFAULT_PRE, tokens, types, merges, exact=False, extra_rows=extra_rows)
