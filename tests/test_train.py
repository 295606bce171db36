"""Pretraining: exact resume, loss-spike rewind, and the command line's handling of bad input."""

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from palm.training.train import TrainConfig, train

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16)


def config(corpus_dir, tokenizer_dir, tmp_path, name="run", **kw) -> TrainConfig:
    settings = dict(
        corpus=[str(corpus_dir)],
        out=str(tmp_path / name),
        tokenizer=tokenizer_dir,
        model=SMALL,
        max_steps=12,
        seq_len=32,
        batch_size=8,
        checkpoint_every=4,
        eval_every=6,
        eval_tokens=512,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        threads=1,
    )
    return TrainConfig.from_settings({**settings, **kw})


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "event" not in r}


class Killed(Exception):
    pass


def test_resume_after_a_kill_is_bitwise_identical(corpus_dir, tokenizer_dir, tmp_path):
    straight = train(config(corpus_dir, tokenizer_dir, tmp_path, "straight"))

    def kill_at_10(run, record):  # between the checkpoints at steps 8 and 12
        if record["step"] == 10:
            raise Killed

    cfg = config(corpus_dir, tokenizer_dir, tmp_path, "killed")
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_10)
    assert max(losses(tmp_path / "killed")) == 10
    resumed = train(config(corpus_dir, tokenizer_dir, tmp_path, "killed"), resume=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 12
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.step == straight.step == 12


def test_resume_extends_a_finished_run(corpus_dir, tokenizer_dir, tmp_path):
    train(config(corpus_dir, tokenizer_dir, tmp_path, "short", max_steps=8, batch_ramp=False))
    train(config(corpus_dir, tokenizer_dir, tmp_path, "short", max_steps=12, batch_ramp=False), resume=True)
    assert sorted(losses(tmp_path / "short")) == list(range(1, 13))


def test_loss_spike_rewinds_and_skips(corpus_dir, tokenizer_dir, tmp_path):
    cfg = config(corpus_dir, tokenizer_dir, tmp_path, "spiky", poison_batches=[7], spike_window=3, skip_batches=5)
    run = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "spiky" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in lines if r.get("event") == "loss_spike"]
    assert len(events) == 1
    assert events[0]["spike_step"] == 7 and events[0]["rewound_to"] == 4 and events[0]["skipped_batches"] == 5
    assert run.skipped == 5 and run.step == 12
    final = losses(tmp_path / "spiky")
    assert all(v < 50 for v in final.values())  # the poisoned loss (x1000) was never applied or logged
    assert torch.isfinite(torch.tensor(list(final.values()))).all()


def cli(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    return code, err


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "too-small"])
def test_train_rejects_bad_corpora(capsys, tmp_path, tokenizer_dir, case):
    path = tmp_path / f"{case}.txt"
    if case == "empty":
        path.write_text("")
    elif case == "binary":
        path.write_bytes(b"\x00\xff" * 100)
    elif case == "too-small":
        path.write_text("tiny")
    out = tmp_path / "run"
    code, err = cli(
        capsys, "train", "--corpus", str(path), "--out", str(out), "--tokenizer", tokenizer_dir, "--seq-len", "64"
    )
    assert code != 0 and len(err.strip().splitlines()) == 1 and err.startswith("palm: error:"), err
    assert path.name in err
    assert not out.exists()


def test_resume_rejects_a_folder_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, err = cli(capsys, "train", "--resume", str(tmp_path))
    assert code != 0 and "not a palm run" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_existing_run_is_left_untouched(capsys, corpus_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    code, err = cli(capsys, "train", "--corpus", str(corpus_dir), "--out", str(out), "--tokenizer", tokenizer_dir)
    assert code != 0 and "--resume" in err
    assert (out / "run.json").read_text() == "{}" and len(list(out.iterdir())) == 1


def test_config_file_and_plot(capsys, corpus_dir, tokenizer_dir, tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text(
        f'corpus = ["{corpus_dir}"]\nout = "{tmp_path / "r"}"\ntokenizer = "{tokenizer_dir}"\nmax-steps = 3\n'
        f'seq-len = 16\nbatch-size = 4\neval-every = 3\nprogress = false\ncache-dir = "{tmp_path / "c"}"\n'
        "[model]\nhidden_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 2\nhead_dim = 16\n"
    )
    code, _ = cli(capsys, "train", "--config", str(conf))
    assert code == 0
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3]
    assert json.loads((tmp_path / "r" / "final" / "config.json").read_text())["hidden_size"] == 32
    code, _ = cli(capsys, "plot", str(tmp_path / "r"))
    assert code == 0 and (tmp_path / "r" / "curves.png").read_bytes()[:4] == b"\x89PNG"
