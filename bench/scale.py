"""palm at the sizes users run (issue 30): the parts of the scale ladder the other benches leave out.

    python bench/scale.py [--presets base,1b] [--formats none,int8] [--new-tokens 128] [--json bench/results/scale.json]

- generate: `palm generate` on a random model directory of each preset (written by `palm init`, fp32 on disk
  as `palm train` writes it; a 32000-piece tokenizer trained on palm's python-docs corpus), each weight format,
  in a fresh process: peak RSS beside what it has to hold (the weights in the decoding format + the KV cache
  + the interpreter's baseline, the peak of a process that imports the same modules and loads nothing).
- checkpoint: one training checkpoint of each preset as `palm train` writes it (fp32 weights and the
  Adafactor state, fsynced, renamed into place), in a fresh process: seconds, bytes on disk, its write
  rate beside this disk's (the same bytes written and fsynced in 16 MiB blocks, as `dd conv=fsync` does),
  and the RSS the save adds to the process (a second copy of the state in memory would add its size).

Training at 1b (bench/checkpointing.py, bench/train.py) and decoding against Transformers and llama.cpp
(bench/decode.py --presets 1b) have benches of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from checkpointing import PALM, cpu_name, train_tokenizer, write_corpus

GB = 1e9
PROMPT = "我喜欢编程，因为"
BASELINE = "import torch, transformers, palm.cli, palm.generate, palm.modeldir, palm.quant"


def measured(cmd: list[str]) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of `cmd` in a fresh process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (Popen.wait would take it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024


def generate_rows(model_dir: Path, formats: list[str], new_tokens: int) -> list[dict]:
    from palm.config import PalmConfig
    from palm.runtime import pick_device, pick_dtype

    config = PalmConfig.from_pretrained(str(model_dir))
    dtype = pick_dtype("auto", pick_device(None))
    *_, baseline = measured([sys.executable, "-c", BASELINE])
    rows = []
    for fmt in formats:
        code, out, err, peak = measured([*PALM, "generate", "--model", str(model_dir), PROMPT, "--max-new-tokens",
                                         str(new_tokens), "--temperature", "0", "--quantize", fmt])
        row = {"part": "generate", "format": fmt, "dtype": str(dtype).removeprefix("torch."), "peak_rss": peak,
               "baseline_rss": baseline, "returncode": code}
        if code != 0:
            row["error"] = (err.strip().splitlines() or [f"exit {code}"])[-1]
            rows.append(row)
            continue
        summary = err.strip().splitlines()[-1]  # "[128 tokens, 9.4 tokens/s, length]"
        row["tokens_per_s"] = float(summary.split(",")[1].split()[0])
        row["weights"] = decoding_bytes(model_dir, fmt)
        tokens = len(PROMPT) + 1 + new_tokens  # at most one id per character, BOS first
        row["kv_cache"] = (config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * tokens
                           * dtype.itemsize)
        row["needed"] = row["weights"] + row["kv_cache"] + baseline
        row["ratio"] = peak / row["needed"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decoding_bytes(model_dir: Path, fmt: str) -> int:
    """Bytes of the decoding model's weights: every tensor it holds, the embedding looked up included."""
    code, out, err, _ = measured([sys.executable, "-c", textwrap.dedent(f"""
        from palm.generate import Generator
        from palm.quant import weight_bytes
        g = Generator.load({str(model_dir)!r}, quantize={fmt!r})
        embed = g.model.model.embed_tokens.weight
        print(weight_bytes(g.step.decoder) + embed.numel() * embed.element_size())
    """)])
    if code != 0:
        sys.exit(f"reading {model_dir} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return int(out.split()[-1])


SAVE = """
import json, sys, time, torch
from pathlib import Path
from palm.checkpoint import save_training_checkpoint
from palm.config import PalmConfig
from palm.model import PalmForCausalLM
from palm.optim import build_optimizer
from palm.rundir import RunLayout

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
    """Bytes/s of writing `size` bytes in 16 MiB blocks and fsyncing them (dd bs=16M conv=fsync)."""
    block = os.urandom(16 << 20)
    path = folder / "dd.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    rate = path.stat().st_size / (time.perf_counter() - start)
    path.unlink()
    return rate


def checkpoint_row(preset: str, scratch: Path) -> dict:
    code, out, err, _ = measured([sys.executable, "-c", SAVE, preset, str(scratch / f"ckpt-{preset}")])
    if code != 0:
        return {"part": "checkpoint", "preset": preset, "returncode": code,
                "error": (err.strip().splitlines() or [f"exit {code}"])[-1]}
    row = {"part": "checkpoint", "preset": preset, "returncode": 0, **json.loads(out.splitlines()[-1])}
    row["bytes"] = sum(row["files"].values())
    row["write_rate"] = row["bytes"] / row["seconds"]
    row["disk_rate"] = disk_write_rate(scratch, row["bytes"])
    row["added_rss"] = row["rss_peak"] - row["rss_before"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="base,1b")
    parser.add_argument("--formats", default="none,int8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--json", default="bench/results/scale.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="palm-scale-", dir=os.environ.get("PALM_SCRATCH")) as tmp:
        scratch = Path(tmp)
        write_corpus(scratch / "python-docs.txt")
        train_tokenizer(scratch / "python-docs.txt", scratch / "tok", args.vocab_size)
        for preset in args.presets.split(","):
            model_dir = scratch / f"model-{preset}"
            done = subprocess.run([*PALM, "init", "--preset", preset, "--tokenizer", str(scratch / "tok"), "--out",
                                   str(model_dir)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"palm init --preset {preset} failed: {done.stderr.strip().splitlines()[-1]}")
            rows += [{"preset": preset, **r} for r in generate_rows(model_dir, args.formats.split(","), args.new_tokens)]
            subprocess.run(["rm", "-rf", str(model_dir)])
            rows.append(checkpoint_row(preset, scratch))
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
    print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "cpu": cpu_name(), "rows": rows}, indent=1))


HEADERS = {
    "generate": ["preset", "`palm generate`", "tokens/s", "peak RSS", "weights + KV + baseline", "ratio"],
    "checkpoint": ["preset", "checkpoint", "seconds", "write rate", "disk's rate", "share", "RSS added by the save"],
}


def cells(r: dict) -> list[str]:
    if r["returncode"] != 0:
        return [r["preset"], f"failed: {r['error']}"]
    if r["part"] == "generate":
        return [r["preset"], f"{r['dtype']}, --quantize {r['format']}", f"{r['tokens_per_s']:.1f}",
                f"{r['peak_rss'] / GB:.2f} GB",
                f"{r['weights'] / GB:.2f} + {r['kv_cache'] / GB:.3f} + {r['baseline_rss'] / GB:.2f} GB", f"{r['ratio']:.2f}x"]
    return [r["preset"], f"{r['bytes'] / GB:.2f} GB", f"{r['seconds']:.1f}", f"{r['write_rate'] / GB:.2f} GB/s",
            f"{r['disk_rate'] / GB:.2f} GB/s", f"{r['write_rate'] / r['disk_rate']:.0%}", f"{r['added_rss'] / GB:.2f} GB"]


def table(rows: list[dict]) -> str:
    """One markdown table per part."""
    lines = []
    for part, header in HEADERS.items():
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            if r["part"] == part:
                row = cells(r)
                lines.append("| " + " | ".join(row + [""] * (len(header) - len(row))) + " |")
    return "\n".join(lines[1:])


if __name__ == "__main__":
    main()
