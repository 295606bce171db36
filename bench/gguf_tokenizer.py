"""How often llama.cpp's own tokenizer, reading a GGUF file from `palm export --format gguf`, gives palm's
ids, per corpus: the share of lines whose ids are identical, and the lines whose text llama.cpp's ids do
not give back (there should be none).

    python bench/gguf_tokenizer.py [--model demo/run/final] [--vocab-size 8192] [--train-bytes 2000000]
                                   [--eval-bytes 500000] [--json PATH]

Vocabularies measured: the tokenizer of `--model` when given (the demo model's, say); else palm's default
vocabulary trained here on the first documents of the four named corpora (as `palm train` trains one);
and, on the same documents, the byte-level vocabulary of palm.export.bytelevel, which llama.cpp
reproduces by construction. Lines are the non-empty lines of each corpus's later documents, never
trained on. Each vocabulary is written into a GGUF file with a tiny random model (the weights play no
part) and read back by llama-cpp-python with `vocab_only`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CORPORA = ("zh-news", "zh-reviews", "python-docs", "python-code")


def load(train_bytes: int, eval_bytes: int) -> tuple[list[str], dict[str, list[str]]]:
    """(training documents of all corpora, held-out non-empty lines per corpus): each corpus's last
    documents, `eval_bytes` of them or a fifth of what it has if that is less, are held out."""
    from palm.data.corpora import named_documents

    train, lines = [], {}
    for name in CORPORA:
        docs, seen = [], 0
        for doc in named_documents(name):
            docs.append(doc)
            seen += len(doc.encode())
            if seen >= train_bytes + eval_bytes:
                break
        target, held, k = min(eval_bytes, seen // 5), 0, len(docs)
        while k > 1 and held < target:
            k -= 1
            held += len(docs[k].encode())
        train += docs[:k]
        lines[name] = [line for doc in docs[k:] for line in doc.splitlines() if line.strip()]
    return train, lines


def measure(tokenizer, lines: dict[str, list[str]], tmp: Path, label: str) -> dict:
    import palm
    from palm.export import export, llamacpp

    model_dir, path = tmp / label, tmp / f"{label}.gguf"
    config = palm.PalmConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=32,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=[tokenizer.eos_id, tokenizer.eod_id],
    )
    palm.PalmForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save(model_dir)
    vocab = export("gguf", model_dir, path, "f32")
    llm = llamacpp.open_gguf(path, vocab_only=True)
    try:
        out = {"pre": vocab.pre, "exact": vocab.exact, "extra_tokens": len(vocab.extra_rows), "corpora": {}}
        for name, texts in lines.items():
            start = time.perf_counter()
            result = llamacpp.agreement(tokenizer, llm, texts)
            out["corpora"][name] = dict(
                lines=result.lines,
                same_ids=result.same_ids,
                lost_text=result.lost_text,
                seconds=round(time.perf_counter() - start, 2),
            )
    finally:
        llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a palm model directory whose tokenizer to measure")
    ap.add_argument("--vocab-size", type=int, default=8192, help="of the vocabularies trained here (the demo's)")
    ap.add_argument("--train-bytes", type=int, default=2_000_000, help="per corpus, to train on")
    ap.add_argument("--eval-bytes", type=int, default=500_000, help="per corpus, to measure on")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from palm.export.bytelevel import train_byte_level
    from palm.text.tokenizer import PalmTokenizer, train_tokenizer

    train, lines = load(args.train_bytes, args.eval_bytes)
    vocabularies = {}
    if args.model:
        vocabularies[f"{args.model} (palm default)"] = PalmTokenizer.load(args.model)
    else:
        vocabularies["palm default"] = train_tokenizer(lambda: train, args.vocab_size)
    vocabularies["byte-level (qwen2)"] = train_byte_level(lambda: train, args.vocab_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, tok) in enumerate(vocabularies.items()):
            results[label] = measure(tok, lines, Path(tmp), f"v{i}")
            results[label]["vocab_size"] = len(tok)

    print(
        f"\nllama.cpp's tokenizer against palm's, lines of held-out documents ({args.eval_bytes / 1e6:g} MB per "
        f"corpus; vocabularies trained on {args.train_bytes / 1e6:g} MB per corpus unless given):\n"
    )
    print(
        "| vocabulary | llama.cpp pre-tokenizer | "
        + " | ".join(f"{c}: same ids" for c in CORPORA)
        + " | lines losing text |"
    )
    print("|---|---|" + "---|" * (len(CORPORA) + 1))
    for label, r in results.items():
        cells = [f"{c['same_ids'] / max(c['lines'], 1):.2%} of {c['lines']}" for c in r["corpora"].values()]
        lost = sum(c["lost_text"] for c in r["corpora"].values())
        print(f"| {label}, {r['vocab_size']} | {r['pre']} | " + " | ".join(cells) + f" | {lost} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
