"""Training under torchrun (gloo on CPU) matches one process on the same global batch, with DDP and with
FSDP2, and FSDP's sharded checkpoints resume on another number of processes (2 -> 1 and 1 -> 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from palm.training.checkpoint import list_checkpoints

STEPS = 6  # checkpoints at 0, 3 and 6; the resume tests continue from 3


def write_config(tmp_path, corpus_dir, tokenizer_dir, name, dtype="fp32"):
    """fp32 unless asked: the runs are compared to 1e-5, which bf16 rounding would not meet."""
    conf = tmp_path / f"{name}.toml"
    # An odd width, so FSDP splits some tensors unevenly over two ranks (3 ranks would split the rest).
    conf.write_text(
        f'corpus = ["{corpus_dir}"]\nout = "{tmp_path / name}"\ntokenizer = "{tokenizer_dir}"\nmax-steps = {STEPS}\n'
        f"seq-len = 32\nbatch-size = 8\neval-every = 1000\ncheckpoint-every = 3\nprogress = false\n"
        f'cache-dir = "{tmp_path / "cache"}"\ndtype = "{dtype}"\n'
        "[model]\nhidden_size = 63\nnum_hidden_layers = 2\nnum_attention_heads = 4\nhead_dim = 16\n"
    )
    return conf


def torchrun(*args, nproc=2):
    """`torchrun --standalone --nproc_per_node 2 -m palm.cli ARGS`, as the README shows it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "palm.cli",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "event" not in r]


def assert_same_losses(one, two, rel=1e-5):
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) <= rel * abs(a), (one, two)


def is_sharded(checkpoint):
    return (checkpoint / "shards" / "metadata.json").is_file() and not (checkpoint / "model.safetensors").exists()


def cut_at(run, out, step):
    """A copy of `run` as if it had been killed right after checkpointing `step`."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "final")
    for checkpoint in list_checkpoints(out):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    return out


def run_cli_main(argv) -> int:
    from palm.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
        raise SystemExit(0)
    return info.value.code


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(folder, corpus_dir, tokenizer_dir):
    """The reference: one plain process on the whole global batch."""
    assert run_cli_main(["train", "--config", str(write_config(folder, corpus_dir, tokenizer_dir, "single"))]) == 0
    return folder / "single"


@pytest.fixture(scope="module")
def fsdp(folder, corpus_dir, tokenizer_dir):
    conf = write_config(folder, corpus_dir, tokenizer_dir, "fsdp")
    done = torchrun("train", "--config", str(conf), "--parallel", "fsdp")
    assert done.stdout.count(f"trained {STEPS} steps") == 1  # rank 0 alone reports
    return folder / "fsdp"


def test_ddp_two_processes_match_one(single, folder, corpus_dir, tokenizer_dir):
    ddp = write_config(folder, corpus_dir, tokenizer_dir, "ddp")
    done = torchrun("train", "--config", str(ddp), "--parallel", "ddp")
    assert_same_losses(losses(single), losses(folder / "ddp"))
    assert (folder / "ddp" / "final" / "model.safetensors").is_file()
    assert done.stdout.count(f"trained {STEPS} steps") == 1  # rank 0 alone reports


def test_fsdp_two_processes_match_one(single, fsdp):
    assert_same_losses(losses(single), losses(fsdp))
    # Checkpoints are sharded: one DCP file per rank; the final model is one Transformers directory.
    checkpoints = list_checkpoints(fsdp)
    assert [c.name for c in checkpoints] == ["step-0000000", "step-0000003", "step-0000006"]
    assert all(is_sharded(c) and len(list((c / "shards").glob("*.distcp"))) == 2 for c in checkpoints)
    a = load_file(str(single / "final" / "model.safetensors"))
    b = load_file(str(fsdp / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fsdp / "final"), trust_remote_code=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("parallel", ["fsdp", "none"])
def test_fsdp_checkpoint_resumes_on_one_process(single, fsdp, tmp_path, capsys, parallel):
    # fsdp: a plain `palm train --resume` keeps the run's layout, as a sharded group of one;
    # none: the shards load into an unsharded model and the run goes on with safetensors checkpoints.
    run = cut_at(fsdp, tmp_path / "run", 3)
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--parallel", parallel)
    assert code == 0, err
    assert_same_losses(losses(single), losses(run))
    latest = list_checkpoints(run)[-1]
    assert latest.name == "step-0000006" and is_sharded(latest) == (parallel == "fsdp")
    assert (
        json.loads((latest / "state.json").read_text())["tokens"]
        == json.loads((single / "checkpoints" / "step-0000006" / "state.json").read_text())["tokens"]
    )


def test_one_process_checkpoint_resumes_on_two(single, tmp_path):
    run = cut_at(single, tmp_path / "run", 3)
    torchrun("train", "--resume", str(run), "--parallel", "fsdp")
    assert_same_losses(losses(single), losses(run))
    assert not is_sharded(list_checkpoints(run)[-2]) and is_sharded(list_checkpoints(run)[-1])
    assert (run / "final" / "model.safetensors").is_file()


def test_a_failed_sharded_save_keeps_the_last_good_checkpoint(single, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from palm.training import distributed

    real_save = dcp.save

    def crash_after_writing(state, storage_writer):  # the shards are on disk, the metadata is not
        real_save(state, storage_writer=storage_writer)
        (Path(storage_writer.path) / "metadata.json").unlink()
        raise OSError("disk full")

    run = cut_at(single, tmp_path / "run", 3)
    monkeypatch.setattr(dcp, "save", crash_after_writing)
    try:
        code, _, err = run_cli(capsys, "train", "--resume", str(run), "--parallel", "fsdp")
    finally:
        distributed.teardown()  # the failed run left its group of one behind
    assert code != 0 and "disk full" in err
    assert [c.name for c in list_checkpoints(run)] == ["step-0000000", "step-0000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000000", "step-0000003"]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--parallel", "fsdp")
    assert code == 0, err
    assert_same_losses(losses(single), losses(run))


# bf16: each rank computes its rows with bf16 matmuls, so the sums differ from one process's by rounding
# alone. A bf16 loss carries about 3 significant digits; 1% is far below a training step's change.
BF16_REL = 1e-2


@pytest.fixture(scope="module")
def single_bf16(folder, corpus_dir, tokenizer_dir):
    code = run_cli_main(
        ["train", "--config", str(write_config(folder, corpus_dir, tokenizer_dir, "single-bf16", "bf16"))]
    )
    assert code == 0
    return folder / "single-bf16"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_bf16_two_processes_match_one_within_bf16_rounding(
    single_bf16, single, folder, corpus_dir, tokenizer_dir, parallel
):
    conf = write_config(folder, corpus_dir, tokenizer_dir, f"{parallel}-bf16", "bf16")
    torchrun("train", "--config", str(conf), "--parallel", parallel)
    assert_same_losses(losses(single_bf16), losses(folder / f"{parallel}-bf16"), rel=BF16_REL)
    assert_same_losses(losses(single), losses(single_bf16), rel=BF16_REL)  # and bf16 tracks fp32
