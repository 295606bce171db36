"""Quality per second: PaLM's parallel block and recipe against a serial Llama block with AdamW + cosine.

    python bench/quality.py [--quick] [--budget SECONDS] [--threads N] [--json PATH]

Both train on the demo's corpus mixture (examples/demo.py's MIXTURE, one shared tokenizer and
token shards) for the same wall-clock budget each, with the same width, depth, heads, multi-query
attention, SwiGLU width, tied embeddings, sequence length and batch:

    palm    PalmForCausalLM, the PaLM recipe: Adafactor (palm.training.optim), lr held then 1/sqrt(k),
            z-loss 1e-4, batch ramp, global-norm clip 1.0
    llama   Transformers LlamaForCausalLM (serial block, RMSNorm), one KV head: a nanoGPT-style
            recipe, AdamW (beta2 0.95, weight decay 0.1) with warmup and cosine decay, clip 1.0

The two train step by step in turn (A B A B ...), each stopping when its own training time reaches
the budget, so load on the shared machine falls on both alike. Each schedule is laid out over the
number of steps its first steps say fit in the budget. Then validation bits per byte on every
corpus of the mixture (the same held-out tokens for both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from palm import PalmConfig, PalmForCausalLM
from palm.core.heldout import summed_nll
from palm.core.runtime import pick_dtype
from palm.data.corpora import parse_corpus_spec
from palm.data.data import get_batch, val_windows
from palm.data.shards import prepare_data, token_byte_lengths
from palm.model.model import lm_loss
from palm.training.compute import ComputeCopies
from palm.training.loop import LoopConfig
from palm.training.optim import build_optimizer, lr_at

MIXTURE = "zh-news:0.35,zh-reviews:0.2,python-docs:0.3,python-code:0.15"  # as examples/demo.py


@dataclass
class Setting:
    d: int = 128
    layers: int = 2
    heads: int = 2
    head_dim: int = 64
    seq: int = 128
    batch: int = 16
    vocab: int = 8192
    palm_lr: float = 5e-2  # the demo's tuned peak for this size (the paper's 1e-2 is for ~250k steps)
    adamw_lr: float = 3e-3


class Trainee:
    """One candidate: its model, optimizer, schedule and the time it has trained so far."""

    def __init__(self, name: str, s: Setting, vocab: int, budget: float, dtype: torch.dtype = torch.float32):
        self.name, self.s, self.budget, self.dtype = name, s, budget, dtype
        torch.manual_seed(0)
        if name == "palm":
            self.model = PalmForCausalLM(
                PalmConfig(
                    vocab_size=vocab,
                    hidden_size=s.d,
                    num_hidden_layers=s.layers,
                    num_attention_heads=s.heads,
                    head_dim=s.head_dim,
                    use_cache=False,
                )
            )
            self.optimizer = build_optimizer("palm", self.model.named_parameters(), lr=s.palm_lr)
            self.lr, self.opt_name = s.palm_lr, "palm"
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            self.model = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=vocab,
                    hidden_size=s.d,
                    intermediate_size=4 * s.d,
                    num_hidden_layers=s.layers,
                    num_attention_heads=s.heads,
                    num_key_value_heads=1,
                    head_dim=s.head_dim,
                    tie_word_embeddings=True,
                    max_position_embeddings=2048,
                    use_cache=False,
                    attn_implementation="sdpa",
                )
            )
            self.optimizer = build_optimizer("adamw", self.model.named_parameters(), lr=s.adamw_lr)
            self.lr, self.opt_name = s.adamw_lr, "adamw"
        self.model.train()
        # In bf16, palm trains as `palm train` does (bf16 compute copies of fp32 weights), Llama under autocast.
        self.copies = ComputeCopies(self.model) if name == "palm" and dtype == torch.bfloat16 else None
        self.step, self.elapsed, self.total_steps, self.tokens = 0, 0.0, None, 0
        self.losses: list[float] = []

    def batch_size(self) -> int:
        if self.name != "palm" or self.total_steps is None:
            return self.s.batch if self.name != "palm" else max(1, self.s.batch // 4)
        ramp = LoopConfig(batch_size=self.s.batch, max_steps=self.total_steps)
        return ramp.batch_at(self.step + 1)

    def lr_now(self) -> float:
        total = self.total_steps or 10**9
        return lr_at(self.step + 1, self.opt_name, self.lr, max(1, total // 10), max(1, total // 20), total)

    def train_step(self, data, seed: int) -> None:
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_now()
        b = self.batch_size()
        batch = get_batch(data, self.step + 1, seed, b)
        x, y = batch[:, :-1], batch[:, 1:]
        self.optimizer.zero_grad(set_to_none=True)
        with self.copies.in_use() if self.copies is not None else contextlib.nullcontext():
            with torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16 and self.copies is None
            ):
                if self.name == "palm":
                    loss = self.model(input_ids=x, shift_labels=y, skip_logits=True).loss
                else:
                    ce, _ = lm_loss(self.model(input_ids=x).logits, y)
                    loss = ce
            loss.backward()
        if self.copies is not None:
            self.copies.accumulate_grads()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if self.copies is not None:
            self.copies.refresh()
        self.step += 1
        self.tokens += x.numel()
        self.elapsed += time.perf_counter() - start
        self.losses.append(loss.item())
        if self.total_steps is None and self.step == 5:
            # Lay the schedule out over what fits; palm's first steps ran at 1/4 batch, so scale them up.
            per_step = self.elapsed / 5 * (self.s.batch / b)
            self.total_steps = max(self.step + 1, int(self.budget / per_step))

    @property
    def done(self) -> bool:
        return self.elapsed >= self.budget


def bits_per_byte(
    model, data, max_tokens: int, table: torch.Tensor, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """Validation bits per byte per corpus; `table` holds the UTF-8 bytes each token stands for."""
    out = {}
    for i, name in enumerate(data.names):
        windows = list(val_windows(data, i, max_tokens))
        nats, _ = summed_nll(model, ((w[:, :-1], w[:, 1:]) for w in windows), device=torch.device("cpu"), dtype=dtype)
        out[name] = nats / math.log(2) / max(sum(int(table[w[0, 1:]].sum()) for w in windows), 1)
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setting() if args.quick else Setting(d=256, layers=4, heads=4, seq=256)
    budget = args.budget or (60.0 if args.quick else 600.0)
    cache = Path(args.cache_dir)
    parts = parse_corpus_spec([MIXTURE])
    from palm.data.corpora import part_documents
    from palm.text.tokenizer import PalmTokenizer, train_tokenizer

    tok_dir = cache / f"tokenizer-{s.vocab}"
    if (tok_dir / "tokenizer.json").is_file():
        tok = PalmTokenizer.load(tok_dir)
    else:
        tok = train_tokenizer(lambda: (doc for part in parts for doc in part_documents(part)), s.vocab)
        tok.save(tok_dir)
    data = prepare_data(parts, tok, cache / "shards", s.seq, progress=False)
    byte_table = torch.as_tensor(token_byte_lengths(tok))
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    trainees = [Trainee("palm", s, len(tok), budget, dtype), Trainee("llama", s, len(tok), budget, dtype)]
    print(
        f"quality: {budget:.0f} s of training each, d={s.d} layers={s.layers} heads={s.heads} "
        f"seq={s.seq} batch={s.batch}, torch threads: {torch.get_num_threads()}",
        flush=True,
    )
    while not all(t.done for t in trainees):
        for t in trainees:  # interleaved
            if not t.done:
                t.train_step(data, args.seed)
    results = []
    for t in trainees:
        bpb = bits_per_byte(t.model, data, args.eval_tokens, byte_table, dtype)
        results.append(
            {
                "name": t.name,
                "block": "parallel" if t.name == "palm" else "serial",
                "recipe": "PaLM Adafactor, lr hold + 1/sqrt(k), z-loss, batch ramp"
                if t.name == "palm"
                else "AdamW + warmup + cosine",
                "peak_lr": t.lr,
                "steps": t.step,
                "tokens": t.tokens,
                "train_s": t.elapsed,
                "tokens_per_s": t.tokens / t.elapsed,
                "final_loss": sum(t.losses[-10:]) / len(t.losses[-10:]),
                "val_bpb": bpb,
                "params": t.model.num_parameters(),
            }
        )
        print(f"{t.name}: {t.step} steps, {t.tokens:,} tokens in {t.elapsed:.0f} s", flush=True)
    return {
        "budget_s": budget,
        "setting": vars(s),
        "mixture": MIXTURE,
        "eval_tokens": args.eval_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "quality": results,
    }


def table(result: dict) -> str:
    names = list(result["quality"][0]["val_bpb"])
    lines = [
        "| model | recipe | steps | tokens/s | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    best = {n: min(r["val_bpb"][n] for r in result["quality"]) for n in names}
    for r in result["quality"]:
        cells = [
            f"**{r['val_bpb'][n]:.3f}**" if r["val_bpb"][n] == best[n] else f"{r['val_bpb'][n]:.3f}" for n in names
        ]
        lines.append(
            f"| {r['name']} ({r['block']}) | {r['recipe']} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the demo's shape, 60 s each")
    ap.add_argument("--budget", type=float, help="seconds of training per candidate (quick 60, full 600)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="validation tokens per corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="auto: bf16 where bf16 matmuls are native, else fp32",
    )
    ap.add_argument(
        "--cache-dir",
        default=str(Path(__file__).resolve().parent.parent / ".palm-cache" / "bench"),
        help="tokenizer and token shards, reused between runs",
    )
    ap.add_argument("--json")
    return ap.parse_args(argv)


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
