"""Run the benchmarks and publish them: JSON, a markdown table, a PNG chart and docs/performance.md's table.

    python bench/report.py [--quick] [--only train,tokenizer,quality] [--threads N] [--no-page]

--quick takes a few minutes (training steps on the tiny and small presets, 1 MB per corpus for the
tokenizers, 60 s per candidate for quality); the full run adds the base preset and longer budgets.
Writes bench/results/<UTC time>.json, bench/results/latest.json (under "train": one object per
candidate and shape with name, shape, tokens_per_s and mfu as a fraction), latest.md, latest.png,
and replaces the part of docs/performance.md between the bench markers with latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin (bench/report.py writes this part) -->", "<!-- bench:end -->"
PARTS = ("train", "tokenizer", "quality")


def load(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package; `tokenizer` is too common a name)."""
    import importlib.util

    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(tmp, path)


def markdown(result: dict) -> str:
    quality_bench, tokenizer_bench, train_bench = load("quality"), load("tokenizer"), load("train")
    threads = result.get("threads")
    threads = f"{threads} thread" + ("s" if threads != 1 else "")
    flags = " --quick" if result["quick"] else ""
    out = [
        f"Measured {result['when']} with `python bench/report.py{flags}` "
        f"({result.get('machine', {}).get('cpu', 'this machine')}, {threads})."
    ]
    if "train" in result:
        t, s = result, result["settings"]
        out += [
            "",
            f"**Training step** (forward, backward, clip, {s['optimizer']}; batch {s['batch']} x "
            f"{s['seq']}; {t['dtype_note']}; matmul peak measured in the run: "
            f"fp32 {t['peak_flops']['fp32'] / 1e9:.0f} GFLOP/s, bf16 {t['peak_flops']['bf16'] / 1e9:.1f} GFLOP/s; "
            f"{s['timing']}):",
            "",
            train_bench.table(t),
            "",
        ]
        out += [f"- {line}" for line in train_bench.summary(t)]
        for shape, p in t.get("profile", {}).items():
            top = ", ".join(f"`{e['op']}` {e['share']:.0%}" for e in p["top"][:6])
            out.append(
                f"- palm's step on {shape}, profiled: matmuls {p['matmul_share']:.0%}, attention "
                f"{p['attention_share']:.0%}, everything else {p['other_share']:.0%} (top: {top})"
            )
    if "tokenizer" in result:
        out += [
            "",
            f"**Tokenizers** (vocabulary {result['tokenizer']['vocab_size']}, trained on "
            f"{result['tokenizer']['train_mb']:.1f} MB of the four corpora, measured on held-out text; "
            "speeds are means over the corpora):",
            "",
            tokenizer_bench.table(result["tokenizer"]),
        ]
    if "quality" in result:
        q = result["quality"]
        s = q["setting"]
        out += [
            "",
            f"**Quality per second** ({q['budget_s']:.0f} s of training each on the demo mixture, "
            f"d={s['d']}, {s['layers']} layers, {s['heads']} heads, seq {s['seq']}, batch {s['batch']}; "
            "validation bits per byte, lower is better):",
            "",
            quality_bench.table(q),
        ]
    return "\n".join(out) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("train", []) if r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        for ax, key, scale in ((axes[0], "ratio_to_palm", 1), (axes[1], "mfu", 100)):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                r = next((r for r in rows if r["name"] == name and r["shape"] == shape), None)
                if r and r.get(key) is not None:
                    xs.append(j + i * width)
                    ys.append(r[key] * scale)
            ax.bar(xs, ys, width, label=name)
    titles = ("training tokens/s relative to palm", f"MFU, % of the measured {result.get('dtype')} matmul peak")
    for ax, title in zip(axes, titles):
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(shapes))], shapes)
        ax.set_title(title)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def update_page(md: str, page: Path = PAGE) -> bool:
    """Put `md` between the bench markers of the page; False when the markers are missing."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_atomic(page, head + BEGIN + "\n" + md + END + tail)
    return True


def run(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = ["--threads", str(args.threads)] if args.threads else []
    quick = ["--quick"] if args.quick else []
    dtype = ["--dtype", args.dtype]
    result: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "machine": {"cpu": cpu_name()},
    }
    start = time.perf_counter()
    if "train" in args.only:
        train_bench = load("train")
        print("== training step", flush=True)
        t = train_bench.run(train_bench.parse_args(quick + threads + dtype + ["--profile"]))
        result.update({k: v for k, v in t.items() if k != "machine"})
        result["machine"].update(t["machine"])
    if "tokenizer" in args.only:
        tokenizer_bench = load("tokenizer")
        print("== tokenizers", flush=True)
        result["tokenizer"] = tokenizer_bench.run(tokenizer_bench.parse_args(quick + threads))
    if "quality" in args.only:
        quality_bench = load("quality")
        print("== quality per second", flush=True)
        result["quality"] = quality_bench.run(quality_bench.parse_args(quick + threads + dtype))
    result["wall_s"] = time.perf_counter() - start
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def publish(result: dict, out: Path = RESULTS, page: Path | None = PAGE) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    body = json.dumps(result, indent=1)
    write_atomic(out / f"{stamp}{'-quick' if result['quick'] else ''}.json", body)
    write_atomic(out / "latest.json", body)
    md = markdown(result)
    write_atomic(out / "latest.md", md)
    if result.get("train"):
        chart(result, out / "latest.png")
    if page is not None and not update_page(md, page):
        print(f"{page} has no bench markers; the table is in {out / 'latest.md'}", file=sys.stderr)
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated: train, tokenizer, quality")
    ap.add_argument("--threads", type=int)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="training-step dtype (auto: bf16 where it is native)",
    )
    ap.add_argument("--no-page", action="store_true", help="leave docs/performance.md alone")
    args = ap.parse_args(argv)
    args.only = [p for p in args.only.split(",") if p]
    for p in args.only:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    result = run(args)
    md = publish(result, page=None if args.no_page else PAGE)
    print()
    print(md)
    print(f"(took {result['wall_s'] / 60:.1f} min; results in {RESULTS})")


if __name__ == "__main__":
    main()
