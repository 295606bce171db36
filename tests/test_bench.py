"""The benchmark scripts' pure helpers, and that every candidate builds and steps on a toy shape.

No benchmark is run here: bench/report.py does that, on demand.
"""

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm import PalmConfig
from palm.core.runtime import fast_bf16
from palm.training.flops import flops_per_token, matrix_params

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = load("train")
tokenizer = load("tokenizer")
quality = load("quality")
report = load("report")

TOY = train.Shape("toy", vocab=64, d=32, layers=2, heads=2, head_dim=16, seq=16)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_flop_count_of_palm_is_appendix_b(preset):
    shape = train.preset_shape(preset)
    model, _ = train.build_palm(shape)
    config = PalmConfig.from_preset(preset)
    assert train.matmul_params(model) == matrix_params(config)
    assert train.flops_per_token(train.matmul_params(model), shape) == flops_per_token(config, 512)


@pytest.mark.parametrize("name", train.CANDIDATES)
def test_every_candidate_builds_and_takes_a_step_or_says_why_not(name):
    try:
        c = train.make_candidate(name, TOY, torch.device("cpu"), torch.float32)
    except train.Unavailable as e:
        assert name in ("litgpt", "palm-pytorch") and "install" in str(e)
        return
    x, y = train.batch_for(TOY, 2, torch.device("cpu"))
    before = [p.detach().clone() for p in c.model.parameters()]
    assert train.timed_step(c, x, y, torch.device("cpu")) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, c.model.parameters()))
    # same shape for all: tied embeddings and the same matmul budget within Falcon's GELU rounding
    palm_n = train.matmul_params(train.build_palm(TOY)[0])
    assert abs(train.matmul_params(c.model) - palm_n) / palm_n < 0.15


def _row(name, shape, tps, fpt=1e9):
    return {
        "name": name,
        "shape": shape,
        "status": "ok",
        "tokens_per_s": tps,
        "mfu": tps * fpt / 1e12,
        "flops_per_token": fpt,
        "peak_memory_bytes": 2**20,
        "ratio_to_palm": None,
    }


def test_table_and_summary_compare_palm_with_the_fastest_peer():
    rows = [
        _row("palm", "small", 300.0),
        _row("falcon", "small", 200.0),
        _row("palm-pytorch", "small", 250.0),
        _row("palm+compile", "small", 900.0),
        {
            "name": "litgpt",
            "shape": "small",
            "status": "unavailable",
            "reason": "not installed",
            "tokens_per_s": None,
            "mfu": None,
        },
    ]
    result = {"train": rows, "dtype": "fp32"}
    text = train.table(result)
    assert "| small | litgpt | n/a: not installed |" in text
    assert "| small | palm | 300 | 30.0% |" in text
    (line,) = train.summary(result)
    assert "1.20x the fastest peer (palm-pytorch)" in line  # palm's own compiled run is not a peer


def test_quick_defaults_and_unknown_candidate():
    args = train.parse_args(["--quick"])
    assert args.shapes == ["tiny", "small"] and args.batch == 2 and args.rounds == 8
    assert train.parse_args([]).shapes == ["tiny", "small", "base"]
    with pytest.raises(SystemExit):
        train.parse_args(["--candidates", "palm,gpt5"])


# In a fresh process (the setting is process-wide): whether a 64 MiB malloc is served by its own mapping,
# as glibc does by default, or from the heap, counted by mallinfo2's hblks (the number of mapped blocks).
_MAPPED_BLOCKS = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("bench_train", sys.argv[1])
train = importlib.util.module_from_spec(spec); sys.modules[spec.name] = train; spec.loader.exec_module(train)
kept = sys.argv[2] == "keep" and train.keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(kept, libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="--keep-freed-memory is glibc's mallopt")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    def mapped(mode):
        done = subprocess.run(
            [sys.executable, "-c", _MAPPED_BLOCKS, str(BENCH / "train.py"), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split()

    assert mapped("default") == ["False", "1"]
    assert mapped("keep") == ["True", "0"]
    args = train.parse_args(["--quick", "--keep-freed-memory"])
    assert args.keep_freed_memory and not train.parse_args(["--quick"]).keep_freed_memory


def test_dtype_falls_back_to_fp32_without_native_bf16():
    dtype, note = train.choose_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if fast_bf16(torch.device("cpu")) else torch.float32)
    assert train.choose_dtype("bf16", torch.device("cpu"))[0] == torch.bfloat16


def test_sentencepiece_lines_fit_its_limit_and_keep_all_text():
    doc = "a" * 5000 + "\n\n" + "中" * 3000 + "\nend"
    lines = tokenizer.lines_of([doc], max_bytes=4000)
    assert all(0 < len(line.encode()) <= 4000 for line in lines)
    assert "".join(lines) == doc.replace("\n", "")
    train_docs, held = tokenizer.split(["x"] * 3)
    assert len(train_docs) == 2 and len(held) == 1


def test_quality_table_marks_the_best_per_corpus():
    result = {
        "quality": [
            {
                "name": "palm",
                "block": "parallel",
                "recipe": "r1",
                "steps": 10,
                "tokens_per_s": 100.0,
                "val_bpb": {"zh": 2.0, "py": 1.5},
            },
            {
                "name": "llama",
                "block": "serial",
                "recipe": "r2",
                "steps": 8,
                "tokens_per_s": 80.0,
                "val_bpb": {"zh": 2.1, "py": 1.4},
            },
        ]
    }
    text = quality.table(result)
    assert "| palm (parallel) | r1 | 10 | 100 | **2.000** | 1.500 |" in text
    assert "| llama (serial) | r2 | 8 | 80 | 2.100 | **1.400** |" in text


def test_report_publishes_json_table_chart_and_the_performance_page(tmp_path):
    readme = tmp_path / "performance.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    result = {
        "when": "now",
        "quick": True,
        "threads": 1,
        "machine": {"cpu": "cpu"},
        "dtype": "fp32",
        "dtype_note": "fp32",
        "peak_flops": {"fp32": 1e11, "bf16": 3e8},
        "settings": {"batch": 2, "seq": 512, "timing": "best", "optimizer": "fused AdamW"},
        "train": [_row("palm", "tiny", 300.0), _row("falcon", "tiny", 250.0)],
        "profile": {},
    }
    md = report.publish(result, out=tmp_path / "results", page=readme)
    text = readme.read_text()
    assert "old table" not in text and "| tiny | falcon | 250 |" in text and text.endswith("after\n")
    assert "(forward, backward, clip, fused AdamW; batch 2 x 512;" in text  # the optimizer the run used
    assert (tmp_path / "results" / "latest.json").read_text().count('"tokens_per_s"') == 2
    assert (tmp_path / "results" / "latest.png").read_bytes()[:4] == b"\x89PNG"
    assert md == (tmp_path / "results" / "latest.md").read_text()
    assert not report.update_page("x", tmp_path / "results" / "latest.md")  # no markers: left alone


sys.modules.setdefault("checkpointing", load("checkpointing"))  # scale.py imports its sibling by that name
scale = load("scale")
GIB = 2**30


def _train_row(name, shape, peak, params, status="ok"):
    return {
        "part": "train",
        "returncode": 0,
        "name": name,
        "shape": shape,
        "preset": shape,
        "status": status,
        "tokens_per_s": 10.0,
        "mfu": 0.5,
        "peak_memory_bytes": peak,
        "baseline_rss": GIB // 2,
        "matmul_params": params,
        "reason": "did not fit",
    }


def test_scale_the_largest_model_follows_from_the_peaks_at_two_depths():
    # 8 GiB at 8 layers, 12 GiB at 16: 0.5 GiB a layer on top of 4 GiB; 20.5 GiB free less a 0.5 GiB baseline
    rows = [
        _train_row("palm", "1b@8", 8 * GIB, 600),
        _train_row("palm", "1b", 12 * GIB, 1000),
        _train_row("falcon", "1b@8", 8 * GIB, 600),
        _train_row("falcon", "1b", 0, 0, status="unavailable"),
        _train_row("litgpt", "base", GIB, 100),
    ]
    palm, falcon = scale.largest_rows(rows, available=int(20.5 * GIB))
    assert palm["layers"] == 32 and palm["per_layer"] == GIB / 2 and palm["fixed"] == 4 * GIB
    assert palm["params"] == 1000 + 16 * 50  # 50 matmul parameters a layer
    assert falcon["returncode"] == 1 and falcon["error"] == "did not fit"
    text = scale.table(rows + [palm, falcon])
    assert "| 1b width | palm | 0.50 GiB | 4.00 GiB | 20.0 GiB | 32 layers |" in text
    assert "| 1b | falcon | does not run: did not fit |" in text


def test_scale_runs_a_part_alone_and_keeps_the_others(tmp_path):
    """`--parts checkpoint` at `tiny` writes its rows, a markdown table beside the JSON, and keeps the rows of
    the parts it did not run."""
    out = tmp_path / "scale.json"
    out.write_text('{"rows": [{"part": "export", "preset": "tiny", "returncode": 1, "error": "kept"}], "parts": {}}')
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "scale.py"),
            "--parts",
            "checkpoint",
            "--presets",
            "tiny",
            "--vocab-size",
            "512",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(out.read_text())
    parts = [r["part"] for r in result["rows"]]
    assert parts == ["export", "checkpoint"] and set(result["parts"]) == {"checkpoint"}
    checkpoint = result["rows"][1]
    assert checkpoint["returncode"] == 0 and checkpoint["files"]["model.safetensors"] > 0
    assert checkpoint["bytes"] == sum(checkpoint["files"].values()) and checkpoint["write_rate"] > 0
    text = out.with_suffix(".md").read_text()
    assert "| tiny | failed: kept |" in text and "**checkpoint**" in text


def test_structured_bench_checks_each_library_on_a_palm_vocabulary(tokenizer_dir):
    """bench/structured.py's measure() walks valid replies through a library's masks: xgrammar (palm's) allows
    every token and the end; a reply its grammar cannot produce is reported wrong, not timed."""
    structured = load("structured")
    from palm.text.tokenizer import PalmTokenizer

    tok = PalmTokenizer.load(tokenizer_dir)
    texts = structured.replies(3)
    ids = [tok.encode(t, bos=False) for t in texts]
    row = structured.measure(structured.XGrammar, tok, tok.eos_id, texts, ids)
    assert row["wrong"] is None and row["tokens"] == sum(len(i) + 1 for i in ids)
    spaced = ['{"title": "a", "count": 1, "ok": true}']  # not the compact separators the grammar is set to
    row = structured.measure(structured.XGrammar, tok, tok.eos_id, spaced, [tok.encode(spaced[0], bos=False)])
    assert "refused token" in row["wrong"]


def test_the_bandwidth_probe_reads_the_whole_buffer_on_every_loop():
    decode = load("decode")
    from palm.inference import matvec

    built = matvec.build(Path(decode.__file__).with_name("bandwidth.c"))
    if built is None:
        pytest.skip("no C compiler here: the probe is torch's sum alone")
    import ctypes

    lib = ctypes.CDLL(str(built))
    words = torch.randint(0, 256, ((3 * 32768 + 8) // 8,), dtype=torch.int64)  # small: 64-bit sums stay exact
    data = words.view(torch.uint8)
    loops = [lib.palm_read_stream, lib.palm_read_rows] + (
        [lib.palm_read_rows512] if "avx512f" in matvec.cpu_flags() else []
    )
    for f in loops:
        f.restype, f.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    # Summed as 64-bit lanes, so a loop's total is the sum of the words it read: every one of its whole blocks.
    assert lib.palm_read_stream(data.data_ptr(), data.numel(), 2) == words[: data.numel() // 128 * 16].sum().item()
    for f in loops[1:]:
        assert f(data.data_ptr(), data.numel(), 2) == words[: 3 * 32768 // 8].sum().item()
    assert decode.read_bandwidth(torch.device("cpu")) > 1e8
