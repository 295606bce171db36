"""Decode speed: palm's decoder against Transformers' generate() on the same model, and how near the
memory limit each runs.

    python bench/decode.py [--presets tiny,small] [--dtype auto] [--prompt-len 128] [--new-tokens 128]
                           [--rounds 3] [--paths palm,palm+int8,...] [--compile] [--threads N] [--no-llama-cpp]

Every preset of `--presets` in the same run (tiny: weights in the cache, per-token overhead dominates;
small: weights read from memory), the model in the dtype palm picks (`--dtype auto`: bf16 where it is
native, as on AVX512-BF16 or AMX CPUs and recent GPUs, else fp32), the same model for every path.
Batch-1 greedy decoding, every path interleaved round by round after a warm-up (so drift in the load of
a shared machine hits all alike); the best round of each is reported. A path is palm's decoder with its
weights in one format (palm.inference.quant: `none` = the model's dtype, transposed on a CPU; `int8`; `fp16`),
`+compile` adding the compiled step, or `transformers`, `model.generate()` on the unmodified model.

Memory-bandwidth utilisation, as nanochat's inference benchmark reports it: the bytes a token reads
(every matmul weight in its format, plus the KV cache attended over) times tokens/s, over the read
bandwidth of this machine measured in the same run (the fastest of torch's sum and the loops of
bench/bandwidth.c over 256 MB, on as many threads as the decoder, before and between rounds: a shared host's
bandwidth drifts). Weights that fit in the cache are re-read from it faster than
memory delivers, so a small model can show more than 100%.

Also: greedy agreement of each path with Transformers' tokens, teacher-forced on that continuation
(one early flip cannot derail the rest), and how many of Transformers' tokens the path's own free-running
greedy decode reproduces before it first differs (in fp32 palm and Transformers should agree on all), on a model with lively weights (at the paper's init an
untrained model repeats one token, which any format agrees on).

Then the peers outside torch (PEERS; a new one is a function printing its own table): the same weights as GGUF files (`palm export --format gguf`: f32, f16, q8_0), fed the same ids and
decoded greedily by llama.cpp (llama-cpp-python) on as many threads, its types interleaved the same way
(`--no-llama-cpp` leaves it out; it is skipped where llama-cpp-python is not installed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from palm import PalmConfig, PalmForCausalLM
from palm.inference.generate import Generator, KVCache, SamplingConfig
from palm.inference.quant import fbgemm_available, weight_bytes

PATHS = ("palm", "palm+compile", "palm+int8", "palm+int8+compile", "palm+fp16", "palm+fp16+compile", "transformers")


def build(preset: str, seed: int = 0) -> PalmForCausalLM:
    """A random model whose greedy tokens vary (the speed is that of any weights of its shape)."""
    torch.manual_seed(seed)
    model = PalmForCausalLM(PalmConfig.from_preset(preset)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.3)
        for block in model.model.layers:
            block.in_proj.weight.normal_(0, 2 * block.in_proj.in_features**-0.5)
    return model


class _Tokens:
    """Just enough of a tokenizer for timing: ids in, no text needed."""

    pad_id, eos_id, eod_id = 0, 2, 4


def palm_decode(gen: Generator, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tokens/s, tokens) for greedy decoding of n tokens."""
    start = time.perf_counter()
    stream = gen.token_stream([prompt], SamplingConfig(max_new_tokens=n))
    tokens = [int(next(stream)[0])]  # the prefill and the first token
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens += [int(t[0]) for t in stream]
    return prefill, (len(tokens) - 1) / (time.perf_counter() - start), tokens


@torch.inference_mode()
def hf_decode(model: PalmForCausalLM, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt], device=model.device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    total = time.perf_counter() - start
    return prefill, (n - 1) / max(total - prefill, 1e-9), out[0, len(prompt) :].tolist()


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of the fastest streaming read over a buffer far larger than the last-level cache: torch's sum,
    and on a CPU the two loops of bench/bandwidth.c (a sum leaves bandwidth unused that llama.cpp's and palm's
    decode kernels reach)."""
    x = torch.ones(64 * 2**20, device=device)  # 256 MB of fp32
    reads = [lambda: x.sum().item()]
    if device.type == "cpu":
        from palm.inference import matvec

        built = matvec.build(Path(__file__).with_name("bandwidth.c"))
        if built is not None:
            import ctypes

            lib = ctypes.CDLL(str(built))
            for f in (lib.palm_read_stream, lib.palm_read_rows):
                f.restype, f.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
                reads.append(lambda f=f: f(x.data_ptr(), x.numel() * 4, torch.get_num_threads()))
    best = float("inf")
    for read in reads:
        read()
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


@torch.no_grad()
def agreement(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> float:
    """Share of the reference's greedy tokens that `model` also chooses, teacher-forced."""
    ids = torch.tensor([prompt + continuation], device=next(model.buffers(), next(model.parameters())).device)
    choices = model(ids).logits[0, len(prompt) - 1 : -1].argmax(-1)
    return float((choices == torch.tensor(continuation, device=ids.device)).float().mean())


def common_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many of the reference's greedy tokens a path produced itself before its first different one."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def make(model: PalmForCausalLM, path: str) -> Generator | None:
    if path == "transformers":
        return None
    parts = path.split("+")
    quantize = next((p for p in parts if p in ("int8", "fp16")), "none")
    return Generator(model, _Tokens(), compile="compile" in parts, quantize=quantize)


# ---- llama.cpp on the same weights (palm export --format gguf): palm's ids in, greedy ids out ----------

LLAMA_TYPES = ("f32", "f16", "q8_0")


def llama_cpp_decode(llm, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """llama.cpp's (prefill seconds, decode tokens/s, tokens) for greedy decoding of n tokens."""
    # generate() would keep the cached prefix of the last call's prompt (the same prompt here) and
    # prefill one token; an emptied context makes it read the whole prompt, as palm's paths do.
    llm.reset()
    start = time.perf_counter()
    stream = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
    tokens = [next(stream)]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for token in stream:
        tokens.append(token)
        if len(tokens) == n:
            break
    return prefill, (len(tokens) - 1) / (time.perf_counter() - start), tokens


def llama_cpp_table(
    model: PalmForCausalLM, prompt: list[int], args, reference: list[int], hf_rate: float, bandwidth: float
) -> list[dict]:
    """The same model written as GGUF files (f32, f16, q8_0) and decoded by llama.cpp on as many threads;
    a row per file type."""
    import tempfile
    from types import SimpleNamespace

    import numpy as np

    from palm.export import llamacpp
    from palm.export.cohere import cohere_weights
    from palm.export.formats import ExportError
    from palm.export.gguf import write_gguf
    from palm.export.vocab import placeholder_vocab

    try:
        llamacpp.version()
    except ExportError as e:
        print(f"\nllama.cpp: skipped ({e})")
        return [{"preset": args.preset, "path": "llama.cpp", "unavailable": str(e)}]
    c = model.config
    state = cohere_weights(c, {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    vocab = placeholder_vocab(c.vocab_size)  # timing needs ids only
    ids = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2, unk_id=3, eod_id=4)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        llms, sizes, same = {}, {}, {}
        for kind in args.llama_types:
            path = Path(tmp) / f"{kind}.gguf"
            write_gguf(path, c, state, vocab, ids, kind, args.preset)
            sizes[kind] = path.stat().st_size
            scorer = llamacpp.open_gguf(path, n_ctx=args.prompt_len + args.new_tokens, threads=threads, exact=False)
            choices = llamacpp.logits(scorer, prompt + reference)[len(prompt) - 1 : -1].argmax(-1)
            same[kind] = float((choices == np.array(reference)).mean())
            scorer.close()
            llms[kind] = llamacpp.open_gguf(
                path, n_ctx=args.prompt_len + args.new_tokens, threads=threads, exact=False, all_logits=False
            )
            llama_cpp_decode(llms[kind], prompt, 8)  # warm-up
        results = {kind: [] for kind in args.llama_types}
        for _ in range(args.rounds):
            for kind, llm in llms.items():
                results[kind].append(llama_cpp_decode(llm, prompt, args.new_tokens))
            bandwidth = max(bandwidth, read_bandwidth(torch.device("cpu")))
        for llm in llms.values():
            llm.close()
    print(f"\nllama.cpp {llamacpp.version()} on the same weights ({threads} threads, F16 KV cache, palm's ids in):\n")
    print("| path | decode tok/s | vs transformers | prefill tok/s | file MB | greedy = transformers |")
    print("|---|---|---|---|---|---|")
    rows = []
    for kind in args.llama_types:
        rate = max(r for _, r, _ in results[kind])
        prefill = min(s for s, _, _ in results[kind])
        print(
            f"| llama.cpp {kind} | {rate:.1f} | {rate / hf_rate:.2f}x | {args.prompt_len / prefill:.0f} | "
            f"{sizes[kind] / 1e6:.1f} | {same[kind]:.0%} |"
        )
        # llama.cpp reads the file's tensors (the embedding row aside) and its F16 KV cache
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * (args.prompt_len + args.new_tokens // 2)
        rows.append(
            {
                "preset": args.preset,
                "path": f"llama.cpp {kind}",
                "decode_tok_s": rate,
                "prefill_tok_s": args.prompt_len / prefill,
                "weights_bytes": sizes[kind],
                "bytes_per_token": sizes[kind] + kv,
                "bandwidth_share": (sizes[kind] + kv) * rate / bandwidth,
                "read_bandwidth": bandwidth,
                "greedy_teacher_forced": same[kind],
                "new_tokens": len(reference),
            }
        )
    return rows


def candidates(device: torch.device, compile_only: bool) -> list[str]:
    """The default paths: palm in each weight format this device has a kernel for, then Transformers."""
    formats = ["", "+int8", "+fp16"] if fbgemm_available(device) else ["", "+int8"]
    return ([] if compile_only else ["palm"]) + [f"palm{f}+compile" for f in formats] + ["transformers"]


# Peers decoding the same weights outside torch, each given (model, prompt, args, reference ids,
# Transformers' tok/s) and printing its own table after palm's: llama.cpp on the GGUF export.
PEERS = {"llama.cpp": llama_cpp_table}


def bench_preset(
    preset: str, args, device: torch.device, dtype: torch.dtype, paths: list[str], bandwidth: float
) -> tuple[float, list[dict]]:
    """One preset's table; returns the fastest palm path's ratio to Transformers generate(), and a row per
    path (the peers' included) for --json."""
    rows: list[dict] = []
    model = build(preset).to(device=device, dtype=dtype)
    prompt = torch.randint(
        10, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    gens = {p: make(model, p) for p in paths}
    warm = {}
    for p, g in gens.items():  # warm-up, compiling where asked
        start = time.perf_counter()
        palm_decode(g, prompt, args.new_tokens) if g else hf_decode(model, prompt, 8)
        warm[p] = time.perf_counter() - start
    results: dict[str, list[tuple[float, float, list[int]]]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for p, g in gens.items():
            results[p].append(
                palm_decode(g, prompt, args.new_tokens) if g else hf_decode(model, prompt, args.new_tokens)
            )
        # A shared host's bandwidth drifts by 10-30% over minutes: the probe runs between rounds too, and the best counts.
        bandwidth = max(bandwidth, read_bandwidth(device))

    c = model.config
    per_slot = KVCache(c, 1, 1, dtype, device).nbytes()
    reference = results["transformers"][0][2]  # the model as it is, in its dtype
    cpu = platform.processor() or platform.machine()
    print(
        f"\n{preset}: {model.num_parameters() / 1e6:.1f}M parameters, {device.type} ({cpu}, "
        f"{torch.get_num_threads()} threads), {str(dtype).removeprefix('torch.')} weights and compute, batch 1, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.rounds} interleaved rounds; "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s (the best probe, before and between rounds)\n"
    )
    print(
        "| path | decode tok/s | vs transformers | prefill tok/s | weights MB | bytes/token MB | bandwidth used "
        "| greedy = transformers | same tokens free-running | warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    hf_rate = max(r for _, r, _ in results["transformers"])
    for p in paths:
        g = gens[p]
        rate = max(r for _, r, _ in results[p])
        prefill = min(s for s, _, _ in results[p])
        weights = weight_bytes(g.step.decoder if g else model)
        # palm attends over its whole cache line (fixed shapes); Transformers over the tokens so far.
        slots = (
            (args.prompt_len + args.new_tokens)
            if g is None or not g.compiled
            else max(64, 1 << (args.prompt_len + args.new_tokens - 1).bit_length())
        )
        kv = per_slot * (slots if g else args.prompt_len + args.new_tokens // 2)
        per_token = weights + kv
        same = agreement(g.step.decoder if g else model, prompt, reference)
        run = common_prefix(results[p][0][2], reference)
        print(
            f"| {p} | {rate:.1f} | {rate / hf_rate:.2f}x | {args.prompt_len / prefill:.0f} | {weights / 1e6:.1f} | "
            f"{per_token / 1e6:.1f} | {per_token * rate / bandwidth:.0%} | {same:.0%} | {run}/{len(reference)} | "
            f"{warm[p]:.1f} |"
        )
        rows.append(
            {
                "preset": preset,
                "path": p,
                "dtype": str(dtype).removeprefix("torch."),
                "decode_tok_s": rate,
                "prefill_tok_s": args.prompt_len / prefill,
                "weights_bytes": weights,
                "bytes_per_token": per_token,
                "bandwidth_share": per_token * rate / bandwidth,
                "read_bandwidth": bandwidth,
                "greedy_teacher_forced": same,
                "greedy_free_running": run,
                "new_tokens": len(reference),
                "warmup_s": warm[p],
            }
        )
    best = max((p for p in paths if p != "transformers"), key=lambda p: max(r for _, r, _ in results[p]))
    ratio = max(r for _, r, _ in results[best]) / hf_rate
    print(f"\n{preset}: fastest palm path {best}, {ratio:.2f}x Transformers generate()")
    mqa, mha = per_slot, per_slot * c.num_attention_heads // c.num_key_value_heads
    print(f"KV cache per token: multi-query {mqa} bytes, multi-head of the same width {mha} bytes ({mha // mqa}x)")
    for name in args.peers:
        rows += PEERS[name](
            model, prompt, argparse.Namespace(**{**vars(args), "preset": preset}), reference, hf_rate, bandwidth
        )
    return ratio, rows


def main() -> None:
    from palm.core.runtime import pick_dtype

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help="comma-separated, each run in turn (default: tiny,small)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where native, else fp32), bf16 or fp32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--paths",
        default=None,
        help="comma-separated (default: palm, and palm+compile in each format this device has, and transformers)",
    )
    ap.add_argument("--compile", action="store_true", help="only the compiled palm paths (and transformers)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--llama-cpp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also decode the same weights with llama.cpp (f32, f16, q8_0 GGUF files)",
    )
    ap.add_argument("--llama-types", default=",".join(LLAMA_TYPES), help="the GGUF types llama.cpp decodes")
    ap.add_argument("--json", help="also write every row here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(args.dtype, device)
    paths = args.paths.split(",") if args.paths else candidates(device, args.compile)
    unknown = [p for p in paths if p not in PATHS]
    if unknown or "transformers" not in paths:
        ap.error(f"--paths: choose from {', '.join(PATHS)}, transformers included (the baseline); not {unknown}")
    args.peers = ["llama.cpp"] if args.llama_cpp else []
    args.llama_types = args.llama_types.split(",")
    if set(args.llama_types) - set(LLAMA_TYPES):
        ap.error(f"--llama-types: choose from {', '.join(LLAMA_TYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(device)
    print(f"read bandwidth measured: {bandwidth / 1e9:.1f} GB/s (256 MB streamed, {torch.get_num_threads()} threads)")
    ratios, rows = {}, []
    for preset in args.presets.split(","):
        ratios[preset], got = bench_preset(preset, args, device, dtype, paths, bandwidth)
        rows += got
    print("\nsummary: " + ", ".join(f"{p} {r:.2f}x" for p, r in ratios.items()) + " Transformers generate() at batch 1")
    if args.json:
        # Every share against the best bandwidth of the whole run, so that no path gains from a probe that ran slow.
        bandwidth = max([bandwidth] + [r["read_bandwidth"] for r in rows if "read_bandwidth" in r])
        for r in rows:
            if "bytes_per_token" in r:
                r["read_bandwidth"], r["bandwidth_share"] = (
                    bandwidth,
                    r["bytes_per_token"] * r["decode_tok_s"] / bandwidth,
                )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "read_bandwidth": bandwidth,
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "rounds": args.rounds,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
