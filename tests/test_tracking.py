"""palm.training.tracking: `--report-to tensorboard|wandb|mlflow` on `palm train` and `palm finetune`. Each
tracker is read back with its own library (TensorBoard's EventAccumulator, an MlflowClient, W&B's offline
run files) and must hold the figures of metrics.jsonl at the same steps, each step once, also after a run
was killed past its last checkpoint and resumed."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from test_cli_errors import tiny_train

from palm.core.rundir import RunLayout
from palm.training.runlog import read_metrics
from palm.training.tracking import INSTALL, TRACKERS, Once, TrackingError, figures, tracker_names, trackers

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture
def user(tmp_path, corpus_dir, tokenizer_dir) -> Path:
    """The layout tiny_train expects: a corpus and a tokenizer (links, not copies: nothing here writes them)."""
    (tmp_path / "corpus").symlink_to(corpus_dir)
    (tmp_path / "tok").symlink_to(tokenizer_dir)
    return tmp_path


def numbers(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's figures per name: [(step, value)], in the log's order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


TIMED = ("tokens_per_s", "mfu")  # what a step took: the stopped run's steps 5 and 6 took other times


def same_figures(logged: dict[str, list[tuple[int, float]]], records: list[dict]) -> None:
    """`logged` holds metrics.jsonl's figures at the same steps: each value exactly, but for the timings
    of the steps an append-only tracker kept from the run that was stopped."""
    expected = numbers(records)
    assert sorted(logged) == sorted(expected)
    for name, series in expected.items():
        if name in TIMED:
            assert [step for step, _ in logged[name]] == [step for step, _ in series], name
        else:
            assert logged[name] == series, name


def as_float32(series: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, float(np.float32(value))) for step, value in series]  # TensorBoard keeps scalars as float32


def tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()  # 0: every point, not a sample


# ---- the acceptance check: a run killed with SIGKILL, then resumed --------------------------------------

# `palm train` as the CLI runs it, killed with SIGKILL right after step 6's record reached every sink: two
# steps past its checkpoint at step 4, which the resumed run computes and logs again.
KILLED_AFTER_STEP_6 = """
import os, runpy, signal, sys
from palm.training import tracking
real = tracking.Records.write
def write(self, record):
    real(self, record)
    if record["step"] == 6 and "event" not in record:
        os.kill(os.getpid(), signal.SIGKILL)
tracking.Records.write = write
sys.argv = ["palm", *sys.argv[1:]]
runpy.run_module("palm.cli", run_name="__main__")
"""


def test_a_killed_and_resumed_run_has_the_tensorboard_curve_of_its_metrics_log(capsys, user, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = tmp_path / "run"
    argv = [*tiny_train(user, run, 8, every=4), "--micro-batch-size", "2", "--eval-every", "3", "--threads", "1"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_STEP_6, *argv, "--report-to", "tensorboard"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (first,) = (run / "tensorboard").glob("events.out.tfevents.*")
    logged = [e.step for e in EventFileLoader(str(first)).Load() if any(v.tag == "loss" for v in e.summary.value)]
    assert logged == [1, 2, 3, 4, 5, 6]  # the killed run's steps 5 and 6 are in its event file
    # TensorBoard reads a folder's event files in name order, which begins with the second each was opened
    # in: a resumed run's file opened in the killed run's second (on a fast machine) could sort first.
    time.sleep(max(0.0, int(first.name.split(".")[3]) + 1 - time.time()))

    code, _, err = run_cli(capsys, "train", "--resume", str(run))
    assert code == 0, err
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    board, expected = tensorboard(run / "tensorboard"), numbers(records)
    assert sorted(board.Tags()["scalars"]) == sorted(expected)  # every figure, eval ones included, and no other
    for name, series in expected.items():
        assert [(e.step, e.value) for e in board.Scalars(name)] == as_float32(series), name
    assert [e.step for e in board.Scalars("loss")] == list(range(1, 9))  # steps 5 and 6 once: the resumed run's
    start = HParamsPluginData.FromString(board.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["loop.max_steps"].number_value == 8 and hparams["seq_len"].number_value == 16


# ---- W&B (offline) and MLflow (a local store): a run stopped past its checkpoint, then resumed -----------


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    """A run reporting to W&B and MLflow, stopped after step 6 (its checkpoint is step 4's) and resumed
    by `palm train --resume`."""
    from palm.cli import main
    from palm.training.train import TrainConfig, train

    run = tmp_path_factory.mktemp("tracked") / "run"
    settings = dict(
        corpus=[str(corpus_dir)],
        tokenizer=tokenizer_dir,
        out=str(run),
        seq_len=16,
        batch_size=4,
        max_steps=8,
        checkpoint_every=4,
        eval_every=3,
        threads=1,
        progress=False,
        report_to=["wandb", "mlflow"],
    )

    def stop_after_6(_, record):
        if record["step"] == 6:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig.from_settings(settings), on_step=stop_after_6)
    with pytest.raises(SystemExit) as done:
        main(["train", "--resume", str(run)])
        raise SystemExit(0)
    assert done.value.code == 0
    return run


def wandb_records(path: Path):
    """The records of a W&B run file (`run-ID.wandb`): LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header) after W&B's own 7-byte header, each record a wandb_internal_pb2.Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            yield Record.FromString(pending)
            pending = b""


def test_wandb_offline_holds_the_metrics_log_each_step_once_in_one_run(stopped_and_resumed):
    run = stopped_and_resumed
    kept = (run / "wandb" / "palm-run-id").read_text().strip()
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert [f.name for f in files] == [f"run-{kept}.wandb"] * 2  # the stopped run and its resumption: one id
    history, config = [], {}
    for f in files:
        for record in wandb_records(f):
            if record.HasField("history"):
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.append({k: v for k, v in item.items() if not k.startswith("_")} | {"step": item["_step"]})
            elif record.HasField("run"):
                assert record.run.run_id == kept
                config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
    records = read_metrics(run / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 9))  # 5 and 6 once, though the resumed run computed them
    same_figures(numbers(history), records)
    assert config["loop"]["max_steps"] == 8 and config["seq_len"] == 16 and config["loop"]["report_to"]


def test_mlflow_holds_the_metrics_log_each_step_once_in_one_run(stopped_and_resumed):
    from mlflow.tracking import MlflowClient

    run = stopped_and_resumed
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (found,) = client.search_runs(experiments)  # one run, in the experiment "palm"
    assert client.get_experiment(found.info.experiment_id).name == "palm"
    assert found.info.run_id == (run / "mlflow" / "palm-run-id").read_text().strip()
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    logged = {
        # MLflow stores names as paths, so the corpus's path in val_loss//tmp/... loses its double slash
        "/".join(filter(None, name.split("/"))): sorted(
            (m.step, m.value) for m in client.get_metric_history(found.info.run_id, name)
        )
        for name in found.data.metrics
    }
    assert [step for step, _ in logged["loss"]] == list(range(1, 9))
    records = read_metrics(run / "metrics.jsonl")
    same_figures(logged, [{"/".join(filter(None, k.split("/"))): v for k, v in r.items()} for r in records])
    params = found.data.params
    assert params["loop.max_steps"] == "8" and params["seq_len"] == "16" and params["preset"] == "tiny"


def test_a_rewind_after_a_loss_spike_leaves_each_step_once_in_every_tracker(tmp_path, corpus_dir, tokenizer_dir):
    """Batch 6 is poisoned: step 6 spikes, the run rewinds to step 4's checkpoint and trains steps 5 to 8
    again on later batches. metrics.jsonl holds both tries of step 5; TensorBoard's curve is the run's
    (the second tries), W&B and MLflow keep the first try of a step they were sent; each shows the spike."""
    from mlflow.tracking import MlflowClient

    from palm.training.train import TrainConfig, train

    run = tmp_path / "run"
    settings = dict(corpus=[str(corpus_dir)], tokenizer=tokenizer_dir, out=str(run), seq_len=16, batch_size=4)
    loop = dict(max_steps=8, checkpoint_every=4, eval_every=100, spike_window=2, poison_batches=[6], threads=1)
    train(TrainConfig.from_settings({**settings, **loop, "progress": False, "report_to": list(TRACKERS)}))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8] and records[5]["event"] == "loss_spike"
    steps = [r for r in records if "event" not in r]
    last = {r["step"]: r["loss"] for r in steps}  # the second try of step 5 replaces the first
    first = {r["step"]: r["loss"] for r in reversed(steps)}
    assert last[5] != first[5]

    board = tensorboard(run / "tensorboard")
    assert [(e.step, e.value) for e in board.Scalars("loss")] == as_float32(sorted(last.items()))
    assert [(e.step, e.value) for e in board.Scalars("loss_spike/loss")] == as_float32([(4, records[5]["loss"])])

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    run_id = (run / "mlflow" / "palm-run-id").read_text().strip()
    history = lambda name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))  # noqa: E731
    assert history("loss") == sorted(first.items())
    assert history("loss_spike/loss") == [(4, records[5]["loss"])]

    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    sent = []
    for record in wandb_records(wandb_file):
        if record.HasField("history"):
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            sent.append((item["_step"], item.get("loss"), item.get("loss_spike/loss")))
    spike = {5: records[5]["loss"]}  # W&B takes no step below its last: the spike is on step 5's row
    assert sent == [(s, first[s], spike.get(s)) for s in range(1, 9)]


# ---- palm finetune --------------------------------------------------------------------------------------


def test_finetune_reports_its_records_too(capsys, tmp_path, model_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n" for i in range(24)))
    run = tmp_path / "ft"
    code, _, err = run_cli(
        capsys,
        *("finetune", "--model", model_dir, "--data", str(rows), "--out", str(run), "--steps", "4"),
        *("--batch-size", "4", "--eval-every", "2", "--threads", "1", "--report-to", "tensorboard"),
    )
    assert code == 0, err
    board, expected = tensorboard(run / "tensorboard"), numbers(read_metrics(run / "metrics.jsonl"))
    assert sorted(board.Tags()["scalars"]) == sorted(expected) and "val_loss" in expected
    for name, series in expected.items():
        assert [(e.step, e.value) for e in board.Scalars(name)] == as_float32(series), name


# ---- what is refused, in one line -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_an_unknown_tracker_is_one_line_naming_the_flag(capsys, user, tmp_path, model_dir, command):
    run = tmp_path / "run"
    argv = (
        tiny_train(user, run, 2)
        if command == "train"
        else ["finetune", "--model", model_dir, "--data", str(tmp_path / "rows.jsonl"), "--out", str(run)]
    )
    code, _, err = run_cli(capsys, *argv, "--report-to", "tensorboard,bogus")
    assert_one_line_error(code, err, "--report-to", "'bogus'", "tensorboard, wandb, mlflow or none")
    assert not run.exists()


@pytest.mark.parametrize("name", TRACKERS)
def test_a_missing_library_is_one_line_naming_the_extra(capsys, user, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # what `import NAME` meets where the package is not installed
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *tiny_train(user, run, 2), "--report-to", name)
    assert_one_line_error(code, err, f"--report-to {name}", INSTALL)
    assert not run.exists()  # refused before the run folder was made: the same command works once installed


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_the_help_shows_the_flag(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "--report-to" in out


# ---- the pieces -----------------------------------------------------------------------------------------


def test_a_tracker_new_to_a_resumed_run_is_sent_the_steps_past_the_checkpoint(tmp_path):
    """A run killed at step 6 resumes from step 4: MLflow, which the killed run did not report to, gets
    steps 5 and 6; once it holds the run, the next kill's steps past the checkpoint are not sent again."""
    layout = RunLayout(tmp_path / "run")
    for held in (4, 6):
        (opened,) = trackers(["mlflow"], layout, config={"seed": 0}, start_step=4, sent_through=6)
        opened.close()
        assert isinstance(opened, Once) and opened.sent_through == held


def test_tracker_names():
    assert tracker_names("none") == []
    assert tracker_names(" TensorBoard, wandb,tensorboard ") == ["tensorboard", "wandb"]
    for bad in ("none,wandb", "tensorboard;wandb", "comet"):
        with pytest.raises(TrackingError, match="--report-to must be"):
            tracker_names(bad)


def test_a_spike_is_its_own_series_and_an_append_only_tracker_gets_each_step_once():
    spike = {"step": 4, "event": "loss_spike", "spike_step": 9, "loss": 80.0, "rewound_to": 4, "skipped_batches": 20}
    assert figures(spike) == {
        "loss_spike/spike_step": 9.0,
        "loss_spike/loss": 80.0,
        "loss_spike/rewound_to": 4.0,
        "loss_spike/skipped_batches": 20.0,
    }
    assert figures({"step": 1, "loss": 2.5, "mfu_datasheet": None, "flag": True}) == {"loss": 2.5}

    class Sink:
        name, sent = "sink", []

        def log(self, step, record):
            self.sent.append((step, record.get("event")))

        def close(self):
            pass

    sink = Sink()
    once = Once(sink, sent_through=2)  # a killed run had sent steps 1 and 2
    for record in [{"step": s} for s in (1, 2, 3, 4, 5)] + [spike] + [{"step": s} for s in (5, 6)]:
        once.log(record["step"], record)
    assert sink.sent == [(3, None), (4, None), (5, None), (4, "loss_spike"), (6, None)]
