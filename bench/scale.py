"""palm at the sizes users run (issue 30): the scale ladder, every candidate measured in the same run.

    python bench/scale.py [--parts train,decode,serve,generate,export,checkpoint] [--presets base,1b]
                          [--train-rounds 1] [--serve-requests 2] [--json bench/results/scale.json]

Each part runs in fresh processes, one after another (the machine's 2 cores are never shared between two
candidates), and replaces its own rows in the JSON file, so one part can be rerun alone:

- train: `bench/train.py --apart` at sequence 1024, batch 1: palm as `palm train` runs it (PaLM's Adafactor,
  bf16 compute copies where bf16 is native) against the peers of bench/train.py with fused AdamW, each alone
  in a fresh process: tokens/s, MFU against the matmul peak measured in the run, peak RSS above the
  process's baseline, and for palm `palm plan`'s memory and step time for the same run beside them. The
  largest model each candidate can train here: its peaks at the `1b` width with 8 and 16 layers give the
  memory per layer and the fixed part, and the depth that fits in this machine's memory follows.
- decode: `bench/decode.py` on `base` and `1b`: palm's paths, Transformers' generate() and llama.cpp on the
  same weights (GGUF f16 and q8_0), batch 1, prompt 128, 128 new tokens, with the read bandwidth measured in
  the run; prompt 512 for prefill; and at `1b` in fp32, whether palm's greedy tokens are Transformers'.
- serve: `bench/serve.py` against `palm serve` on a random `1b` directory, 1, 8 and 32 clients, and
  llama.cpp's OpenAI server on the same weights (GGUF f16), or the one-line reason it could not run.
- generate: `palm generate` on a random model directory of each preset (written by `palm init`, fp32 on disk
  as `palm train` writes it; a 32000-piece tokenizer trained on palm's python-docs corpus), each weight format,
  in a fresh process: peak RSS beside what it has to hold (the weights in the decoding format + the KV cache
  + the interpreter's baseline, the peak of a process that imports the same modules and loads nothing).
- export: `palm export` of the same directory to Cohere's layout (bf16) and to GGUF (f16, q8_0), in a fresh
  process each: seconds, bytes written, peak RSS and how far it is above the interpreter's baseline (tensors are
  streamed one at a time, so far less than the model; holding it whole would add its size).
- checkpoint: one training checkpoint of each preset as `palm train` writes it (fp32 weights and the
  Adafactor state, fsynced, renamed into place), in a fresh process: seconds, bytes on disk, its write
  rate beside this disk's (as many bytes, every 4 KiB page different, written and fsynced in 16 MiB blocks),
  and the RSS the save adds to the process (a second copy of the state in memory would add its size).
- resume: `palm train` at the largest preset (sequence 128, 3 steps, a checkpoint every 2) run straight, and
  again killed with SIGKILL from outside while step 2's checkpoint is being written, then `palm train --resume`:
  the resumed run's losses and final weights against the straight run's, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from checkpointing import PALM, cpu_name, measured, train_tokenizer, write_corpus

from palm.core.atomic import write_json, write_text

GB = 1e9
PROMPT = "我喜欢编程，因为"
BASELINE = "import torch, transformers, palm.cli, palm.inference.generate, palm.weights.modeldir, palm.inference.quant"
EXPORT_BASELINE = "import torch, transformers, palm.cli, palm.export, palm.weights.modeldir"
EXPORTS = (("cohere", "bf16"), ("gguf", "f16"), ("gguf", "q8_0"))
PARTS = ("train", "decode", "serve", "generate", "export", "checkpoint", "resume")
BENCH = Path(__file__).resolve().parent
# palm as `palm train` runs it (its Adafactor), then the peers of bench/train.py (fused AdamW)
TRAIN_CANDIDATES = "palm+adafactor,falcon,llama-mqa,litgpt,palm-pytorch"
PROBE_LAYERS = 8  # the second depth at the 1b width, for the largest model that fits


def generate_rows(model_dir: Path, formats: list[str], new_tokens: int) -> list[dict]:
    from palm.core.runtime import pick_device, pick_dtype
    from palm.model.config import PalmConfig

    config = PalmConfig.from_pretrained(str(model_dir))
    dtype = pick_dtype("auto", pick_device(None))
    *_, baseline = measured([sys.executable, "-c", BASELINE])
    rows = []
    for fmt in formats:
        code, out, err, peak = measured(
            [
                *PALM,
                "generate",
                "--model",
                str(model_dir),
                PROMPT,
                "--max-new-tokens",
                str(new_tokens),
                "--temperature",
                "0",
                "--quantize",
                fmt,
            ]
        )
        row = {
            "part": "generate",
            "format": fmt,
            "dtype": str(dtype).removeprefix("torch."),
            "peak_rss": peak,
            "baseline_rss": baseline,
            "returncode": code,
        }
        if code != 0:
            row["error"] = (err.strip().splitlines() or [f"exit {code}"])[-1]
            rows.append(row)
            continue
        summary = err.strip().splitlines()[-1]  # "[128 tokens, 9.4 tokens/s, length]"
        row["tokens_per_s"] = float(summary.split(",")[1].split()[0])
        row["weights"] = decoding_bytes(model_dir, fmt)
        tokens = len(PROMPT) + 1 + new_tokens  # at most one id per character, BOS first
        row["kv_cache"] = (
            config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * tokens * dtype.itemsize
        )
        row["needed"] = row["weights"] + row["kv_cache"] + baseline
        row["ratio"] = peak / row["needed"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decoding_bytes(model_dir: Path, fmt: str) -> int:
    """Bytes of the decoding model's weights: every tensor it holds, the embedding looked up included."""
    code, out, err, _ = measured(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        from palm.inference.generate import Generator
        from palm.inference.quant import weight_bytes
        g = Generator.load({str(model_dir)!r}, quantize={fmt!r})
        embed = g.model.model.embed_tokens.weight
        print(weight_bytes(g.step.decoder) + embed.numel() * embed.element_size())
    """),
        ]
    )
    if code != 0:
        sys.exit(f"reading {model_dir} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return int(out.split()[-1])


def export_rows(model_dir: Path, scratch: Path) -> list[dict]:
    """`palm export` of `model_dir` to each format in a fresh process: seconds, peak RSS, bytes written.

    Streaming holds one tensor at a time beside the interpreter, so the peak is compared with the baseline
    plus the largest tensor in the export's type; holding the model would add the whole of it."""
    *_, baseline = measured([sys.executable, "-c", EXPORT_BASELINE])
    stored = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    rows = []
    for fmt, kind in EXPORTS:
        out = scratch / (f"export-{kind}" if fmt == "cohere" else f"export-{kind}.gguf")
        start = time.perf_counter()
        code, _, err, peak = measured(
            [*PALM, "export", "--format", fmt, "--type", kind, "--model", str(model_dir), "--out", str(out)]
        )
        row = {
            "part": "export",
            "format": f"{fmt} {kind}",
            "returncode": code,
            "seconds": time.perf_counter() - start,
            "peak_rss": peak,
            "baseline_rss": baseline,
            "model_bytes": stored,
        }
        if code != 0:
            row["error"] = (err.strip().splitlines() or [f"exit {code}"])[-1]
        else:
            row["bytes"] = sum(f.stat().st_size for f in out.rglob("*")) if out.is_dir() else out.stat().st_size
            row["added_rss"] = peak - baseline
        subprocess.run(["rm", "-rf", str(out)])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


SAVE = """
import json, sys, time, torch
from pathlib import Path
from palm.training.checkpoint import save_training_checkpoint
from palm.model.config import PalmConfig
from palm.model.model import PalmForCausalLM
from palm.training.optim import build_optimizer
from palm.core.rundir import RunLayout

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

preset, out = sys.argv[1], Path(sys.argv[2])
with torch.device("meta"):
    model = PalmForCausalLM(PalmConfig.from_preset(preset))
model = model.to_empty(device="cpu")
model.tie_weights()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
optimizer = build_optimizer("palm", model.named_parameters(), lr=1e-2)
for p in model.parameters():
    p.grad = torch.full_like(p, 1e-3)
optimizer.step()  # the optimizer's state, as after a first step
for p in model.parameters():
    p.grad = None
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
start = time.perf_counter()
path = save_training_checkpoint(RunLayout(out), 1, model, optimizer, {"skipped": 0, "recent": [], "rewinds": 0, "tokens": 0}, keep=1)
seconds = time.perf_counter() - start
files = {f.name: f.stat().st_size for f in path.iterdir()}
print(json.dumps({"seconds": seconds, "files": files, "rss_before": before, "rss_peak": status("VmHWM"),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def disk_write_rate(folder: Path, size: int) -> float:
    """Bytes/s of writing `size` bytes in 16 MiB blocks and fsyncing them (dd bs=16M conv=fsync). Every 4 KiB
    page written is different (random bytes, its own number in its first 8): a disk that deduplicates or
    compresses would store one 16 MiB block written again and again at a rate no checkpoint can have."""
    import numpy as np

    block = np.frombuffer(bytearray(os.urandom(16 << 20)), dtype=np.uint64).reshape(-1, 512)  # rows of 4 KiB
    pages = np.arange(len(block), dtype=np.uint64)
    path = folder / "dd.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(max(1, size // block.nbytes)):
            block[:, 0] = pages + np.uint64(i * len(block))
            f.write(block.data)
        f.flush()
        os.fsync(f.fileno())
    rate = path.stat().st_size / (time.perf_counter() - start)
    path.unlink()
    return rate


def checkpoint_row(preset: str, scratch: Path) -> dict:
    code, out, err, _ = measured([sys.executable, "-c", SAVE, preset, str(scratch / f"ckpt-{preset}")])
    if code != 0:
        return {
            "part": "checkpoint",
            "preset": preset,
            "returncode": code,
            "error": (err.strip().splitlines() or [f"exit {code}"])[-1],
        }
    row = {"part": "checkpoint", "preset": preset, "returncode": 0, **json.loads(out.splitlines()[-1])}
    row["bytes"] = sum(row["files"].values())
    row["write_rate"] = row["bytes"] / row["seconds"]
    row["disk_rate"] = disk_write_rate(scratch, row["bytes"])
    row["added_rss"] = row["rss_peak"] - row["rss_before"]
    print(json.dumps(row), flush=True)
    return row


def run_streamed(cmd: list[str]) -> int:
    """Run a bench script with its output passed through; its exit code."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd).returncode


def memory_available() -> int:
    """Bytes this machine can give a new process now (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def train_rows(presets: list[str], args, scratch: Path) -> list[dict]:
    """bench/train.py --apart on each preset (and `1b` with PROBE_LAYERS layers); palm's rows get the plan."""
    shapes = [s for p in presets for s in ([f"{p}@{PROBE_LAYERS}", p] if p == "1b" else [p])]
    out = scratch / "train.json"
    code = run_streamed(
        [
            sys.executable,
            str(BENCH / "train.py"),
            "--apart",
            "--shapes",
            ",".join(shapes),
            "--seq",
            str(args.train_seq),
            "--batch",
            "1",
            "--warmup",
            "1",
            "--rounds",
            str(args.train_rounds),
            "--candidates",
            TRAIN_CANDIDATES,
            "--json",
            str(out),
        ]
    )
    if code != 0 or not out.exists():
        return [
            {"part": "train", "returncode": code or 1, "preset": ",".join(presets), "error": "bench/train.py failed"}
        ]
    result = json.loads(out.read_text())
    rows = [
        {
            "part": "train",
            "returncode": 0,
            "preset": r["shape"],
            "dtype": result["dtype"],
            "peak_flops": result["peak_flops"][result["dtype"]],
            **r,
        }
        for r in result["train"]
    ]
    for r in rows:
        if r["status"] == "ok" and is_palm(r["name"]):
            r.update(planned(r))
    return rows + largest_rows(rows, memory_available())


def is_palm(name: str) -> bool:
    return name.split("+")[0] == "palm"


def planned(r: dict) -> dict:
    """`palm plan --device cpu --param-bytes 4 [--compute-copies]` for a training row's run: its memory (what the
    bench measures: the run's tensors, above the process's baseline) and its step at the row's MFU."""
    from palm.training.plan import make_plan

    preset, _, layers = r["shape"].partition("@")
    tokens = r["batch"] * r["seq"]
    plan = make_plan(
        preset,
        r["seq"],
        tokens,
        device="cpu",
        param_bytes=4,
        compute_copies=r["dtype"] == "bf16",
        batch_tokens=tokens,
        peak_tflops=r["peak_flops"] / 1e12,
        mfu=min(r["mfu"], 1.0),
        overrides={"num_hidden_layers": int(layers)} if layers else None,
    )
    return {"plan_memory": plan.memory["total_no_remat"], "plan_step_s": plan.time_s}


def largest_rows(rows: list[dict], available: int) -> list[dict]:
    """The deepest model at the `1b` width each candidate can train here: its peak grows by the same amount
    per layer, so the peaks at PROBE_LAYERS and 16 layers give that amount and the part that does not grow
    (embedding, logits); `available` (memory free to a new process) less the process's baseline is the room."""
    from palm.model.config import PalmConfig

    out = []
    config = PalmConfig.from_preset("1b")
    full = config.num_hidden_layers
    for name in dict.fromkeys(r["name"] for r in rows):
        probe = next((r for r in rows if r["name"] == name and r["shape"] == f"1b@{PROBE_LAYERS}"), None)
        whole = next((r for r in rows if r["name"] == name and r["shape"] == "1b"), None)
        if probe is None or whole is None:
            continue
        row = {"part": "largest", "returncode": 0, "preset": "1b width", "name": name, "available": available}
        if probe["status"] != "ok" or whole["status"] != "ok":
            row.update(returncode=1, error=(whole if whole["status"] != "ok" else probe).get("reason", "did not run"))
        else:
            per_layer = (whole["peak_memory_bytes"] - probe["peak_memory_bytes"]) / (full - PROBE_LAYERS)
            fixed = whole["peak_memory_bytes"] - full * per_layer
            room = available - whole.get("baseline_rss", 0)
            layers = int((room - fixed) // per_layer)
            params_per_layer = (whole["matmul_params"] - probe["matmul_params"]) / (full - PROBE_LAYERS)
            row.update(
                per_layer=per_layer,
                fixed=fixed,
                room=room,
                layers=layers,
                params=whole["matmul_params"] + (layers - full) * params_per_layer,
            )
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def decode_rows(presets: list[str], scratch: Path) -> list[dict]:
    """bench/decode.py: the presets at prompt 128, `1b`'s prefill at prompt 512, and fp32 greedy agreement."""
    runs = [
        (
            "p128",
            [
                "--presets",
                ",".join(presets),
                "--prompt-len",
                "128",
                "--new-tokens",
                "128",
                "--paths",
                "palm+compile,palm+int8+compile,transformers",
                "--llama-types",
                "f16,q8_0",
            ],
        ),
        (
            "p512",
            [
                "--presets",
                presets[-1],
                "--prompt-len",
                "512",
                "--new-tokens",
                "16",
                "--paths",
                "palm,palm+int8,transformers",
                "--llama-types",
                "f16,q8_0",
            ],
        ),
        (
            "fp32",
            [
                "--presets",
                presets[-1],
                "--dtype",
                "fp32",
                "--prompt-len",
                "128",
                "--new-tokens",
                "128",
                "--paths",
                "palm,transformers",
                "--no-llama-cpp",
            ],
        ),
    ]
    rows = []
    for run, flags in runs:
        out = scratch / f"decode-{run}.json"
        code = run_streamed([sys.executable, str(BENCH / "decode.py"), "--rounds", "1", *flags, "--json", str(out)])
        if code != 0 or not out.exists():
            rows.append(
                {
                    "part": "decode",
                    "run": run,
                    "returncode": code or 1,
                    "preset": presets[-1],
                    "error": "bench/decode.py failed",
                }
            )
            continue
        result = json.loads(out.read_text())
        rows += [
            {
                "part": "decode",
                "run": run,
                "returncode": 0,
                "read_bandwidth": result["read_bandwidth"],
                "prompt_len": result["prompt_len"],
                **r,
            }
            for r in result["rows"]
        ]
    return rows


def serve_rows(model_dir: Path, preset: str, args, scratch: Path) -> list[dict]:
    """bench/serve.py on `model_dir`: palm serve, then llama.cpp's server on the same weights."""
    out = scratch / "serve.json"
    code = run_streamed(
        [
            sys.executable,
            str(BENCH / "serve.py"),
            "--model",
            str(model_dir),
            "--clients",
            "1,8,32",
            "--requests-per-client",
            str(args.serve_requests),
            "--peer",
            "llama.cpp",
            "--json",
            str(out),
        ]
    )
    if code != 0 or not out.exists():
        return [{"part": "serve", "preset": preset, "returncode": code or 1, "error": "bench/serve.py failed"}]
    return [
        {
            "part": "serve",
            "preset": preset,
            "returncode": 0 if "levels" in r else 1,
            **({"error": r["unavailable"]} if "unavailable" in r else {}),
            **r,
        }
        for r in json.loads(out.read_text())
    ]


RESUME_STEPS, RESUME_EVERY = 3, 2


def resume_row(preset: str, scratch: Path, corpus: Path, tokenizer: Path) -> dict:
    """kill -9 in the middle of a checkpoint write, then --resume, against the run never stopped."""
    import signal
    import threading

    import torch
    from safetensors import safe_open

    straight, killed = scratch / "resume-straight", scratch / "resume-killed"

    def args(out: Path) -> list[str]:
        conf = out.with_suffix(".toml")
        conf.write_text(
            f'corpus = ["{corpus}"]\nout = "{out}"\ntokenizer = "{tokenizer}"\npreset = "{preset}"\n'
            f"seq-len = 128\nbatch-size = 1\nmax-steps = {RESUME_STEPS}\ncheckpoint-every = {RESUME_EVERY}\n"
            f'eval-every = 100000\neval-tokens = 128\nkeep-checkpoints = 1\ncache-dir = "{scratch / "cache"}"\n'
        )
        return ["train", "--config", str(conf)]

    row = {"part": "resume", "preset": preset, "returncode": 0}
    start = time.perf_counter()
    done = subprocess.run([*PALM, *args(straight)], capture_output=True, text=True)
    row["straight_s"] = time.perf_counter() - start
    if done.returncode != 0:
        return {**row, "returncode": done.returncode, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    shutil.rmtree(straight / "checkpoints", ignore_errors=True)  # 12 GB each at 1b; the final weights stay

    proc = subprocess.Popen([*PALM, *args(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    written = {}

    def kill_mid_save() -> None:  # once step RESUME_EVERY's temporary folder holds a part-written file
        while proc.poll() is None:
            for part in (killed / "checkpoints").glob(f".step-{RESUME_EVERY:07d}.tmp-*/*.safetensors"):
                size = part.stat().st_size if part.exists() else 0
                if size > 64 << 20:
                    os.kill(proc.pid, signal.SIGKILL)
                    written.update(file=part.name, bytes=size)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_mid_save)
    watcher.start()
    proc.wait()
    watcher.join()
    row.update(killed_code=proc.returncode, killed_in=written)
    if proc.returncode != -signal.SIGKILL:
        return {**row, "returncode": 1, "error": f"the run was not killed mid-save (exit {proc.returncode})"}
    row["checkpoints_left"] = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*"))
    start = time.perf_counter()
    done = subprocess.run([*PALM, "train", "--resume", str(killed)], capture_output=True, text=True)
    row["resume_s"] = time.perf_counter() - start
    if done.returncode != 0:
        return {**row, "returncode": done.returncode, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}

    def losses(run: Path) -> dict[int, float]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r and "event" not in r}

    row["losses"], row["losses_straight"] = losses(killed), losses(straight)
    different = []
    with (
        safe_open(str(straight / "final" / "model.safetensors"), "pt") as a,
        safe_open(str(killed / "final" / "model.safetensors"), "pt") as b,
    ):
        if set(a.keys()) != set(b.keys()):
            different.append("the tensor names")
        for key in sorted(set(a.keys()) & set(b.keys())):
            if not torch.equal(a.get_tensor(key), b.get_tensor(key)):
                different.append(key)
    row["bitwise_equal"] = not different and row["losses"] == row["losses_straight"]
    row["different"] = different[:5]
    shutil.rmtree(straight, ignore_errors=True)
    shutil.rmtree(killed, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--presets", default="base,1b")
    parser.add_argument("--formats", default="none,int8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-seq", type=int, default=1024)
    parser.add_argument("--train-rounds", type=int, default=1, help="timed steps per candidate after a warm-up step")
    parser.add_argument("--serve-requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--json", default="bench/results/scale.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    presets = args.presets.split(",")
    path = Path(args.json)
    # rows of the parts not run this time are kept, so one part can be rerun alone
    kept = json.loads(path.read_text()) if path.exists() else {}
    rows = [
        r for r in kept.get("rows", []) if r["part"] not in parts and not (r["part"] == "largest" and "train" in parts)
    ]
    timings = {k: v for k, v in kept.get("parts", {}).items() if k not in parts}
    stamp = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name()}

    def timed(part: str, work) -> list[dict]:
        start = time.perf_counter()
        got = work()
        # a part run for each preset adds up
        timings[part] = {**stamp, "seconds": timings.get(part, {}).get("seconds", 0) + time.perf_counter() - start}
        return got

    with tempfile.TemporaryDirectory(prefix="palm-scale-", dir=os.environ.get("PALM_SCRATCH")) as tmp:
        scratch = Path(tmp)
        if "train" in parts:
            rows += timed("train", lambda: train_rows(presets, args, scratch))
        if "decode" in parts:
            rows += timed("decode", lambda: decode_rows(presets, scratch))
        if {"generate", "export", "serve", "checkpoint", "resume"} & set(parts):
            write_corpus(scratch / "python-docs.txt")
            train_tokenizer(scratch / "python-docs.txt", scratch / "tok", args.vocab_size)
        for preset in presets:
            if {"generate", "export", "serve"} & set(parts):
                model_dir = scratch / f"model-{preset}"
                done = subprocess.run(
                    [*PALM, "init", "--preset", preset, "--tokenizer", str(scratch / "tok"), "--out", str(model_dir)],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    sys.exit(f"palm init --preset {preset} failed: {done.stderr.strip().splitlines()[-1]}")
                if "generate" in parts:
                    rows += [
                        {"preset": preset, **r}
                        for r in timed(
                            "generate", lambda: generate_rows(model_dir, args.formats.split(","), args.new_tokens)
                        )
                    ]
                if "export" in parts:
                    rows += [{"preset": preset, **r} for r in timed("export", lambda: export_rows(model_dir, scratch))]
                if "serve" in parts and preset == presets[-1]:  # the largest preset: serving is measured at 1b
                    rows += timed("serve", lambda: serve_rows(model_dir, preset, args, scratch))
                subprocess.run(["rm", "-rf", str(model_dir)])
            if "checkpoint" in parts:
                rows.append(timed("checkpoint", lambda: checkpoint_row(preset, scratch)))
        if "resume" in parts:
            rows.append(
                timed("resume", lambda: resume_row(presets[-1], scratch, scratch / "python-docs.txt", scratch / "tok"))
            )
    order = {part: i for i, part in enumerate(HEADERS)}
    rows.sort(key=lambda r: order.get(r["part"], 99))
    result = {**stamp, "parts": timings, "seconds": sum(t["seconds"] for t in timings.values()), "rows": rows}
    report = (
        f"`python bench/scale.py` on {cpu_name()}, {os.cpu_count()} cores; parts: "
        + ", ".join(f"{k} {v['seconds'] / 60:.1f} min ({v['date'][:16]} UTC)" for k, v in timings.items())
        + f"; {result['seconds'] / 60:.1f} min in all\n\n"
        + table(rows)
        + "\n"
    )
    print("\n" + report)
    write_json(path, result)
    write_text(path.with_suffix(".md"), report)


GIB = 2**30
HEADERS = {
    "train": [
        "preset",
        "candidate",
        "tokens/s",
        "vs palm",
        "MFU",
        "peak RSS above baseline",
        "vs palm",
        "palm plan: memory",
        "plan / measured",
        "palm plan: step at this MFU",
        "measured step",
    ],
    "largest": ["width", "candidate", "memory per layer", "fixed part", "room", "deepest that fits", "parameters"],
    "decode": [
        "preset",
        "run",
        "path",
        "decode tok/s",
        "prefill tok/s",
        "bytes/token",
        "bandwidth used",
        "greedy = Transformers (teacher-forced)",
        "same tokens free-running",
    ],
    "serve": [
        "preset",
        "server",
        "clients",
        "requests",
        "failed",
        "output tok/s",
        "vs 1 client",
        "TTFT p50 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "peak RSS",
    ],
    "generate": ["preset", "`palm generate`", "tokens/s", "peak RSS", "weights + KV + baseline", "ratio"],
    "export": [
        "preset",
        "`palm export`",
        "seconds",
        "written",
        "peak RSS",
        "RSS above the baseline",
        "the model on disk (fp32)",
    ],
    "checkpoint": ["preset", "checkpoint", "seconds", "write rate", "disk's rate", "share", "RSS added by the save"],
    "resume": [
        "preset",
        "killed while writing",
        "checkpoints left",
        "resumed losses",
        "the run never stopped",
        "final weights and losses bitwise equal",
        "seconds (straight / resume)",
    ],
}


def _train_reference(rows: list[dict], r: dict) -> dict | None:
    return next(
        (
            x
            for x in rows
            if x["part"] == "train" and x["shape"] == r["shape"] and is_palm(x["name"]) and x["status"] == "ok"
        ),
        None,
    )


def cells(r: dict, rows: list[dict]) -> list[list[str]]:
    """A row's table lines (a serve run gives one per level)."""
    if r["part"] == "train":
        if r["status"] != "ok":
            return [[r["shape"], r["name"], f"does not run: {r.get('reason', '?')}"]]
        ref = _train_reference(rows, r)
        line = [
            r["shape"],
            r["name"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "",
            f"{r['mfu']:.1%}",
            f"{r['peak_memory_bytes'] / GIB:.2f} GiB",
            f"{r['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}x" if ref else "",
        ]
        if "plan_memory" in r:
            line += [
                f"{r['plan_memory'] / GIB:.2f} GiB",
                f"{r['plan_memory'] / r['peak_memory_bytes']:.2f}",
                f"{r['plan_step_s']:.2f} s",
                f"{r['step_s']:.2f} s",
            ]
        return [line]
    if r["returncode"] != 0:
        label = r.get("name") or r.get("server") or r.get("run")
        return [[r["preset"], *([label] if label else []), f"failed: {r['error']}"]]
    if r["part"] == "largest":
        return [
            [
                r["preset"],
                r["name"],
                f"{r['per_layer'] / GIB:.2f} GiB",
                f"{r['fixed'] / GIB:.2f} GiB",
                f"{r['room'] / GIB:.1f} GiB",
                f"{r['layers']} layers",
                f"{r['params'] / 1e9:.2f}B",
            ]
        ]
    if r["part"] == "decode":
        if "unavailable" in r:
            return [[r["preset"], r["run"], r["path"], f"not measured: {r['unavailable']}"]]
        free = f"{r['greedy_free_running']}/{r['new_tokens']}" if "greedy_free_running" in r else ""
        return [
            [
                r["preset"],
                r["run"],
                f"{r['path']} ({r.get('dtype', 'gguf')})",
                f"{r['decode_tok_s']:.1f}",
                f"{r['prefill_tok_s']:.0f}",
                f"{r['bytes_per_token'] / 1e6:.0f} MB",
                f"{r['bandwidth_share']:.0%}",
                f"{r['greedy_teacher_forced']:.0%}",
                free,
            ]
        ]
    if r["part"] == "serve":
        one = r["levels"][0]["tokens_per_s"]
        ms = lambda v: "" if v is None else f"{v * 1e3:.0f}"  # noqa: E731
        rss = f"{r['peak_rss'] / GB:.2f} GB" if r.get("peak_rss") else ""
        return [
            [
                r["preset"],
                r["server"],
                str(lv["clients"]),
                str(lv["requests"]),
                str(lv["failed"]),
                f"{lv['tokens_per_s']:.1f}",
                f"{lv['tokens_per_s'] / one:.2f}x",
                ms(lv["ttft_p50"]),
                ms(lv["itl_p50"]),
                ms(lv["itl_p99"]),
                rss,
            ]
            for lv in r["levels"]
        ]
    if r["part"] == "generate":
        return [
            [
                r["preset"],
                f"{r['dtype']}, --quantize {r['format']}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['peak_rss'] / GB:.2f} GB",
                f"{r['weights'] / GB:.2f} + {r['kv_cache'] / GB:.3f} + {r['baseline_rss'] / GB:.2f} GB",
                f"{r['ratio']:.2f}x",
            ]
        ]
    if r["part"] == "resume":
        fmt = lambda d: ", ".join(f"{v:.4f}" for _, v in sorted(d.items(), key=lambda kv: int(kv[0])))  # noqa: E731
        return [
            [
                r["preset"],
                f"{r['killed_in']['file']} at {r['killed_in']['bytes'] / GB:.2f} GB",
                ", ".join(map(str, r["checkpoints_left"])),
                fmt(r["losses"]),
                fmt(r["losses_straight"]),
                "yes" if r["bitwise_equal"] else f"no: {', '.join(r['different']) or 'losses'}",
                f"{r['straight_s']:.0f} / {r['resume_s']:.0f}",
            ]
        ]
    if r["part"] == "export":
        return [
            [
                r["preset"],
                r["format"],
                f"{r['seconds']:.1f}",
                f"{r['bytes'] / GB:.2f} GB",
                f"{r['peak_rss'] / GB:.2f} GB",
                f"{r['added_rss'] / GB:.2f} GB",
                f"{r['model_bytes'] / GB:.2f} GB",
            ]
        ]
    return [
        [
            r["preset"],
            f"{r['bytes'] / GB:.2f} GB",
            f"{r['seconds']:.1f}",
            f"{r['write_rate'] / GB:.2f} GB/s",
            f"{r['disk_rate'] / GB:.2f} GB/s",
            f"{r['write_rate'] / r['disk_rate']:.0%}",
            f"{r['added_rss'] / GB:.2f} GB",
        ]
    ]


def table(rows: list[dict]) -> str:
    """One markdown table per part that has rows."""
    lines = []
    for part, header in HEADERS.items():
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        lines += ["", f"**{part}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in mine:
            for line in cells(r, rows):
                lines.append("| " + " | ".join(line + [""] * (len(header) - len(line))) + " |")
    return "\n".join(lines[1:])


if __name__ == "__main__":
    main()
