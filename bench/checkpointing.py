"""What activation checkpointing buys where it matters: peak RSS of `palm train` at `1b` for a few steps,
without checkpointing, with `full` and with `selective`, at sequence 1024 and 2048, beside `palm plan`'s
prediction for the same run, which counts the run's tensors: it is compared with the peak less the peak of
a process that imports the same modules and builds nothing (the interpreter's baseline).

    python bench/checkpointing.py [--preset 1b] [--seq-lens 1024,2048] [--modes none,full,selective]
                                  [--steps 3] [--json PATH]

Each run is the command a user types (`palm train --preset 1b --seq-len T --batch-size 1 --max-steps 3
--activation-checkpointing MODE`, `--dtype auto`), in a fresh process, on the named corpus python-docs (written to a file) with a
tokenizer of the preset's vocabulary trained on it once before. Peak RSS is the kernel's high-water mark of the
process (what `/usr/bin/time -v` reports), checkpoint saves and the final export included. Tokens/s is
the best step's. `palm plan --device cpu --compute-copies` is the prediction: the training state of one process
training in bf16 on compute copies (or in fp32 where bf16 is not native) plus the activations of each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from palm.core.runtime import pick_dtype
from palm.training.plan import make_plan

GIB = 2**30
PALM = [sys.executable, "-m", "palm.cli"]
# What `palm train` has imported before it builds anything: the interpreter's share of its peak RSS,
# which palm plan leaves out (it counts the run's tensors).
BASELINE = "import torch, transformers, tokenizers, safetensors, palm.cli, palm.training.train, palm.training.loop, palm.model.model"


def write_corpus(path: Path) -> None:
    from palm.data.corpora import NAMED_CORPORA

    path.write_text("\n\n".join(NAMED_CORPORA["python-docs"]()), encoding="utf-8")


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    done = subprocess.run(
        [*PALM, "tokenizer", "train", "--corpus", str(corpus), "--vocab-size", str(vocab), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"training the tokenizer failed: {done.stderr.strip().splitlines()[-1]}")


# Runs argv[2:] and writes its peak RSS to the file descriptor argv[1]. Linux starts a new program's peak RSS
# at that of the process that spawned it (exec folds the old memory map's high-water mark into ru_maxrss), so a
# child of a large process (a pytest run 2 GB in) reports at least that; this small launcher is the parent that
# counts.
_LAUNCHER = """
import os, signal, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), str(usage.ru_maxrss * 1024).encode())
if os.WIFSIGNALED(status):  # die of the same signal, so the caller sees what the program saw
    if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(cmd: list[str]) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in bytes) of `cmd` in a fresh process."""
    read, write = os.pipe()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(write), *cmd], stdout=out, stderr=err, text=True, pass_fds=(write,)
        )
        os.close(write)
        with os.fdopen(read) as f:
            peak = f.read()  # until the launcher exits
        code = proc.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read(), int(peak) if peak else 0


def baseline_rss() -> int:
    """Peak RSS of a process that imports what `palm train` imports and builds nothing."""
    return measured([sys.executable, "-c", BASELINE])[3]


def run(
    scratch: Path,
    tokenizer: Path,
    preset: str,
    seq_len: int,
    mode: str,
    steps: int,
    batch: int = 1,
    dtype: str = "auto",
) -> dict:
    out = scratch / f"run-{mode}-{seq_len}"
    conf = scratch / f"{mode}-{seq_len}.toml"
    conf.write_text(
        f'corpus = ["{scratch / "python-docs.txt"}"]\nout = "{out}"\ntokenizer = "{tokenizer}"\npreset = "{preset}"\n'
        f"seq-len = {seq_len}\nbatch-size = {batch}\nmax-steps = {steps}\n"
        f'activation-checkpointing = "{mode}"\ndtype = "{dtype}"\neval-every = 100000\ncheckpoint-every = 100000\n'
        f'eval-tokens = {seq_len}\ncache-dir = "{scratch / "cache"}"\n'
    )
    start = time.perf_counter()
    code, out_text, err_text, peak = measured([*PALM, "train", "--config", str(conf)])
    output = out_text + err_text
    row = {
        "mode": mode,
        "seq_len": seq_len,
        "batch": batch,
        "wall_s": time.perf_counter() - start,
        "returncode": code,
        "peak_rss": peak,
    }
    if code != 0:
        row["error"] = output.strip().splitlines()[-1] if output.strip() else f"exit {code}"
        return row
    row["vocab_size"] = json.loads((out / "final" / "config.json").read_text())["vocab_size"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    row["tokens_per_s"] = max(r["tokens_per_s"] for r in records)
    row["mfu"] = max(r["mfu"] for r in records)
    row["step_s"] = [seq_len / r["tokens_per_s"] for r in records]
    row["dtype"] = str(pick_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
    shutil.rmtree(out, ignore_errors=True)
    return row


def predicted(preset: str, seq_len: int, mode: str, copies: bool, batch: int = 1, vocab_size: int | None = None) -> int:
    """`palm plan --device cpu --param-bytes 4 [--compute-copies]`'s memory for one process's run."""
    plan = make_plan(
        preset,
        seq_len,
        1.0,
        device="cpu",
        param_bytes=4,
        compute_copies=copies,
        batch_tokens=batch * seq_len,
        overrides={"vocab_size": vocab_size} if vocab_size else None,
    )
    key = {"none": "total_no_remat", "full": "total_remat", "selective": "total_selective"}[mode]
    return plan.memory[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq-lens", default="1024,2048")
    parser.add_argument("--modes", default="none,full,selective")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--json", default="bench/results/checkpointing.json")
    args = parser.parse_args()
    copies = pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    baseline = baseline_rss()
    rows = []
    with tempfile.TemporaryDirectory(prefix="palm-ac-bench-") as tmp:
        scratch = Path(tmp)
        write_corpus(scratch / "python-docs.txt")
        train_tokenizer(scratch / "python-docs.txt", scratch / "tok", args.vocab_size)
        for seq_len in map(int, args.seq_lens.split(",")):
            for mode in args.modes.split(","):
                row = run(scratch, scratch / "tok", args.preset, seq_len, mode, args.steps)
                row["plan"] = predicted(args.preset, seq_len, mode, copies, vocab_size=row.get("vocab_size"))
                row["baseline_rss"] = baseline
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.preset}, batch 1, {args.steps} steps, {cpu_name()}, {os.cpu_count()} cores\n")
    print(f"interpreter baseline (peak RSS of a process importing what palm train imports): {baseline / GIB:.2f} GiB\n")
    print("| sequence | checkpointing | peak RSS | less the baseline | palm plan | plan / measured | tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["returncode"] != 0:
            print(f"| {r['seq_len']} | {r['mode']} | failed: {r['error']} | | {r['plan'] / GIB:.1f} GiB | | | |")
            continue
        run_rss = r["peak_rss"] - baseline
        print(
            f"| {r['seq_len']} | {r['mode']} | {r['peak_rss'] / GIB:.1f} GiB | {run_rss / GIB:.1f} GiB | "
            f"{r['plan'] / GIB:.1f} GiB | {r['plan'] / run_rss:.2f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cpu": cpu_name(),
                "preset": args.preset,
                "steps": args.steps,
                "rows": rows,
            },
            indent=1,
        )
    )


def cpu_name() -> str:
    """The processor's name and its widest matrix instructions: the sessions' machines share a name
    ("AMD EPYC") across an AVX2-only part and a Zen 4 with AVX512-BF16."""
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        return name
    isa = next(
        (
            label
            for flag, label in (
                ("amx_bf16", "AMX-BF16"),
                ("avx512_bf16", "AVX512-BF16"),
                ("avx512f", "AVX-512"),
                ("avx2", "AVX2 only"),
            )
            if flag in flags
        ),
        None,
    )
    return f"{name} ({isa})" if isa else name


if __name__ == "__main__":
    main()
