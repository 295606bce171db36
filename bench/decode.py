"""Decode speed: palm's static-cache path against Transformers' generate() on the same weights.

    python bench/decode.py [--preset small] [--prompt-len 128] [--new-tokens 128] [--rounds 3] [--compile]

Batch-1 greedy decoding, the candidates interleaved round by round after a warm-up; peak memory is
measured in a fresh process per candidate (CPU: the process's peak RSS, model included, the same
weights for both; GPU: peak allocated). Also prints
prefill tokens/s and the KV-cache bytes per token of multi-query attention against a multi-head
model of the same width.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from palm import PalmConfig, PalmForCausalLM
from palm.generate import Generator, KVCache, SamplingConfig


def build(preset: str, seed: int = 0) -> PalmForCausalLM:
    torch.manual_seed(seed)
    return PalmForCausalLM(PalmConfig.from_preset(preset)).eval()


class _Tokens:
    """Just enough of a tokenizer for timing: ids in, no text needed."""

    pad_id, eos_id, eod_id = 0, 2, 4


def palm_decode(gen: Generator, prompt: torch.Tensor, n: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for greedy decoding of n tokens."""
    cfg = SamplingConfig(max_new_tokens=n)
    start = time.perf_counter()
    stream = gen.token_stream([prompt[0].tolist()], cfg)
    next(stream)  # the prefill and the first token
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return prefill, count / (time.perf_counter() - start)


@torch.inference_mode()
def hf_decode(model: PalmForCausalLM, prompt: torch.Tensor, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    total = time.perf_counter() - start
    return prefill, (n - 1) / max(total - prefill, 1e-9)


def worker(args) -> None:
    """Run one candidate and print its peak memory growth in bytes (a fresh process per candidate)."""
    model = build(args.preset)
    prompt = torch.randint(10, model.config.vocab_size, (1, args.prompt_len))
    cuda = torch.cuda.is_available()
    if cuda:
        model = model.cuda()
        prompt = prompt.cuda()
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "palm":
        palm_decode(Generator(model, _Tokens()), prompt, args.new_tokens)
    else:
        hf_decode(model, prompt, args.new_tokens)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--worker", choices=["palm", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.preset).to(device)
    gen = Generator(model, _Tokens(), compile=args.compile)
    prompt = torch.randint(10, model.config.vocab_size, (1, args.prompt_len), device=device)
    palm_decode(gen, prompt, 8), hf_decode(model, prompt, 8)  # warm-up (and compile)
    results: dict[str, list[tuple[float, float]]] = {"palm": [], "transformers": []}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        results["palm"].append(palm_decode(gen, prompt, args.new_tokens))
        results["transformers"].append(hf_decode(model, prompt, args.new_tokens))
    memory = {}
    for name, flag in (("palm", "palm"), ("transformers", "hf")):
        cmd = [sys.executable, __file__, "--worker", flag, "--preset", args.preset,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
        memory[name] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["peak_bytes"]

    c = model.config
    mqa = KVCache(c, 1, 1, torch.float32, device).nbytes()
    mha = mqa * c.num_attention_heads // c.num_key_value_heads
    print(f"\n{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {device.type}, batch 1, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.rounds} interleaved rounds\n")
    print(f"| {'path':<14} | {'decode tok/s':>12} | {'prefill tok/s':>13} | {'peak memory MB':>14} | {'ratio':>6} |")
    print(f"|{'-' * 16}|{'-' * 14}|{'-' * 15}|{'-' * 16}|{'-' * 8}|")
    best = {k: (min(p for p, _ in v), max(r for _, r in v)) for k, v in results.items()}
    for name in ("palm", "transformers"):
        prefill, rate = best[name]
        ratio = rate / best["transformers"][1]
        print(f"| {name:<14} | {rate:>12.1f} | {args.prompt_len / prefill:>13.0f} | "
              f"{memory[name] / 2**20:>14.1f} | {ratio:>5.2f}x |")
    print(f"\nKV cache per token (fp32): multi-query {mqa} bytes, multi-head of the same width {mha} bytes "
          f"({mha // mqa}x)")
    print(f"palm decode speed-up over Transformers generate(): {best['palm'][1] / best['transformers'][1]:.2f}x")


if __name__ == "__main__":
    main()
