"""PaLM's vocabulary (paper section 2): lossless, whitespace kept, digits split, UTF-8 byte fallback.

A BPE model from the `tokenizers` library over raw characters, so a space is an ordinary character
and `decode(encode(s)) == s` for every string (SentencePiece's `▁` escape would turn a literal `▁`
into a space). Pre-tokenization keeps an optional leading space with a word, isolates every digit,
and keeps runs of whitespace intact. Characters outside the trained alphabet become `<0xXX>` byte
tokens, which sit in the vocabulary as ordinary pieces (ids 5..260) so that the text `<0x41>` is
never read as a byte. The result is saved as a Transformers fast tokenizer.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..core.errors import TokenizerError
from .templates import CHAT_TEMPLATE, OLD_CHAT_TEMPLATE

PAD, BOS, EOS, UNK, EOD = "<pad>", "<s>", "</s>", "<unk>", "<eod>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, EOD)
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))
MIN_VOCAB_SIZE = 384  # the 261 reserved pieces plus room for the commonest characters
# Letters (with combining marks) keep one optional leading space; each digit stands alone; other
# symbols group; whitespace runs stay whole except the space that starts the next word.
PRETOKENIZE = r" ?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+"
CHARACTER_COVERAGE = 0.9995  # SentencePiece's default: rarer characters fall back to bytes


def _alphabet(char_counts: Counter, coverage: float, limit: int) -> list[str]:
    """The commonest characters that together cover `coverage` of all characters (at most `limit`).

    Ties are broken by code point: left to `tokenizers`, characters of equal count at the cut-off
    are chosen in hash order, and the same corpus would give a different vocabulary on every run.
    """
    total, covered, chosen = sum(char_counts.values()), 0, []
    for char, count in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]:
        chosen.append(char)
        covered += count
        if covered >= coverage * total:
            break
    return chosen


def _with_byte_pieces(tok: Tokenizer) -> Tokenizer:
    """Renumber the trained vocabulary to make room for the 256 byte pieces after the specials."""
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({t: len(SPECIAL_TOKENS) + i for i, t in enumerate(BYTE_TOKENS)})
    for piece, _ in trained:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def check_vocab_size(vocab_size: int) -> None:
    """A size that leaves room for the reserved pieces and that token ids can index."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special and {len(BYTE_TOKENS)} byte tokens come first, then room for the "
            "commonest characters)"
        )
    if vocab_size > 1 << 20:
        raise TokenizerError(f"vocab size {vocab_size} is too large (at most {1 << 20})")


def train_tokenizer(
    documents: Callable[[], Iterable[str]], vocab_size: int, model_max_length: int = 2048
) -> PalmTokenizer:
    """Train on the texts that `documents()` yields (called twice: to count characters, then to train)."""
    check_vocab_size(vocab_size)
    chars: Counter = Counter()
    for doc in documents():
        chars.update(doc)
    budget = vocab_size - len(BYTE_TOKENS)
    alphabet = _alphabet(chars, CHARACTER_COVERAGE, budget // 2)
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=budget,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=sys.stderr.isatty(),  # a large corpus takes a while; logs and pipes stay clean
    )
    tok.train_from_iterator(documents(), trainer)
    return PalmTokenizer(_wrap(_with_byte_pieces(tok), model_max_length))


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"eod_token": EOD},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",  # decoder-only batches pad on the left so every row ends at its last token
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # lossless: never touch spaces around punctuation
        split_special_tokens=True,  # the text "<s>" is three characters, not BOS
        chat_template=CHAT_TEMPLATE,
    )


def not_unicode(text: str) -> str | None:
    """Why `text` is not Unicode text (a lone surrogate, as JSON escapes and undecodable argv can make), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None


class PalmTokenizer:
    """palm's handle on a vocabulary: a Transformers fast tokenizer plus the ids palm needs.

    A vocabulary palm trained has its five special pieces and its byte pieces at fixed ids. Any other
    fast tokenizer (an imported model's: Command-R's byte-level BPE) is taken with the special tokens its
    own config names: BOS and EOS are required, padding falls back to EOS, and the end of a document is
    its end of sequence.
    """

    def __init__(self, hf: PreTrainedTokenizerFast):
        self.hf = hf
        self._backend: Tokenizer = hf.backend_tokenizer
        self._backend.encode_special_tokens = True
        # And for Transformers' own calls, which set their flag on the same backend: a tokenizer saved by a
        # trainer that loaded it reading "<s>" as BOS (TRL's, docs/finetuning.md) is read, and saved, as palm's.
        hf.split_special_tokens = True
        self._markup: Tokenizer | None = None
        self._chat_hf: PreTrainedTokenizerFast | None = None
        ids = {t: self._backend.token_to_id(t) for t in SPECIAL_TOKENS}
        self.own = None not in ids.values()
        if self.own:
            # Saved before palm had a chat template, or before it marked the assistant turns: the same text,
            # and now a mask that apply_chat_template and TRL can read.
            if not hf.chat_template or (
                isinstance(hf.chat_template, str) and hf.chat_template.strip() == OLD_CHAT_TEMPLATE
            ):
                hf.chat_template = CHAT_TEMPLATE
            self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.eod_id = (ids[t] for t in SPECIAL_TOKENS)
            self.special_texts: tuple[str, ...] = SPECIAL_TOKENS
            self.byte_ids = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(BYTE_TOKENS))
            return
        if hf.bos_token_id is None or hf.eos_token_id is None:
            missing = ", ".join(n for n in ("bos_token", "eos_token") if getattr(hf, n + "_id") is None)
            raise TokenizerError(f"tokenizer names no {missing} (palm needs a start and an end of sequence)")
        self.bos_id, self.eos_id = hf.bos_token_id, hf.eos_token_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        self.unk_id, self.eod_id = hf.unk_token_id, self.eos_id
        self.special_texts = tuple(t for t in hf.all_special_tokens if t)
        self.byte_ids = range(0)  # byte-level pieces are whole tokens: an incomplete character decodes to U+FFFD

    @classmethod
    def load(cls, path: str | Path) -> PalmTokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path} holds no tokenizer (tokenizer.json is missing)")
        try:
            return cls(PreTrainedTokenizerFast.from_pretrained(str(path)))
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))

    def __len__(self) -> int:
        return self._backend.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first by default (as `AutoTokenizer` gives them)."""
        try:
            return self._backend.encode(text, add_special_tokens=bos).ids
        except TypeError:  # what `tokenizers` says of a str it cannot pass to Rust: a lone surrogate
            raise TokenizerError(f"the text is not valid Unicode: {not_unicode(text)}") from None

    def encode_markup(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of text written by a template, whose `<s>`, `</s>`, ... are the special
        tokens (a rendered chat), with no BOS added. Every other encode reads that text as characters."""
        if self._markup is None:  # a second backend, so that no thread ever sees the flag flipped
            self._markup = Tokenizer.from_str(self._backend.to_str())
            self._markup.encode_special_tokens = False
        try:
            enc = self._markup.encode(text, add_special_tokens=False)
        except TypeError:
            raise TokenizerError(f"the text is not valid Unicode: {not_unicode(text)}") from None
        return enc.ids, list(enc.offsets)

    @property
    def chat_hf(self) -> PreTrainedTokenizerFast:
        """`hf` reading the special tokens' text as the tokens (encode_markup's reading), so that its
        `apply_chat_template(..., tokenize=True)` gives the ids of the text its template wrote: `hf` itself
        spells out the `<s>` and `</s>` the template writes. A copy, because Transformers leaves its
        reading set on the backend it encodes with, which encode needs as it is."""
        if self._chat_hf is None:
            chat = copy.deepcopy(self.hf)
            chat.split_special_tokens = False
            chat.backend_tokenizer.encode_special_tokens = False
            chat.model_max_length = sys.maxsize  # a conversation is cut to --seq-len later, not warned about here
            self._chat_hf = chat
        return self._chat_hf

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        # encode_batch_fast skips character offsets, which palm never reads: 3x the MB/s (bench/tokenizer.py).
        try:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=bos)]
        except TypeError:
            bad = next((t for t in texts if not_unicode(t)), "")
            raise TokenizerError(f"a text is not valid Unicode: {not_unicode(bad)}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, leaving out special tokens: `decode(encode(s)) == s`."""
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def pieces(self, text: str) -> list[str]:
        return self._backend.encode(text, add_special_tokens=False).tokens
