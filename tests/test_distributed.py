"""Data parallel training under torchrun (gloo on CPU) matches one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from palm.cli import main


def write_config(tmp_path, corpus_dir, tokenizer_dir, name):
    conf = tmp_path / f"{name}.toml"
    conf.write_text(
        f'corpus = ["{corpus_dir}"]\nout = "{tmp_path / name}"\ntokenizer = "{tokenizer_dir}"\nmax-steps = 6\n'
        f'seq-len = 32\nbatch-size = 8\neval-every = 1000\ncheckpoint-every = 3\nprogress = false\n'
        f'cache-dir = "{tmp_path / "cache"}"\n'
        "[model]\nhidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nhead_dim = 16\n"
    )
    return conf


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "event" not in r]


def test_ddp_two_processes_match_one(tmp_path, corpus_dir, tokenizer_dir, capsys):
    single = write_config(tmp_path, corpus_dir, tokenizer_dir, "single")
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(single)])
        raise SystemExit(0)
    assert info.value.code == 0

    ddp = write_config(tmp_path, corpus_dir, tokenizer_dir, "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "palm.cli", "train", "--config", str(ddp), "--parallel", "ddp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
    assert done.stdout.count("trained 6 steps") == 1  # rank 0 alone reports
