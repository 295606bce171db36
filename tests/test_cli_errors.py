"""One test per class of bad input the adversarial review found: each gives one `palm: error:` line and a
non-zero exit, never a traceback, and leaves every file the user had as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def user(tmp_path, model_dir, corpus_dir, tokenizer_dir):
    """A folder of things a user has: a model, a corpus, a tokenizer, a data file."""
    root = tmp_path / "user"
    shutil.copytree(model_dir, root / "model")
    shutil.copytree(corpus_dir, root / "corpus")
    shutil.copytree(tokenizer_dir, root / "tok")
    (root / "rows.jsonl").write_text('{"prompt": "2+2", "completion": "4"}\n' * 8)
    return root


def broken_model(root: Path, how: str) -> Path:
    model = root / "model"
    if how == "empty weights":
        (model / "model.safetensors").write_bytes(b"")
    elif how == "truncated weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "config types":
        config = json.loads((model / "config.json").read_text())
        config["hidden_size"] = "sixty-four"
        (model / "config.json").write_text(json.dumps(config))
    elif how == "pickled weights":
        (model / "model.safetensors").unlink()
        (model / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    elif how == "config of another shape":
        config = json.loads((model / "config.json").read_text())
        config["hidden_size"] += 32
        (model / "config.json").write_text(json.dumps(config))
    elif how == "config of fewer layers":
        config = json.loads((model / "config.json").read_text())
        config["num_hidden_layers"] -= 1
        (model / "config.json").write_text(json.dumps(config))
    elif how == "a weight missing":
        from safetensors.torch import load_file, save_file

        tensors = load_file(model / "model.safetensors")
        del tensors[next(k for k in sorted(tensors) if k.endswith("mlp_out.weight"))]
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize(
    "how, words",
    [
        ("empty weights", "safetensors"),
        ("truncated weights", "safetensors"),
        ("config types", "hidden_size"),
        ("pickled weights", "pickled"),
        ("config of another shape", "do not match"),
        ("config of fewer layers", "no place for"),
        ("a weight missing", "mlp_out.weight"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "eval", "finetune"])
def test_a_damaged_model_directory(capsys, user, tmp_path, how, words, command):
    model = broken_model(user, how)
    before = snapshot(user)
    argv = {
        "generate": ["generate", "--model", str(model), "hello"],
        "eval": ["eval", "--model", str(model), "--corpus", str(user / "corpus")],
        "finetune": [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(user / "rows.jsonl"),
            "--out",
            str(tmp_path / "ft"),
        ],
    }[command]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, words)
    assert snapshot(user) == before and not (tmp_path / "ft").exists()


def test_a_config_file_with_wrong_types_or_unknown_keys(capsys, user, tmp_path):
    for body, words in [
        ('max-steps = "ten"\n', "max_steps"),
        ("max_stepz = 10\n", "'max_stepz'"),
        ("[model]\nhiden_size = 32\n", "'hiden_size'"),
        ('[model]\nhidden_size = "x"\n', "hidden_size"),
        ("seed = 18446744073709551616\n", "seed"),
    ]:
        conf = tmp_path / "run.toml"
        conf.write_text(f'corpus = ["{user / "corpus"}"]\nout = "{tmp_path / "run"}"\n{body}')
        code, _, err = run_cli(capsys, "train", "--config", str(conf))
        assert_one_line_error(code, err, words)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["corpus", "finetune data", "task file"])
def test_a_lone_surrogate_in_a_jsonl_file_names_the_file_and_line(capsys, user, tmp_path, where):
    bad = tmp_path / "bad.jsonl"
    field = {"corpus": "text", "finetune data": "prompt", "task file": "prompt"}[where]
    row = {
        "corpus": '{"text": "fine"}',
        "finetune data": '{"prompt": "a", "completion": "b"}',
        "task file": '{"prompt": "a", "answer": "b"}',
    }[where]
    bad.write_text(row + "\n" + '{"' + field + '": "bad \\ud800 here", "completion": "x", "answer": "y"}\n')
    argv = {
        "corpus": ["train", "--corpus", str(bad), "--out", str(tmp_path / "run"), "--tokenizer", str(user / "tok")],
        "finetune data": [
            "finetune",
            "--model",
            str(user / "model"),
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "run"),
        ],
        "task file": ["eval", "--model", str(user / "model"), "--tasks", str(bad)],
    }[where]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"{bad}:2", "surrogate")
    assert not (tmp_path / "run").exists()


def palm_process(*argv, stdin: bytes = b"") -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("palm")
    return subprocess.run([str(script), *argv], input=stdin, capture_output=True, timeout=300)


def test_invalid_utf8_in_argv_and_stdin(user):
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    done = palm_process("generate", "--model", str(user / "model"), b"caf\xe9".decode("utf-8", "surrogateescape"))
    err = done.stderr.decode()
    assert done.returncode != 0 and err.count("\n") == 1 and err.startswith("palm: error:") and "Unicode" in err
    done = palm_process("generate", "--model", str(user / "model"), "-", stdin=b"caf\xe9 au lait")
    err = done.stderr.decode()
    assert done.returncode != 0 and err.count("\n") == 1 and "standard input is not UTF-8" in err


@pytest.mark.parametrize("content", [b"\x00\x01\x02 binary", b"caf\xe9\n"])
def test_a_prompt_file_that_is_not_utf8_text(capsys, user, tmp_path, content):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    code, _, err = run_cli(capsys, "generate", "--model", str(user / "model"), "--file", str(prompts))
    assert_one_line_error(code, err, "prompts.txt")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--eval-every", "0"),
        ("--hold-steps", "0"),
        ("--checkpoint-every", "0"),
        ("--seed", str(2**64)),
        ("--seed", "-1"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--dtype", "fp16"),
        ("--parallel", "tp"),
        ("--threads", "0"),
    ],
)
def test_bad_training_flags_leave_no_run_folder(capsys, user, tmp_path, flag, value):
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--corpus",
        str(user / "corpus"),
        "--out",
        str(run),
        "--tokenizer",
        str(user / "tok"),
        flag,
        value,
    )
    assert_one_line_error(code, err, flag.lstrip("-").split("-")[0])
    assert not run.exists()  # so the same command, corrected, is not refused as "already exists"


def test_outputs_under_a_file_or_in_an_unwritable_place(capsys, user, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile" / "run", Path("/proc/palm-run")):
        code, _, err = run_cli(
            capsys, "train", "--corpus", str(user / "corpus"), "--out", str(out), "--tokenizer", str(user / "tok")
        )
        assert_one_line_error(code, err, str(out))
    code, _, err = run_cli(
        capsys, "tokenizer", "train", "--corpus", str(user / "corpus"), "--out", str(tmp_path / "afile" / "tok")
    )
    assert_one_line_error(code, err, "afile")
    assert (tmp_path / "afile").read_text() == "mine"


def test_resume_on_a_file(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for command in ("train", "finetune"):
        code, _, err = run_cli(capsys, command, "--resume", str(tmp_path / "notes.txt"))
        assert_one_line_error(code, err, "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_finetune_longer_than_the_models_context(capsys, user, tmp_path):
    code, _, err = run_cli(
        capsys,
        "finetune",
        "--model",
        str(user / "model"),
        "--data",
        str(user / "rows.jsonl"),
        "--out",
        str(tmp_path / "ft"),
        "--seq-len",
        "5000",
    )
    assert_one_line_error(code, err, "--seq-len 5000", "context")
    assert not (tmp_path / "ft").exists()


def tiny_train(user: Path, out: Path, steps: int, every: int = 2) -> list[str]:
    """`palm train` of a few steps on the user's corpus and tokenizer, checkpointing every `every` steps."""
    return [
        "train",
        "--corpus",
        str(user / "corpus"),
        "--tokenizer",
        str(user / "tok"),
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--checkpoint-every",
        str(every),
        "--out",
        str(out),
    ]


def test_a_torn_metrics_line_does_not_stop_resume_or_plot(capsys, user, tmp_path):
    run = tmp_path / "run"
    base = tiny_train(user, run, 4)
    code, _, err = run_cli(capsys, *base)
    assert code == 0, err
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a kill mid-write
    code, _, err = run_cli(capsys, "plot", str(run))
    assert code == 0, err
    assert f"palm: warning: {run / 'metrics.jsonl'}:5 is torn" in err  # told, not silently dropped
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "6")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "field, value", [("hidden_size", "256"), ("num_hidden_layers", "six"), ("vocab_size", -5), ("head_dim", [64])]
)
def test_plan_on_a_config_json_with_wrong_types(capsys, tmp_path, field, value):
    """palm plan --config reads a config.json the way palm generate does: a wrong type is one line naming it."""
    config = {
        "model_type": "palm",
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "head_dim": 64,
        "vocab_size": 8192,
        field: value,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "plan", "--config", str(tmp_path), "--seq-len", "128", "--tokens", "1000")
    assert_one_line_error(code, err, field)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_is_bitwise(capsys, user, tmp_path, monkeypatch):
    """The device fills while step 4's checkpoint is written (ENOSPC from safetensors' writer, as a 30 MB
    tmpfs gives it): one line naming the checkpoint and the space it needs, step 2's checkpoint intact and no
    partial folder left; after space is freed, --resume ends with the weights of a run never stopped."""
    import errno

    from palm.training import checkpoint

    def args(out):
        return tiny_train(user, out, 6)

    code, _, err = run_cli(capsys, *args(tmp_path / "straight"))
    assert code == 0, err
    real, calls = checkpoint.save_file, []

    def fill_up(tensors, path, *a, **k):  # the optimizer file of the third checkpoint (steps 0, 2, 4)
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", fill_up)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *args(run))
    assert_one_line_error(code, err, "no space left", "step-0000004", "MB", "step-0000002 is intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000000", "step-0000002"]
    monkeypatch.setattr(checkpoint, "save_file", real)
    code, _, err = run_cli(capsys, "train", "--resume", str(run))
    assert code == 0, err
    final = "final/model.safetensors"
    assert (run / final).read_bytes() == (tmp_path / "straight" / final).read_bytes()


def test_force_replaces_only_what_palm_writes(capsys, user, tmp_path):
    """--out on a user's folder: refused without --force; with it, still refused while the folder holds files
    palm's output would not replace (they are the user's), and then nothing is touched; palm's own earlier
    output is replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    init = ["init", "--preset", "tiny", "--tokenizer", str(user / "tok"), "--out", str(out)]
    code, _, err = run_cli(capsys, *init)
    assert_one_line_error(code, err, "--force")
    code, _, err = run_cli(capsys, *init, "--force")
    assert_one_line_error(code, err, "notes.txt", "only what palm writes")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    code, _, err = run_cli(capsys, *init)
    assert code == 0, err
    code, _, err = run_cli(capsys, *init, "--seed", "1", "--force")  # its own earlier output: replaced
    assert code == 0, err


def test_symlinks_in_a_run_are_not_followed_out_of_it(capsys, user, tmp_path):
    """A run whose checkpoints/ links out of it is refused on --resume (palm rotates checkpoints there), and
    an old checkpoint that is a link is unlinked by rotation, never what it points to."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny_train(user, run, 2, every=1))
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "checkpoints" / "step-0000000", elsewhere)
    (run / "checkpoints" / "step-0000000").symlink_to(elsewhere)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "5")
    assert code == 0, err
    assert (elsewhere / "state.json").is_file()  # rotated away as a link: the folder it named is intact
    assert not (run / "checkpoints" / "step-0000000").exists()
    moved = tmp_path / "moved"
    shutil.move(run / "checkpoints", moved)
    (run / "checkpoints").symlink_to(moved)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "7")
    assert_one_line_error(code, err, "symbolic link")
    assert sorted(p.name for p in moved.iterdir()) == sorted(
        p.name for p in moved.iterdir() if p.name.startswith("step")
    )
