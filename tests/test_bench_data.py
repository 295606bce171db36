"""bench/data.py's candidates tokenize the same documents into the same number of tokens (no timing here)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent.parent / "bench" / "data.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_palm_and_datasets_map_give_the_same_tokens(tmp_path, tokenizer_dir):
    bench = load()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"document {i}: 我们一起去公园散步吧"}, ensure_ascii=False) + "\n" for i in range(300)
        ),
        encoding="utf-8",
    )
    (tmp_path / "p").mkdir()
    (tmp_path / "d").mkdir()
    palm = bench.run_palm(corpus, Path(tokenizer_dir), 1, tmp_path / "p")
    hf = bench.run_datasets(corpus, Path(tokenizer_dir), 1, tmp_path / "d")
    assert palm["tokens"] == hf["tokens"] > 300
    (shard,) = (tmp_path / "p" / "cache").iterdir()
    ours = np.concatenate([np.fromfile(shard / "train.bin", np.uint16), np.fromfile(shard / "val.bin", np.uint16)])
    assert sorted(ours.tolist()) == sorted(np.fromfile(tmp_path / "d" / "train.bin", np.uint16).tolist())
    rows = [
        {"name": n, "processes": 1, "mb_s": s, "peak_pss": m, "peak_rss": m}
        for n, s, m in (("palm", 2.0, 100 * 2**20), ("datasets.map", 1.0, 400 * 2**20))
    ]
    assert "| palm | 1 | 2.00 | 100 MiB | 100 MiB | 2.00x | 0.25x |" in bench.table(rows)
