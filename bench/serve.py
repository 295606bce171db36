"""Serving under load: `palm serve` driven by N concurrent `openai` clients on 127.0.0.1.

    python bench/serve.py [--model DIR] [--clients 1,8,32] [--requests-per-client 6] [--max-batch 32]
                          [--peer transformers,llama.cpp] [--llama-cpp-python PYTHON] [--level-timeout 300]

Each level runs N clients at once, each sending the same mix of requests one after the other (from
its own place in a cycle of 12): prompts of about 8, 40 and 150 tokens, max_tokens 16, 48 or 96, half
of them streamed, half greedy and half sampled with a seed. It reports output tokens/s over the level's wall time, its ratio
to one client's, time to first token and inter-token latency (gaps between a stream's chunks), p50
and p99, and the failures (a failed request counts, it is never retried). Every level is bounded in
requests and in time.

Without --model, a random `tiny` palm (7.8M parameters, a tokenizer trained on Python's own docs)
is written to a temporary folder: the speed of a model does not depend on what it has learned.
`--peer transformers` runs the same load against `transformers serve --continuous-batching` on the
same palm directory (it loads palm's saved code with --trust-remote-code), and the same requests
through Transformers' in-process continuous batching (`generate_batch`), or says why each could not.
`--peer llama.cpp` runs it against llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, the
llama.cpp vendored in llama-cpp-python) on the same weights exported with `palm export --format gguf` (f16),
one sequence at a time as that server decodes (requests queue; none interrupts another); it needs the
package's `[server]` extra, so `--llama-cpp-python` names an interpreter that has it (default: this one).
Each server's peak RSS (the kernel's high-water mark of its process) is in its table's title.
Both servers and the clients share this machine's cores, so the client's own work is in the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

HOST = "127.0.0.1"  # loopback only
WORDS = "the model reads every weight once per step so many rows share the cost of one".split()


def prompts() -> list[str]:
    return [" ".join(WORDS[:6]), " ".join(WORDS * 3)[:200], " ".join(WORDS * 10)[:750]]


@dataclass
class Result:
    ok: bool
    streamed: bool
    tokens: int = 0
    start: float = 0.0
    first: float | None = None  # when the first text arrived (streams)
    gaps: list[float] = field(default_factory=list)  # seconds between a stream's chunks
    error: str = ""
    chunks: int = 0  # chunks with text: the tokens of a stream whose server sends no usage


MIX = 12  # one cycle of the requests every client sends, each client starting at its own place in it


def mixed(i: int) -> dict:
    """Request i of the cycle: every 3 in a row hold each budget, and (a Latin square) each prompt length."""
    texts, budgets = prompts(), (16, 48, 96)
    sampled = (i // 2) % 2 == 1
    return {
        "prompt": texts[(i + i // 3) % 3],
        "max_tokens": budgets[i % 3],
        "stream": i % 2 == 1,
        "temperature": 0.8 if sampled else 0.0,
        "seed": i if sampled else None,
    }


def workload(clients: int, per_client: int) -> list[list[dict]]:
    """Each client's requests, in order: the same mix for one client as for many, so that the ratio to one
    client compares like with like."""
    return [[mixed((c * 5 + j) % MIX) for j in range(per_client)] for c in range(clients)]


async def one(client: openai.AsyncOpenAI, model: str, req: dict) -> Result:
    result = Result(ok=False, streamed=req["stream"], start=time.perf_counter())
    extra = {"seed": req["seed"]} if req["seed"] is not None else {}
    if req.get("extra_body"):
        extra["extra_body"] = req["extra_body"]
    try:
        if req["stream"]:
            last = None
            stream = await client.completions.create(
                model=model,
                prompt=req["prompt"],
                max_tokens=req["max_tokens"],
                temperature=req["temperature"],
                stream=True,
                stream_options={"include_usage": True},
                **extra,
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    result.chunks += 1
                    if result.first is None:
                        result.first = now
                    else:
                        result.gaps.append(now - last)
                    last = now
                if chunk.usage is not None:
                    result.tokens = chunk.usage.completion_tokens
            result.tokens = result.tokens or result.chunks
        else:
            out = await client.completions.create(
                model=model, prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=req["temperature"], **extra
            )
            result.tokens = out.usage.completion_tokens
        result.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is counted, with its reason
        result.error = f"{type(e).__name__}: {e}"[:200]
    return result


async def level(
    base: str,
    model: str,
    clients: int,
    per_client: int,
    timeout: float,
    load: Callable[[int, int], list[list[dict]]] = None,
) -> dict:
    requests = (load or workload)(clients, per_client)
    client = openai.AsyncOpenAI(
        base_url=f"{base}/v1",
        api_key="unused",
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=clients + 4)),
    )
    deadline = time.perf_counter() + timeout
    results: list[Result] = []
    tokens_of = [[0] * len(reqs) for reqs in requests]  # each request's output tokens, by client and turn

    async def run_client(c: int) -> None:
        for j, req in enumerate(requests[c]):
            if time.perf_counter() > deadline:
                return  # bounded in time: what is left is not sent
            results.append(await one(client, model, req))
            tokens_of[c][j] = results[-1].tokens

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(run_client(c) for c in range(clients))), timeout + 60)
    wall = time.perf_counter() - start
    await client.close()
    good = [r for r in results if r.ok]
    ttft = [r.first - r.start for r in good if r.streamed and r.first is not None]
    mean_ttft = statistics.fmean(ttft) if ttft else None
    gaps = [g for r in good for g in r.gaps]
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": wall,
        "output_tokens": sum(r.tokens for r in good),
        "tokens_per_s": sum(r.tokens for r in good) / wall,
        "ttft_mean": mean_ttft,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(gaps, 50),
        "itl_p99": pct(gaps, 99),
        "request_tokens": tokens_of,
    }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float, path: str = "/health") -> str | None:
    """None once the server answers `path`; else why not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"it exited with code {proc.returncode}"
        try:
            if httpx.get(f"{base}{path}", timeout=2).status_code == 200:
                return None
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return f"it did not answer /health within {seconds:.0f} s"


def make_model(root: Path) -> Path:
    import pydoc_data.topics

    from palm.text.tokenizer import train_tokenizer
    from palm.weights.modeldir import init_model_dir

    texts = list(pydoc_data.topics.topics.values())
    train_tokenizer(lambda: texts, vocab_size=8192).save(root / "tokenizer")
    init_model_dir("tiny", root / "tokenizer", root / "model")
    return root / "model"


def dtype_name() -> str:
    """The dtype `palm serve` computes in here (bf16 where it is native), for the peer to match."""
    import torch

    from palm.core.runtime import pick_dtype

    return str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def gguf_of(model: Path, folder: Path) -> Path:
    """The palm directory as the f16 GGUF file llama.cpp's server reads."""
    out = folder / "model-f16.gguf"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "palm.cli",
            "export",
            "--format",
            "gguf",
            "--type",
            "f16",
            "--model",
            str(model),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"palm export --format gguf failed: {done.stderr.strip().splitlines()[-1]}")
    return out


# Where each server says it is up, and the model name its requests give.
HEALTH = {"palm": "/health", "transformers": "/health", "llama.cpp": "/v1/models"}


def served_name(kind: str, model: Path) -> str:
    return {"palm": model.name, "llama.cpp": "palm"}.get(kind, str(model))


def start_server(kind: str, model: Path, port: int, args, log) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kind == "llama.cpp":  # `model` is the GGUF file here
        cmd = [
            args.llama_cpp_python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            "palm",
            "--host",
            HOST,
            "--port",
            str(port),
            "--n_ctx",
            str(args.max_model_len),
            "--n_threads",
            str(os.cpu_count()),
            "--n_threads_batch",
            str(os.cpu_count()),
            "--interrupt_requests",
            "False",
        ]
    elif kind == "palm":
        cmd = [
            sys.executable,
            "-m",
            "palm.cli",
            "serve",
            "--model",
            str(model),
            "--host",
            HOST,
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
            "--max-tokens-limit",
            "512",
            "--max-queue",
            "1024",
            "--max-model-len",
            str(args.max_model_len),
            *getattr(args, "serve_flags", []),
        ]
    else:
        cmd = [
            sys.executable,
            "-c",
            "import sys; from transformers.cli.transformers import main; sys.exit(main())",
            "serve",
            str(model),
            "--continuous-batching",
            "--trust-remote-code",
            "--host",
            HOST,
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            dtype_name(),
        ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_server(kind: str, model: Path, args) -> dict:
    port = free_port()
    base = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = start_server(kind, model, port, args, log)
        try:
            why = wait_healthy(base, proc, args.start_timeout, HEALTH[kind])
            if why is None:
                probe = asyncio.run(level(base, served_name(kind, model), 1, 1, 120))
                if probe["failed"]:
                    why = f"a first request failed: {probe['errors'][0]}"
            if why is not None:
                log.seek(0)
                tail = [line.strip() for line in log.read().splitlines() if line.strip()][-3:]
                return {"server": kind, "unavailable": f"{why}; its log ends: {' | '.join(tail)}"}
            levels = [
                asyncio.run(
                    level(
                        base,
                        served_name(kind, model),
                        n,
                        args.requests_per_client,
                        args.level_timeout,
                        getattr(args, "load", None),
                    )
                )
                for n in args.clients
            ]
            return {"server": kind, "levels": levels, "peak_rss": peak_rss(proc.pid)}
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def peak_rss(pid: int) -> int | None:
    """The high-water mark of a live process's resident memory, in bytes."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")), None)


def llama_cpp_server(model: Path, folder: Path, args) -> dict:
    """The load against llama.cpp's server on palm's weights, or the one-line reason it could not run."""
    check = subprocess.run([args.llama_cpp_python, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if check.returncode != 0:
        missing = (check.stderr.strip().splitlines() or ["?"])[-1]
        return {
            "server": "llama.cpp",
            "unavailable": f"{args.llama_cpp_python} cannot run llama_cpp.server ({missing}); "
            "pip install 'llama-cpp-python[server]' there, or give --llama-cpp-python",
        }
    try:
        return run_server("llama.cpp", gguf_of(model, folder), args)
    except RuntimeError as e:
        return {"server": "llama.cpp", "unavailable": str(e)}


def generate_batch_peer(model_dir: Path, clients: int, per_client: int) -> dict:
    """The requests of the largest level, all at once, through Transformers' `generate_batch`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import palm  # noqa: F401 - registers palm with the Auto classes
    from palm.core.runtime import pick_dtype

    requests = [r for client in workload(clients, per_client) for r in client]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype("auto", torch.device("cpu"))).eval()
    inputs = [tok(r["prompt"]).input_ids for r in requests]
    config = GenerationConfig(
        max_new_tokens=max(r["max_tokens"] for r in requests),
        do_sample=False,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    start = time.perf_counter()
    try:
        out = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    except Exception as e:  # noqa: BLE001 - reported, as the reason it was not measured
        return {"server": "transformers generate_batch", "unavailable": f"{type(e).__name__}: {e}"[:300]}
    wall = time.perf_counter() - start
    failed = [o for o in out.values() if getattr(o, "error", None)]
    if failed:
        return {
            "server": "transformers generate_batch",
            "unavailable": f"{len(failed)} of {len(out)} requests failed: {failed[0].error}"[:300],
        }
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {
        "server": "transformers generate_batch",
        "offline": f"{len(out)} requests at once (max_new_tokens "
        f"{config.max_new_tokens} each), {tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} output tok/s",
    }


def table(run: dict) -> str:
    if "offline" in run:
        return f"{run['server']}: {run['offline']}\n"
    if "unavailable" in run:
        return f"{run['server']}: not measured: {run['unavailable']}\n"
    one = run["levels"][0]["tokens_per_s"]
    ms = lambda v: "n/a" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
    rss = f", peak RSS {run['peak_rss'] / 1e9:.2f} GB" if run.get("peak_rss") else ""
    lines = [
        f"**{run['server']}**{rss}\n",
        "| clients | requests | failed | output tok/s | vs 1 client | TTFT p50 ms | "
        "TTFT p99 ms | ITL p50 ms | ITL p99 ms | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in run["levels"]:
        lines.append(
            f"| {lv['clients']} | {lv['requests']} | {lv['failed']} | {lv['tokens_per_s']:.1f} | "
            f"{lv['tokens_per_s'] / one:.2f}x | {ms(lv['ttft_p50'])} | {ms(lv['ttft_p99'])} | "
            f"{ms(lv['itl_p50'])} | {ms(lv['itl_p99'])} | {lv['wall_s']:.1f} |"
        )
        if lv["errors"]:
            lines.append(f"|  | errors: {'; '.join(lv['errors'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a palm model directory (default: a random tiny one)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=6)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--peer", default="none", help="none, or a comma-separated list of transformers and llama.cpp")
    ap.add_argument(
        "--llama-cpp-python",
        default=sys.executable,
        help="an interpreter with llama-cpp-python[server] (for --peer llama.cpp)",
    )
    ap.add_argument("--level-timeout", type=float, default=300.0, help="seconds per level, at most")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.peer = [] if args.peer == "none" else args.peer.split(",")
    if set(args.peer) - {"transformers", "llama.cpp"}:
        ap.error(f"--peer: choose none or from transformers, llama.cpp; not {args.peer}")
    print(
        f"load on {HOST}: clients {args.clients}, {args.requests_per_client} requests each, "
        f"palm serve --max-batch {args.max_batch} --max-model-len {args.max_model_len}; {dtype_name()} on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared by servers and clients\n"
    )
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp))
        peers = [lambda: run_server("palm", model, args)]
        if "transformers" in args.peer:
            peers += [
                lambda: run_server("transformers", model, args),
                lambda: generate_batch_peer(model, args.clients[-1], args.requests_per_client),
            ]
        if "llama.cpp" in args.peer:
            peers.append(lambda: llama_cpp_server(model, Path(tmp), args))
        for peer in peers:  # each table as soon as it is measured: a peer that hangs costs only itself
            runs.append(peer())
            print(table(runs[-1]), flush=True)
            if len(runs) == 1:
                summary(runs[0])
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


def summary(palm: dict) -> None:
    ms = lambda v: "n/a" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
    if "levels" in palm and len(palm["levels"]) > 1:
        top, one = palm["levels"][-1], palm["levels"][0]
        print(
            f"palm: {top['clients']} clients give {top['tokens_per_s'] / one['tokens_per_s']:.2f}x "
            f"{one['clients']} client's output tokens/s (ITL p99 {ms(top['itl_p99'])} ms); "
            f"{sum(lv['failed'] for lv in palm['levels'])} requests failed\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
