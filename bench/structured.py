"""Structured-output libraries on a palm vocabulary, side by side: what `palm serve` pays per constrained row.

For xgrammar (what palm uses), llguidance and outlines-core, each where it is installed (`make bench-setup`
installs all three), on palm tokenizers of 8K and 32K pieces trained here (raw pieces with `<0xXX>` byte
fallback, no `▁`): the time to read the vocabulary, to compile bench/serve_features.py's JSON schema, and
per token of a valid reply (built from random field values, tokenized the way palm does) the time to fill
the next-token mask and then accept the token, p50 and p99. Every reply's tokens must be allowed at every
step, and the end allowed after the last (else the library is marked wrong and its times are not shown).

    python bench/structured.py [--replies 20] [--vocab 8192,32768] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_features import SCHEMA  # noqa: E402


def replies(count: int, seed: int = 0) -> list[str]:
    """Valid replies to SCHEMA in compact JSON (separators "," and ":", each library set to it)."""
    rng = random.Random(seed)
    words = "library book shelf 书 图书馆 river Zürich 42 ok".split()
    out = []
    for _ in range(count):
        title = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))[:24]
        out.append(
            json.dumps(
                {"title": title, "count": rng.randint(0, 999), "ok": rng.random() < 0.5},
                ensure_ascii=False,
                separators=(",", ":"),
            )
        )
    return out


class Library:
    """One library's matcher over one vocabulary: compile(), then per reply start(), allowed(), accept()."""

    name = ""
    modules: tuple[str, ...] = ()

    def allowed(self, token: int) -> bool:
        raise NotImplementedError


class XGrammar(Library):
    name = "xgrammar"
    modules = ("xgrammar",)

    def __init__(self, tokenizer, vocab: int, eos: int):
        import xgrammar as xgr

        from palm.inference.structured import tokenizer_info

        self.xgr = xgr
        info = tokenizer_info(tokenizer, vocab, [eos])  # as palm serve reads the vocabulary
        self.compiler, self.mask = xgr.GrammarCompiler(info, cache_enabled=False), xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict) -> None:
        self.grammar = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def start(self) -> None:
        self.matcher = self.xgr.GrammarMatcher(self.grammar)

    def fill(self) -> None:
        self.matcher.fill_next_token_bitmask(self.mask)

    def allowed(self, token: int) -> bool:
        return bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)

    def accept(self, token: int) -> None:
        assert self.matcher.accept_token(token)


class LLGuidance(Library):
    name = "llguidance"
    modules = ("llguidance.hf", "llguidance.torch")

    def __init__(self, tokenizer, vocab: int, eos: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=vocab, eos_token=eos)
        self.mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict) -> None:
        self.grammar = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        probe = self.ll.LLMatcher(self.tokenizer, self.grammar)  # compiling happens on the first matcher
        assert not probe.is_error(), probe.get_error()

    def start(self) -> None:
        self.matcher = self.ll.LLMatcher(self.tokenizer, self.grammar)

    def fill(self) -> None:
        self.llt.fill_next_token_bitmask(self.matcher, self.mask, 0)

    def allowed(self, token: int) -> bool:
        return bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)

    def accept(self, token: int) -> None:
        assert self.matcher.consume_token(token), self.matcher.get_error()


class OutlinesCore(Library):
    name = "outlines-core"
    modules = ("outlines_core.json_schema",)

    def __init__(self, tokenizer, vocab: int, eos: int):
        from outlines_core import Vocabulary

        pieces: dict[bytes, list[int]] = {}
        specials = set(tokenizer.hf.all_special_ids)
        for piece, index in tokenizer.hf.backend_tokenizer.get_vocab().items():
            if index in specials or index == eos:
                continue
            is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")  # byte fallback
            raw = bytes([int(piece[3:5], 16)]) if is_byte else piece.encode()
            if raw:
                pieces.setdefault(raw, []).append(index)
        self.vocabulary = Vocabulary(eos, pieces)
        self.vocab = vocab

    def compile(self, schema: dict) -> None:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        self.index = Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), self.vocabulary)

    def start(self) -> None:
        from outlines_core import Guide

        self.guide = Guide(self.index)

    def fill(self) -> None:
        self.tokens = set(self.guide.get_tokens())

    def allowed(self, token: int) -> bool:
        return token in self.tokens

    def accept(self, token: int) -> None:
        self.guide.advance(token)


def measure(cls: type[Library], tokenizer, eos: int, texts: list[str], ids: list[list[int]]) -> dict:
    for module in cls.modules:
        __import__(module)  # imported before the clock starts (an ImportError marks the library missing)
    t0 = time.perf_counter()
    lib = cls(tokenizer, len(tokenizer), eos)
    t1 = time.perf_counter()
    lib.compile(SCHEMA)
    t2 = time.perf_counter()
    per_token, wrong = [], None
    for text, tokens in zip(texts, ids):
        lib.start()
        for token in [*tokens, eos]:
            t = time.perf_counter()
            lib.fill()
            per_token.append(time.perf_counter() - t)
            if not lib.allowed(token):
                wrong = f"refused token {token} ({tokenizer.hf.convert_ids_to_tokens(token)!r}) in {text!r}"
                break
            if token != eos:
                t = time.perf_counter()
                lib.accept(token)
                per_token[-1] += time.perf_counter() - t
        if wrong:
            break
    per_token.sort()
    return {
        "vocabulary_s": t1 - t0,
        "compile_s": t2 - t1,
        "wrong": wrong,
        "tokens": len(per_token),
        "mask_p50_us": statistics.median(per_token) * 1e6,
        "mask_p99_us": per_token[int(0.99 * len(per_token))] * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replies", type=int, default=20)
    ap.add_argument("--vocab", default="8192,32768")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import pydoc_data.topics

    from palm.text.tokenizer import train_tokenizer

    torch.set_num_threads(1)
    texts = replies(args.replies)
    # Python's docs and its standard library's source: enough text for a 32K vocabulary
    stdlib = sorted(Path(json.__file__).parent.parent.glob("*.py"))
    corpus = list(pydoc_data.topics.topics.values()) + texts * 3 + [f.read_text(errors="replace") for f in stdlib]
    print(
        f"on {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {len(texts)} replies to "
        f"serve_features' schema\n"
    )
    rows = []
    for vocab in [int(v) for v in args.vocab.split(",")]:
        tokenizer = train_tokenizer(lambda: corpus, vocab_size=vocab)
        eos, size = tokenizer.eos_id, len(tokenizer)
        ids = [tokenizer.encode(t, bos=False) for t in texts]
        for cls in (XGrammar, LLGuidance, OutlinesCore):
            try:
                row = measure(cls, tokenizer, eos, texts, ids)
            except ImportError as e:
                row = {"missing": str(e)}
            except Exception as e:  # a library that cannot take this vocabulary says so in its row
                row = {"wrong": f"{type(e).__name__}: {e}"[:200]}
            rows.append({"vocab": size, "library": cls.name, **row})
    print("| vocabulary | library | read the vocabulary | compile the schema | mask + accept p50 | p99 | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "missing" in r or r.get("wrong"):
            print(f"| {r['vocab']} | {r['library']} |  |  |  |  | {r.get('missing') or r['wrong']} |")
            continue
        print(
            f"| {r['vocab']} | {r['library']} | {r['vocabulary_s'] * 1e3:.0f} ms | {r['compile_s'] * 1e3:.1f} ms | "
            f"{r['mask_p50_us']:.0f} µs | {r['mask_p99_us']:.0f} µs | {r['tokens']} tokens |"
        )
    if args.json:
        args.json.write_text(json.dumps({"processor": platform.processor(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
