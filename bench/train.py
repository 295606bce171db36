"""Training-step speed: palm against its peers on the same shapes, interleaved in one run.

    python bench/train.py [--quick] [--shapes tiny,small,base] [--dtype auto|bf16|fp32] [--batch N]
                          [--rounds N] [--threads N] [--compile] [--profile] [--keep-freed-memory]
                          [--json PATH]

A step is forward, backward, global-norm clipping and a fused AdamW update (the same optimizer for
every candidate, so the models are what differs), on random tokens at sequence 512. Candidates:

    palm              palm.PalmForCausalLM, trained as `palm train` does (fused chunked loss + z-loss)
    falcon            Transformers FalconForCausalLM: parallel attention, multi-query, no bias, RoPE
    llama-mqa         Transformers LlamaForCausalLM with one KV head: the serial block most models use
    litgpt            litgpt's GPT configured as a PaLM (parallel residual, shared norm, MQA, LLaMAMLP)
    palm-pytorch      lucidrains' palm-pytorch from PyPI

All use tied input/output embeddings, head size 64 and d_ff = 4 d (Falcon's ungated GELU MLP gets
6 d so that its matmuls match a 4 d SwiGLU). After one warm-up step each, the candidates run
A B C A B C ... and the best of the rounds is reported, so drift in machine load hits all alike.
Model FLOPs per token are PaLM's Appendix B formula 6N + 12 L H Q T with N counted from each
model's own weight matrices; MFU is against the matmul peak of the step's dtype measured in this
run. bf16 is used where bf16 matmuls are native (palm.core.runtime.fast_bf16), fp32 elsewhere: palm computes
on bf16 compute copies of its fp32 weights, as `palm train` does, the peers under bf16 autocast.
Peak memory comes from a fresh process per candidate (CPU: peak RSS growth over the step, model,
gradients and optimizer state included; GPU: peak allocated).

--keep-freed-memory has glibc keep freed memory for reuse, as tcmalloc and jemalloc do (PyTorch's CPU
tuning guide preloads one of them), instead of handing each large tensor back to the system when it is
freed, so that the next step's tensors of that size are not page-faulted in afresh. It is process-wide, so
every candidate of the run gets it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from palm import PalmConfig, PalmForCausalLM
from palm.core.runtime import fast_bf16
from palm.training.compute import ComputeCopies, apply_activation_checkpointing, compile_blocks
from palm.training.flops import measure_matmul_peak
from palm.training.optim import build_optimizer

CANDIDATES = ("palm", "falcon", "llama-mqa", "litgpt", "palm-pytorch")


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    d: int
    layers: int
    heads: int
    head_dim: int
    seq: int = 512


def preset_shape(name: str, seq: int = 512) -> Shape:
    """A preset's shape; "1b@8" is the preset with 8 layers (bench/scale.py's largest-model probe)."""
    preset, _, layers = name.partition("@")
    c = PalmConfig.from_preset(preset)
    return Shape(
        name,
        c.vocab_size,
        c.hidden_size,
        int(layers) if layers else c.num_hidden_layers,
        c.num_attention_heads,
        c.head_dim,
        seq,
    )


SHAPE_NAMES = ("tiny", "small", "base")  # base (125M) is the larger shape that still fits comfortably


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in matmuls (Appendix B's N): every >=2-D parameter, a tied one counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.dim() >= 2)


def flops_per_token(n_params: int, shape: Shape) -> float:
    return 6 * n_params + 12 * shape.layers * shape.heads * shape.head_dim * shape.seq


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float) -> float:
    return tokens_per_s * flops_per_tok / peak


def best_of(times: list[float]) -> float:
    """The fastest round: on a shared machine the other rounds are slowed by someone else's work."""
    return min(times)


# --- candidates: each returns (model, loss(x, y)); a peer that cannot be built raises Unavailable ---


class Unavailable(Exception):
    """A candidate that cannot run here; the message says why."""


def palm_loss(forward):
    """palm's training loss, from `forward` (the model): fused from hidden states."""

    def loss(x, y):
        return forward(input_ids=x, shift_labels=y, skip_logits=True).loss

    return loss


def build_palm(s: Shape):
    model = PalmForCausalLM(
        PalmConfig(
            vocab_size=s.vocab,
            hidden_size=s.d,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            head_dim=s.head_dim,
            max_position_embeddings=max(s.seq, 2048),
            use_cache=False,
        )
    )
    return model, palm_loss(model)


def _hf_loss(model):
    def loss(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # what Transformers' loss does

    return loss


def build_falcon(s: Shape):
    from transformers import FalconConfig, FalconForCausalLM

    if s.d != s.heads * s.head_dim:
        raise Unavailable("Falcon ties head size to d_model / heads")
    config = FalconConfig(
        vocab_size=s.vocab,
        hidden_size=s.d,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        multi_query=True,
        num_kv_heads=1,
        parallel_attn=True,
        new_decoder_architecture=False,
        bias=False,
        alibi=False,
        ffn_hidden_size=6 * s.d,
        tie_word_embeddings=True,
        max_position_embeddings=max(s.seq, 2048),
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = FalconForCausalLM(config)
    return model, _hf_loss(model)


def build_llama(s: Shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.d,
        intermediate_size=4 * s.d,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=1,
        head_dim=s.head_dim,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        max_position_embeddings=max(s.seq, 2048),
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    return model, _hf_loss(model)


def build_litgpt(s: Shape):
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError as e:
        raise Unavailable(
            f"litgpt is not installed ({e.name}): it pins huggingface-hub<1.4, which Transformers 5 cannot use; "
            "`make bench-setup` installs it with --no-deps"
        ) from None
    config = Config(
        n_embd=s.d,
        n_layer=s.layers,
        n_head=s.heads,
        head_size=s.head_dim,
        n_query_groups=1,
        vocab_size=s.vocab,
        padded_vocab_size=s.vocab,
        block_size=s.seq,
        parallel_residual=True,
        shared_attention_norm=True,
        bias=False,
        mlp_class_name="LLaMAMLP",
        intermediate_size=4 * s.d,
        norm_class_name="LayerNorm",
        rotary_percentage=1.0,
    )
    model = GPT(config)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as in PaLM

    def loss(x, y):
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    return model, loss


def build_palm_pytorch(s: Shape):
    try:
        from palm_pytorch import PaLM
    except ImportError as e:
        raise Unavailable(f"palm-pytorch is not installed ({e.name}): pip install -e '.[bench]'") from None
    model = PaLM(dim=s.d, num_tokens=s.vocab, depth=s.layers, dim_head=s.head_dim, heads=s.heads, ff_mult=4)

    def loss(x, y):
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    return model, loss


BUILDERS: dict[str, Callable] = {
    "palm": build_palm,
    "falcon": build_falcon,
    "llama-mqa": build_llama,
    "litgpt": build_litgpt,
    "palm-pytorch": build_palm_pytorch,
}


@dataclass
class Candidate:
    name: str
    model: torch.nn.Module
    loss: Callable
    optimizer: torch.optim.Optimizer
    step_fn: Callable


def parse_name(name: str) -> tuple[str, set[str]]:
    """("palm", {"compile", "selective"}) from "palm+compile+selective": a builder and its options
    (compile; and for palm, activation checkpointing: full or selective, and adafactor: palm train's own
    optimizer, PaLM's unfactored Adafactor, in place of the fused AdamW every candidate shares)."""
    base, *options = name.split("+")
    unknown = set(options) - {"compile", "full", "selective", "adafactor"}
    if base not in BUILDERS or unknown or (base != "palm" and set(options) - {"compile"}):
        raise ValueError(f"unknown candidate {name!r}")
    return base, set(options)


# Every candidate's update, so that the models are what differs (named in the results and the report).
OPTIMIZER = "fused AdamW"
CLIP_NORM = 1.0


def make_candidate(name: str, shape: Shape, device: torch.device, dtype: torch.dtype, compile_: bool = False):
    """A candidate as its users train it: peers under autocast in bf16; palm as `palm train` does, with bf16
    compute copies of its fp32 weights (refreshed once per step) and, when compiled, one compiled block."""
    torch.manual_seed(0)
    base, options = parse_name(name)
    compile_ = compile_ or "compile" in options
    model, loss = BUILDERS[base](shape)
    model = model.to(device).train()
    for mode in options & {"full", "selective"}:
        apply_activation_checkpointing(model, mode=mode)
    copies = ComputeCopies(model) if base == "palm" and dtype == torch.bfloat16 else None
    if compile_ and base == "palm":
        compile_blocks(model)
    elif compile_:
        loss = torch.compile(loss)
    # The fused kernel, as Transformers' Trainer defaults to (optim="adamw_torch_fused"): on a 2-core Xeon
    # the foreach one took 182 ms a step on small's 38M fp32 weights, the fused one 38 ms.
    if "adafactor" in options:
        optimizer = build_optimizer("palm", model.named_parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    params = list(model.parameters())

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        # On the copies through the backward too, which recomputes checkpointed blocks from the weights in place.
        with copies.in_use() if copies is not None else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 and copies is None):
                value = loss(x, y)
            value.backward()
        if copies is not None:
            copies.accumulate_grads()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        if copies is not None:
            copies.refresh()

    return Candidate(name, model, loss, optimizer, step)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(c: Candidate, x, y, device) -> float:
    sync(device)
    start = time.perf_counter()
    c.step_fn(x, y)
    sync(device)
    return time.perf_counter() - start


def batch_for(shape: Shape, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab, (batch, shape.seq + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


# --- peak memory, one fresh process per candidate ---------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(
    name: str, shapes: list[Shape], batch: int, dtype: torch.dtype, rounds: int = 0, warmup: int = 2
) -> dict:
    """Peak memory of one candidate's training step on each shape (smallest first), in this process, over
    `warmup` steps (the first allocates gradients and optimizer state; the second is steady); with `rounds`,
    also the seconds of that many more steps (--apart: the candidates do not fit side by side)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parse_name(name)  # fail early on a typo
    out = {}
    for shape in shapes:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_bytes()
        try:
            c = make_candidate(name, shape, device, dtype)
        except Unavailable as e:
            out[shape.name] = {"unavailable": str(e)}
            continue
        x, y = batch_for(shape, batch, device)
        for _ in range(warmup):
            c.step_fn(x, y)
        times = [timed_step(c, x, y, device) for _ in range(rounds)]
        sync(device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()
        out[shape.name] = {
            "peak": peak - base,
            "baseline": base,
            "times": times,
            "matmul_params": matmul_params(c.model),
        }
        del c, x, y
    return out


def measure_memory(
    names, shapes, batch, dtype, keep_memory: bool = False, rounds: int = 0, warmup: int = 2
) -> dict[str, dict]:
    """memory_worker's figures for each candidate, each in a fresh process; a candidate whose process dies
    (out of memory, say) has a "failed" entry with the reason."""
    memory = {}
    for name in names:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-worker",
            name,
            "--batch",
            str(batch),
            "--shapes",
            ",".join(s.name for s in shapes),
            "--seq",
            str(shapes[0].seq),
            "--worker-rounds",
            str(rounds),
            "--warmup",
            str(warmup),
            "--dtype",
            "bf16" if dtype == torch.bfloat16 else "fp32",
            "--threads",
            str(torch.get_num_threads()),
        ]
        cmd += ["--keep-freed-memory"] if keep_memory else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            memory[name] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            why = (done.stderr.strip().splitlines() or [""])[-1][:200] or (
                "killed (out of memory)" if done.returncode in (-9, 137) else f"exit {done.returncode}"
            )
            memory[name] = {"failed": why}
    return memory


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and never trim it (M_MMAP_THRESHOLD 1 GiB,
    M_TRIM_THRESHOLD 2 GiB); False where the C library is not glibc.

    By default a block over 32 MiB is mapped on allocation and unmapped on free, and the heap is trimmed
    when its free top passes 2x the adaptive threshold, so a step's largest tensors (a peer's fp32
    logits: 64 MiB on small at batch 2) are zero-filled pages faulted in again on every step: on a
    2-core Xeon, torch.zeros of 32 MiB took 8.0 ms, and 0.65 ms with this.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 31))


# --- the profile of palm's step ---------------------------------------------------------------


def profile_step(c: Candidate, x, y, device, top: int = 12) -> dict:
    """Where palm's step spends its time: shares of self time by operator, matmuls grouped."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    c.step_fn(x, y)
    with profile(activities=activities) as prof:
        c.step_fn(x, y)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr)) for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(t for _, t in events) or 1
    events.sort(key=lambda e: -e[1])
    matmul = sum(t for k, t in events if k in ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"))
    attention = sum(t for k, t in events if "scaled_dot_product" in k or "flash_attention" in k)
    return {
        "total_s": total / 1e6,
        "matmul_share": matmul / total,
        "attention_share": attention / total,
        "other_share": 1 - (matmul + attention) / total,
        "top": [{"op": k, "share": t / total} for k, t in events[:top]],
    }


# --- the run -----------------------------------------------------------------------------------


BF16_HOW = "palm on bf16 compute copies of its fp32 weights, the peers under autocast"


def choose_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    if requested == "fp32":
        return torch.float32, "fp32 (requested)"
    if requested == "bf16":
        return torch.bfloat16, f"bf16 ({BF16_HOW}; requested)"
    if fast_bf16(device):
        return torch.bfloat16, f"bf16 ({BF16_HOW}; bf16 matmuls are native here)"
    return (
        torch.float32,
        "fp32: bf16 matmuls are not native on this machine (no AMX/AVX512-BF16), so bf16 would be far slower",
    )


def measure_peaks(device: torch.device, seconds: float = 1.0) -> dict[str, float]:
    """Matmul FLOP/s per dtype, measured now. Emulated bf16 is probed on a small matrix: it is that slow."""
    fast = fast_bf16(device)
    return {
        "fp32": measure_matmul_peak(torch.float32, device, n=2048 if device.type == "cuda" else 1024, seconds=seconds),
        "bf16": measure_matmul_peak(
            torch.bfloat16, device, n=4096 if device.type == "cuda" else (1024 if fast else 256), seconds=seconds
        ),
    }


def ok_row(name: str, shape: Shape, batch: int, dtype: torch.dtype, n: int, times: list[float]) -> dict:
    step_s = best_of(times)
    return {
        "name": name,
        "shape": shape.name,
        "status": "ok",
        "batch": batch,
        "seq": shape.seq,
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "matmul_params": n,
        "flops_per_token": flops_per_token(n, shape),
        "step_s": step_s,
        "step_s_median": statistics.median(times),
        "tokens_per_s": batch * shape.seq / step_s,
    }


def apart_rows(names: list[str], shape: Shape, args, dtype: torch.dtype) -> list[dict]:
    """Each candidate alone in a fresh process: its steps timed there, and its peak memory; one that does not
    fit or cannot be built says so."""
    rows = []
    # one warm-up step (it allocates the gradients and the optimizer state), then the timed ones, which the
    # peak covers too
    got_all = measure_memory(names, [shape], args.batch, dtype, args.keep_freed_memory, args.rounds, args.warmup)
    for name, got in got_all.items():
        figures = got.get(shape.name)
        if figures is None or "unavailable" in figures:
            rows.append(
                {
                    "name": name,
                    "shape": shape.name,
                    "status": "unavailable",
                    "tokens_per_s": None,
                    "mfu": None,
                    "reason": (figures or {}).get("unavailable") or got.get("failed", "cannot be built here"),
                }
            )
            figures = None
        else:
            rows.append(
                {
                    **ok_row(name, shape, args.batch, dtype, figures["matmul_params"], figures["times"]),
                    "peak_memory_bytes": figures["peak"],
                    "baseline_rss": figures["baseline"],
                }
            )
        print(
            f"  {shape.name} {name}: "
            + (
                f"{rows[-1]['step_s']:.2f} s a step, peak {rows[-1]['peak_memory_bytes'] / 2**30:.1f} GiB"
                if figures
                else rows[-1]["reason"]
            ),
            flush=True,
        )
    return rows


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, dtype_note = choose_dtype(args.dtype, device)
    shapes = [preset_shape(n, args.seq) for n in args.shapes]
    names = list(args.candidates) + (["palm+compile"] if args.compile else [])
    peaks = measure_peaks(device)
    print(f"device {device.type}, torch threads: {torch.get_num_threads()}, {dtype_note}", flush=True)
    rows, profiles = [], {}
    for shape in shapes:
        if args.apart:
            rows += apart_rows(names, shape, args, dtype)
            peaks = {k: max(v, measure_peaks(device, seconds=0.3)[k]) for k, v in peaks.items()}
            continue
        x, y = batch_for(shape, args.batch, device)
        live: list[Candidate] = []
        for name in names:
            try:
                live.append(make_candidate(name, shape, device, dtype))
            except Unavailable as e:
                rows.append(
                    {
                        "name": name,
                        "shape": shape.name,
                        "status": "unavailable",
                        "reason": str(e),
                        "tokens_per_s": None,
                        "mfu": None,
                    }
                )
            except Exception as e:  # a peer that breaks is reported, not fatal
                rows.append(
                    {
                        "name": name,
                        "shape": shape.name,
                        "status": "unavailable",
                        "reason": f"{type(e).__name__}: {e}".splitlines()[0][:200],
                        "tokens_per_s": None,
                        "mfu": None,
                    }
                )
        for c in live:  # warm-up: kernel selection, allocator, compilation
            for _ in range(args.warmup):
                c.step_fn(x, y)
        times: dict[str, list[float]] = {c.name: [] for c in live}
        for r in range(args.rounds):
            # The peak is re-measured each round and the best kept: it is as exposed to load as the steps.
            peaks = {k: max(v, measure_peaks(device, seconds=0.3)[k]) for k, v in peaks.items()}
            for c in live:  # interleaved: A B C A B C
                times[c.name].append(timed_step(c, x, y, device))
            print(
                f"  {shape.name} round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
                flush=True,
            )
        if args.profile:
            palm = next((c for c in live if c.name == "palm"), None)
            if palm is not None:
                profiles[shape.name] = profile_step(palm, x, y, device)
        rows += [ok_row(c.name, shape, args.batch, dtype, matmul_params(c.model), times[c.name]) for c in live]
        del live
        gc.collect()
    peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
    for r in rows:
        if r["status"] == "ok":
            r["mfu"], r["peak_flops"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak), peak
    if not args.no_memory and not args.apart:
        ok = sorted({r["name"] for r in rows if r["status"] == "ok"}, key=names.index)
        memory = measure_memory(ok, shapes, args.batch, dtype, args.keep_freed_memory)
        for r in rows:
            r["peak_memory_bytes"] = memory.get(r["name"], {}).get(r["shape"], {}).get("peak")
    for shape in shapes:
        ref = next((r for r in rows if r["shape"] == shape.name and r["name"] == "palm" and r["status"] == "ok"), None)
        for r in rows:
            if r["shape"] == shape.name and r["status"] == "ok":
                r["ratio_to_palm"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: ([s.name for s in shapes].index(r["shape"]), order.get(r["name"], 99)))
    print(
        f"measured matmul peak (best of the run): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    return {
        "machine": machine_info(device),
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "dtype_note": dtype_note,
        "peak_flops": peaks,
        "threads": torch.get_num_threads(),
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "optimizer": OPTIMIZER,
            "clip_norm": CLIP_NORM,
            "timing": "best of the interleaved rounds",
            "allocator": "glibc, freed memory kept" if args.keep_freed_memory else "the C library's default",
        },
        "train": rows,
        "profile": profiles,
    }


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(result: dict) -> str:
    """The markdown table of a run (also used by bench/report.py)."""
    lines = [
        "| shape | candidate | tokens/s | MFU | GFLOP/token | peak memory MB | vs palm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["train"]:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['name']} | n/a: {r['reason']} | | | | |")
            continue
        mem = r.get("peak_memory_bytes")
        mem = "" if mem is None else f"{mem / 2**20:,.0f}"
        ratio = r.get("ratio_to_palm")
        ratio = "" if ratio is None else f"{ratio:.2f}x"
        lines.append(
            f"| {r['shape']} | {r['name']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['flops_per_token'] / 1e9:.3f} | {mem} | {ratio} |"
        )
    return "\n".join(lines)


def summary(result: dict) -> list[str]:
    """palm against the fastest peer, per shape."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in result["train"]):
        ok = [r for r in result["train"] if r["shape"] == shape and r["status"] == "ok"]
        palm = next((r for r in ok if r["name"] == "palm"), None)
        peers = [r for r in ok if not r["name"].startswith("palm") or r["name"] == "palm-pytorch"]
        if palm and peers:
            best = max(peers, key=lambda r: r["tokens_per_s"])
            out.append(
                f"{shape}: palm {palm['tokens_per_s']:,.0f} tokens/s = {palm['tokens_per_s'] / best['tokens_per_s']:.2f}x "
                f"the fastest peer ({best['name']}), MFU {palm['mfu']:.1%} of the measured {result['dtype']} peak"
            )
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny and small only, batch 2, 8 rounds")
    ap.add_argument("--shapes", help=f"comma-separated presets (default: {','.join(SHAPE_NAMES)}; quick: tiny,small)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--compile", action="store_true", help="also time palm with torch.compile")
    ap.add_argument("--profile", action="store_true", help="profile palm's step on each shape")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="have glibc keep freed memory for reuse (as tcmalloc and jemalloc do), for every candidate",
    )
    ap.add_argument("--json", help="write the result here")
    ap.add_argument(
        "--apart",
        action="store_true",
        help="each candidate alone in a fresh process, timed and measured there (sizes where they do not "
        "fit side by side, such as 1b)",
    )
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-rounds", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.shapes = (args.shapes or ("tiny,small" if args.quick else ",".join(SHAPE_NAMES))).split(",")
    args.candidates = [c for c in args.candidates.split(",") if c]
    for c in args.candidates:
        try:
            parse_name(c)
        except ValueError:
            ap.error(
                f"unknown candidate {c!r}; choose from {', '.join(CANDIDATES)} (palm also as palm+compile, "
                "palm+selective, palm+full)"
            )
    args.batch = args.batch or (2 if args.quick else 8)
    # A quick round is one step of a second or less, which a neighbour's burst on a shared host can slow by
    # half (2-core Xeon, 2026-12-03: one candidate's small step 1.21-1.83 s over 3 rounds), so more of them.
    args.rounds = args.rounds or (8 if args.quick else 4)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.keep_freed_memory and not keep_freed_memory():
        sys.exit("bench/train.py: --keep-freed-memory needs glibc's mallopt, which this C library lacks")
    if args.memory_worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        shapes = [preset_shape(n, args.seq) for n in args.shapes]
        print(
            json.dumps(
                memory_worker(
                    args.memory_worker,
                    shapes,
                    args.batch,
                    dtype,
                    args.worker_rounds,
                    args.warmup if args.worker_rounds else 2,
                )
            )
        )
        return
    result = run(args)
    print()
    print(table(result))
    print()
    for line in summary(result):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
