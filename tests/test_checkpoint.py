"""Training checkpoints under faults and hostile files: nothing is unpickled, crashes leave nothing
behind, retention goes by step number, a corrupt checkpoint is passed over, one process per run,
and a resume refuses data that changed."""

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from test_finetune import settings as finetune_settings
from test_train import config, losses

from palm.core.rundir import RunLayout, checkpoint_step
from palm.training.checkpoint import list_checkpoints, save_training_checkpoint
from palm.training.runlock import RunLock


class WritesAFile:
    """Unpickling this creates `path`: the proof that a loader ran code from a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(checkpoint, canary, fmt):
    """Make `checkpoint` look sharded, with a `.metadata` pickle that would create `canary`."""
    shards = checkpoint / "shards"
    shards.mkdir()
    (shards / ".metadata").write_bytes(pickle.dumps(WritesAFile(canary)))
    state = json.loads((checkpoint / "state.json").read_text())
    if fmt is None:
        state.pop("format", None)
    else:
        state["format"] = fmt
    (checkpoint / "state.json").write_text(json.dumps(state))


@pytest.fixture(scope="module")
def trained(corpus_dir, tokenizer_dir, tmp_path_factory):
    from palm.training.train import train

    tmp = tmp_path_factory.mktemp("trained")
    train(config(corpus_dir, tokenizer_dir, tmp, "run"))
    return tmp / "run"


def copy_run(trained, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(trained, out)
    return out


@pytest.mark.parametrize("fmt", ["dcp", "sharded", None])
def test_a_crafted_sharded_checkpoint_runs_no_code_on_resume(capsys, trained, tmp_path, fmt):
    run = copy_run(trained, tmp_path)
    canary = tmp_path / "pwned"
    newest = list_checkpoints(run)[-1]
    if fmt is None:
        (newest / "model.safetensors").unlink()  # only the shards are there to be read
    plant_pickle(newest, canary, fmt)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "14")
    assert not canary.exists()
    assert code == 0, err  # the crafted one is reported and passed over; the run goes on from the one before
    assert "falling back" in err and str(newest) in err


def test_a_crafted_checkpoint_runs_no_code_on_finetune_resume(capsys, model_dir, tmp_path):
    from palm.training.finetune import finetune

    cfg = finetune_settings(tmp_path, model_dir, "ft", max_steps=4)
    finetune(cfg)
    canary = tmp_path / "pwned"
    for checkpoint in list_checkpoints(tmp_path / "ft"):
        plant_pickle(checkpoint, canary, "dcp")
    code, _, err = run_cli(capsys, "finetune", "--resume", str(tmp_path / "ft"), "--steps", "6")
    assert not canary.exists()
    assert code != 0 and "can run code" in err and "no intact checkpoint" in err.splitlines()[-1]


def test_a_kill_mid_save_leaves_no_temporary_folder_after_the_next_start(capsys, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    layout = RunLayout(run)
    # what `kill -9` during a save leaves: the temporary folders of atomic writes, half full
    (layout.checkpoints / ".step-0000016.tmp-abc123").mkdir()
    (layout.checkpoints / ".step-0000016.tmp-abc123" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / ".final.tmp-xyz").mkdir()
    (run / ".run.json.tmp-q").write_text("{")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "13")
    assert code == 0, err
    leftovers = [p.name for p in [*run.iterdir(), *layout.checkpoints.iterdir()] if ".tmp-" in p.name]
    assert leftovers == []


def test_retention_keeps_the_newest_step_number_not_the_last_name(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    layout = RunLayout(tmp_path)
    state = {"skipped": 0, "recent": [], "rewinds": 0, "tokens": 0}
    save_training_checkpoint(layout, 9_999_900, model, optimizer, state, keep=1)
    save_training_checkpoint(layout, 10_000_000, model, optimizer, state, keep=1)
    assert [checkpoint_step(p) for p in list_checkpoints(layout)] == [10_000_000]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(capsys, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    *_, before, newest = list_checkpoints(run)
    (newest / "model.safetensors").write_bytes(b"truncated")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "14")
    assert code == 0, err
    assert "falling back" in err and newest.name in err
    # it went on from `before` (step 8): steps 9..14 are logged once each, the corrupt one rewritten
    assert sorted(losses(run)) == list(range(1, 15))
    assert checkpoint_step(before) == 8


def test_a_state_json_missing_a_key_is_corrupt_and_passed_over(capsys, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    newest = list_checkpoints(run)[-1]
    state = json.loads((newest / "state.json").read_text())
    del state["skipped"]
    (newest / "state.json").write_text(json.dumps(state))
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "13")
    assert code == 0 and "incomplete or corrupt" in err


def test_a_second_process_on_a_running_run_refuses(capsys, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    with RunLock(RunLayout(run).lock):  # as a training process holds it
        code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "14")
    assert_one_line_error(code, err, "another process", f"pid {os.getpid()}")
    assert sorted(p.name for p in run.iterdir()) == before
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "13")
    assert code == 0, err  # the lock went with its holder


def test_a_changed_corpus_is_refused_unless_allowed(capsys, corpus_dir, tokenizer_dir, tmp_path):
    from palm.training.train import train

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    train(config(corpus, tokenizer_dir, tmp_path, "run", max_steps=4))
    with open(next(corpus.iterdir()), "a", encoding="utf-8") as f:
        f.write(" and one more sentence.")
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "run"), "--max-steps", "6")
    assert_one_line_error(code, err, "changed since the run started", "--allow-data-change")
    assert max(losses(tmp_path / "run")) == 4
    code, _, err = run_cli(
        capsys, "train", "--resume", str(tmp_path / "run"), "--max-steps", "6", "--allow-data-change"
    )
    assert code == 0 and "will not be exact" in err
    assert max(losses(tmp_path / "run")) == 6


# `palm train` as the CLI runs it, but killed with SIGKILL in the middle of writing step 8's checkpoint:
# the weights are on disk, the optimizer state half written, and then the process is gone at once.
KILLED_DURING_SAVE = """
import os, runpy, signal, sys
from palm.training import checkpoint
real = checkpoint.save_file
def dying(tensors, filename, metadata=None):
    real(tensors, filename, metadata)
    if "step-0000008" in str(filename):
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = dying
sys.argv = ["palm", *sys.argv[1:]]
runpy.run_module("palm.cli", run_name="__main__")
"""


def test_kill_9_during_a_checkpoint_write_then_resume_is_the_run_never_stopped(corpus_dir, tokenizer_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = [
        "train",
        "--corpus",
        str(corpus_dir),
        "--tokenizer",
        tokenizer_dir,
        "--preset",
        "tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "12",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "6",
        "--dtype",
        "fp32",
        "--threads",
        "1",
    ]

    def palm(*argv, script=None):
        cmd = [sys.executable, *(["-c", script] if script else ["-m", "palm.cli"]), *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert palm(*args, "--out", str(straight)).returncode == 0
    done = palm(*args, "--out", str(killed), script=KILLED_DURING_SAVE)
    assert done.returncode == -signal.SIGKILL, done.stderr
    half = list((killed / "checkpoints").glob(".step-0000008.tmp-*"))
    assert half and (half[0] / "model.safetensors").is_file()  # the kill came mid-save
    assert [checkpoint_step(p) for p in list_checkpoints(killed)] == [0, 4]
    resumed = palm("train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(killed) == losses(straight) and sorted(losses(killed)) == list(range(1, 13))
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((killed / "checkpoints").glob(".*.tmp-*"))
