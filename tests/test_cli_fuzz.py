"""The command line and the config parser under random input: every run ends with exit 0, or with one
`palm: error:` line and a non-zero exit. Never a traceback, never a changed input file."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Values of every kind a user (or a script gone wrong) can type: numbers at and past the edges of
# their types, non-numbers, empty and odd strings, a lone surrogate as argv decoding leaves it.
NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "x",
            "auto",
            "bf16",
            "fp32",
            "palm",
            "adamw",
            "ddp",
            "fsdp",
            "none",
            "tiny",
            "huge",
            "-1",
            "1e999",
            "nan",
            "\ud800",
            "../",
            "\x00",
        ]
    ),
    st.text(max_size=8),
)
VALUE = st.one_of(NUMBERS.map(str), TEXT)

TRAIN_FLAGS = [
    "--max-steps",
    "--seq-len",
    "--batch-size",
    "--micro-batch-size",
    "--seed",
    "--lr",
    "--hold-steps",
    "--dtype",
    "--optimizer",
    "--parallel",
    "--checkpoint-every",
    "--eval-every",
    "--threads",
    "--preset",
    "--vocab-size",
    "--report-to",
]
GENERATE_FLAGS = ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed", "--stop"]
FIELDS = [
    "max_steps",
    "seq_len",
    "batch_size",
    "seed",
    "lr",
    "hold_steps",
    "dtype",
    "optimizer",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "spike_factor",
    "vocab_size",
    "preset",
    "val_fraction",
    "eval_tokens",
    "grad_clip",
    "z_loss",
    "compile",
    "batch_ramp",
    "report_to",
    "max_stepz",
    "model",
    "loop",
]
YAML_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                ["hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "hiden", "max_steps"]
            ),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=6,
)

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)


def assert_clean_exit(code, err):
    if code == 0:
        return
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("palm: error:"), err
    assert all(line.startswith("palm: ") for line in lines), err  # warnings, then the one error line
    assert sum(line.startswith("palm: error:") for line in lines) == 1, err
    assert "Traceback" not in err


def digest(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_dir):
    root = tmp_path_factory.mktemp("fuzz-corpus")
    for p in sorted(corpus_dir.iterdir())[:6]:
        (root / p.name).write_bytes(p.read_bytes())
    return root


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), VALUE), max_size=4))
def test_train_flags(capsys, tmp_path_factory, small_corpus, tokenizer_dir, flags):
    out = tmp_path_factory.mktemp("run") / "run"
    argv = [
        "train",
        "--corpus",
        str(small_corpus),
        "--out",
        str(out),
        "--tokenizer",
        tokenizer_dir,
        "--max-steps",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--preset",
        "tiny",
    ]
    for flag, value in flags:
        argv += [flag, value]
    before = digest(small_corpus)
    code, _, err = run_cli(capsys, *argv)
    assert_clean_exit(code, err)
    assert digest(small_corpus) == before
    if code != 0:
        assert not out.exists()


@FUZZ
@given(values=st.dictionaries(st.sampled_from(FIELDS), YAML_VALUE, max_size=4))
def test_config_files(capsys, tmp_path_factory, small_corpus, tokenizer_dir, values):
    folder = tmp_path_factory.mktemp("conf")
    base = {
        "corpus": [str(small_corpus)],
        "out": str(folder / "run"),
        "tokenizer": tokenizer_dir,
        "max_steps": 1,
        "seq_len": 16,
        "batch_size": 2,
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16},
    }
    conf = folder / "run.yaml"
    conf.write_text(yaml.safe_dump({**base, **values}))
    code, _, err = run_cli(capsys, "train", "--config", str(conf))
    assert_clean_exit(code, err)


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(GENERATE_FLAGS), VALUE), max_size=3), prompt=TEXT)
def test_generate_flags(capsys, model_dir, flags, prompt):
    argv = ["generate", "--model", model_dir, "--max-new-tokens", "2"]
    for flag, value in flags:
        argv += [flag, value]
    code, _, err = run_cli(capsys, *argv, "--", prompt or "x")
    assert_clean_exit(code, err)


@FUZZ
@given(
    rows=st.lists(
        st.one_of(
            st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}),
            st.dictionaries(st.sampled_from(["prompt", "completion", "x"]), YAML_VALUE, max_size=3),
            YAML_VALUE,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_finetune_data_files(capsys, tmp_path_factory, model_dir, rows):
    folder = tmp_path_factory.mktemp("ft")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(folder / "run"),
        "--steps",
        "1",
        "--batch-size",
        "2",
    )
    assert_clean_exit(code, err)
