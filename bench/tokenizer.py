"""Tokenizer speed and compression: palm's tokenizer against SentencePiece with the same vocabulary size.

    python bench/tokenizer.py [--quick] [--vocab-size 8192] [--threads N] [--json PATH]

Both train on the same documents of the named corpora (zh-news, zh-reviews, python-docs,
python-code; the first 90% of each corpus's documents), SentencePiece as BPE with PaLM's settings
(byte fallback, split digits, whitespace kept, 99.95% character coverage). On the held-out 10%:
encode and decode speed in MB of UTF-8 text per second (whole documents in one batch call each,
both libraries multi-threaded), compression in bytes per token on the Chinese and the English
corpora, and whether decode(encode(text)) gives the text back. The candidates alternate A B A B.
SentencePiece trains on lines (its sentences are at most 4,192 bytes and cannot hold a newline);
palm trains on whole documents.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

CORPORA = ("zh-news", "zh-reviews", "python-docs", "python-code")
LANGUAGE = {"zh-news": "Chinese", "zh-reviews": "Chinese", "python-docs": "English", "python-code": "code"}


def load(cap_bytes: int | None) -> dict[str, list[str]]:
    from palm.data.corpora import named_documents

    out = {}
    for name in CORPORA:
        docs, size = [], 0
        for doc in named_documents(name):
            docs.append(doc)
            size += len(doc.encode())
            if cap_bytes and size >= cap_bytes:
                break
        out[name] = docs
    return out


def split(docs: list[str], held_out: float = 0.1) -> tuple[list[str], list[str]]:
    """Train on the first documents, measure on the last (every corpus keeps at least one of each)."""
    k = min(len(docs) - 1, max(1, round(len(docs) * (1 - held_out))))
    return docs[:k], docs[k:]


def nbytes(texts: list[str]) -> int:
    return sum(len(t.encode()) for t in texts)


def lines_of(docs: list[str], max_bytes: int = 4000) -> list[str]:
    """SentencePiece's sentences: non-empty lines, long ones cut (it skips a sentence over 4,192 bytes)."""
    out = []
    for doc in docs:
        for line in doc.split("\n"):
            while line:
                piece = line.encode()[:max_bytes].decode(errors="ignore") or line[:1]
                out.append(piece)
                line = line[len(piece) :]
    return out


class PalmCandidate:
    name = "palm"

    def train(self, docs: list[str], vocab_size: int) -> None:
        from palm.text.tokenizer import train_tokenizer

        self.tok = train_tokenizer(lambda: iter(docs), vocab_size)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok.encode_batch(texts, bos=False)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.tok._backend.decode_batch(ids, skip_special_tokens=True)  # PalmTokenizer.decode, batched


class SentencePieceCandidate:
    name = "sentencepiece"

    def __init__(self, threads: int):
        self.threads = threads

    def train(self, docs: list[str], vocab_size: int) -> None:
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines_of(docs)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            num_threads=self.threads,
            max_sentence_length=4192,
            input_sentence_size=0,
            minloglevel=2,
        )
        self.sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.threads)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode(ids, num_threads=self.threads)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run(args) -> dict:
    threads = args.threads or os.cpu_count() or 1
    corpora = load(args.cap_mb * 2**20 if args.cap_mb else None)
    parts = {name: split(docs) for name, docs in corpora.items()}
    train_docs = [d for tr, _ in parts.values() for d in tr]
    candidates = [PalmCandidate(), SentencePieceCandidate(threads)]
    results: dict = {
        c.name: {"train_s": None, "encode_mb_s": {}, "decode_mb_s": {}, "bytes_per_token": {}, "lossless": {}}
        for c in candidates
    }
    for c in candidates:
        _, seconds = timed(c.train, train_docs, args.vocab_size)
        results[c.name]["train_s"] = seconds
        print(
            f"{c.name}: trained a {args.vocab_size} vocabulary on {nbytes(train_docs) / 2**20:.1f} MB "
            f"in {seconds:.1f} s",
            flush=True,
        )
    enc_t = {c.name: {n: [] for n in CORPORA} for c in candidates}
    dec_t = {c.name: {n: [] for n in CORPORA} for c in candidates}
    for _ in range(args.rounds):
        for name in CORPORA:
            held = parts[name][1]
            for c in candidates:  # interleaved
                ids, seconds = timed(c.encode, held)
                enc_t[c.name][name].append(seconds)
                text, seconds = timed(c.decode, ids)
                dec_t[c.name][name].append(seconds)
                r = results[c.name]
                r["bytes_per_token"][name] = nbytes(held) / max(1, sum(len(i) for i in ids))
                r["lossless"][name] = sum(a == b for a, b in zip(text, held)) / len(held)
    for c in candidates:
        r = results[c.name]
        for name in CORPORA:
            mb = nbytes(parts[name][1]) / 1e6
            r["encode_mb_s"][name] = mb / min(enc_t[c.name][name])
            r["decode_mb_s"][name] = mb / min(dec_t[c.name][name])
        for lang in ("Chinese", "English"):
            names = [n for n in CORPORA if LANGUAGE[n] == lang]
            held = [d for n in names for d in parts[n][1]]
            tokens = sum(nbytes(parts[n][1]) / r["bytes_per_token"][n] for n in names)
            r["bytes_per_token"][lang] = nbytes(held) / tokens
    return {
        "vocab_size": args.vocab_size,
        "threads": threads,
        "train_mb": nbytes(train_docs) / 2**20,
        "held_out_mb": {n: nbytes(parts[n][1]) / 2**20 for n in CORPORA},
        "tokenizer": results,
    }


def table(result: dict) -> str:
    t = result["tokenizer"]
    rows = [
        "| tokenizer | train s | encode MB/s | decode MB/s | bytes/token zh | bytes/token en | bytes/token code | lossless |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in t.items():
        enc = sum(r["encode_mb_s"].values()) / len(r["encode_mb_s"])
        dec = sum(r["decode_mb_s"].values()) / len(r["decode_mb_s"])
        lossless = min(r["lossless"].values())
        rows.append(
            f"| {name} | {r['train_s']:.1f} | {enc:.1f} | {dec:.1f} | {r['bytes_per_token']['Chinese']:.2f} | "
            f"{r['bytes_per_token']['English']:.2f} | {r['bytes_per_token']['python-code']:.2f} | "
            f"{lossless:.0%} of documents |"
        )
    return "\n".join(rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 MB of each corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--cap-mb", type=float, help="at most this many MB of each corpus (quick: 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick and args.cap_mb is None:
        args.cap_mb = 1.0
    if args.threads:  # the tokenizers library sizes its pool from this when it first starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print()
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
