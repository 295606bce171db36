"""The `palm` command line: what a user sees on good and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from conftest import run_cli as palm
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tokenizer_train_writes_an_auto_tokenizer(capsys, corpus_dir, tmp_path):
    out = tmp_path / "tok"
    code, stdout, _ = palm(
        capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "600", "--out", str(out)
    )
    assert code == 0 and "600-token" in stdout
    assert len(AutoTokenizer.from_pretrained(out)) == 600


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "bad-jsonl", "empty-folder"])
def test_tokenizer_train_rejects_bad_corpora(capsys, tmp_path, case):
    path = tmp_path / case
    if case == "empty":
        path.write_text("")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "bad-jsonl":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    elif case == "empty-folder":
        path.mkdir()
    out = tmp_path / "out"
    code, _, err = palm(capsys, "tokenizer", "train", "--corpus", str(path), "--out", str(out))
    assert_one_line_error(code, err, path.name)
    assert not out.exists()


def test_tokenizer_train_rejects_tiny_vocab(capsys, corpus_dir, tmp_path):
    code, _, err = palm(
        capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "10", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "vocab size 10")


def test_bad_flag_value_is_one_line(capsys, corpus_dir, tmp_path):
    code, _, err = palm(
        capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "many", "--out", str(tmp_path)
    )
    assert_one_line_error(code, err, "--vocab-size")


def test_existing_output_is_kept(capsys, corpus_dir, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = palm(
        capsys, "tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "600", "--out", str(out)
    )
    assert_one_line_error(code, err, "--force")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_init_writes_a_loadable_model(capsys, tokenizer_dir, tmp_path):
    out = tmp_path / "model"
    code, stdout, _ = palm(capsys, "init", "--preset", "tiny", "--tokenizer", tokenizer_dir, "--out", str(out))
    assert code == 0 and "tiny" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 1024 and model.config.num_key_value_heads == 1
    assert model.generation_config.eos_token_id == [2, 4]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--preset", "huge"], ["unknown preset"]),
        (["--preset", "palm-540b"], ["too large"]),
        (["--preset", "tiny", "--tokenizer", "/nonexistent"], ["tokenizer.json"]),
    ],
)
def test_init_errors(capsys, tokenizer_dir, tmp_path, argv, words):
    argv = ["--tokenizer", tokenizer_dir, *argv] if "--tokenizer" not in argv else argv
    code, _, err = palm(capsys, "init", *argv, "--out", str(tmp_path / "m"))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "m").exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("palm")
    done = subprocess.run(
        [str(script), "tokenizer", "train", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert done.returncode == 1
    assert done.stderr.strip() == f"palm: error: corpus path {tmp_path / 'nope.txt'} does not exist"
