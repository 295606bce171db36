"""A byte-level palm vocabulary that llama.cpp's tokenizer reproduces id for id.

llama.cpp cannot be given a pre-tokenizer regex: it knows a fixed list of them by name. palm's default
vocabulary is BPE over characters with its own regex, which no name matches exactly (see vocab.py).
This one is trained with the regex llama.cpp calls `qwen2`, over bytes (GPT-2's byte-to-character
map), so every text has a tokenization that llama.cpp finds too. It keeps what palm's vocabulary
promises: lossless round trips (`decode(encode(s)) == s` for every string), every digit on its own
(`\\p{N}`), and whitespace runs kept whole. Ids 0-4 are palm's special tokens, ids 5-260 the 256
bytes in byte order (id 5 + b is byte b, as palm's `<0xXX>` pieces are), the merged pieces after them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..text.tokenizer import BOS, EOD, EOS, PAD, SPECIAL_TOKENS, UNK, PalmTokenizer, check_vocab_size

# The name llama.cpp gives this regex (`tokenizer.ggml.pre`), and the regex as Qwen2's tokenizer.json has it.
LLAMA_CPP_PRE = "qwen2"
PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_alphabet() -> list[str]:
    """The 256 characters that stand for bytes 0..255, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _renumbered(tok: Tokenizer) -> Tokenizer:
    """Specials first, then the bytes in byte order, then the merged pieces in the order they were learned."""
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in byte_alphabet() + [p for p, _ in learned]:
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def train_byte_level(
    documents: Callable[[], Iterable[str]], vocab_size: int, model_max_length: int = 2048
) -> PalmTokenizer:
    """A byte-level vocabulary of `vocab_size` pieces trained on `documents()`, as a PalmTokenizer."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(documents(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_renumbered(tok),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"eod_token": EOD},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
    return PalmTokenizer(hf)


def is_byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json (parsed) is this vocabulary: byte-level BPE after the `qwen2` split."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    return (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == PRETOKENIZE
        and steps[1].get("type") == "ByteLevel"
        and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    )
