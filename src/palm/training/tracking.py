"""Experiment tracking (`--report-to`): the loop's records, as metrics.jsonl holds them, also in TensorBoard,
Weights & Biases (offline) or MLflow (a local store), through the libraries themselves.

Every record goes to metrics.jsonl first, then to each tracker, at the same step; the run's settings
(run.json) are the hyper-parameters. Everything lives in the run folder (RUN/tensorboard, RUN/wandb,
RUN/mlflow) and nothing needs the network. A resumed run continues its own curve with each step once:
TensorBoard drops what a killed run logged after the checkpoint (purge_step); W&B and MLflow cannot take
a point back, so they keep the run's id in their folder and are not sent a step they already hold (the
values the killed run sent, which an exact resume computes again).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, cast

from ..core.atomic import make_dir, write_text
from ..core.errors import PalmError
from ..core.rundir import RunLayout
from .runlog import MetricsLog

logger = logging.getLogger("palm")

TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL = 'pip install -e ".[tracking]"'
RUN_ID = "palm-run-id"  # in RUN/wandb and RUN/mlflow: the tracker's run that a resumed run goes on with


class TrackingError(PalmError):
    """A `--report-to` that cannot be: an unknown tracker, a library that is not installed, one that fails to open."""


def tracker_names(text: str) -> list[str]:
    """`--report-to`'s value (comma-separated names, or none) as the list LoopConfig.report_to holds."""
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names == ["none"]:
        return []
    check_trackers(names, load=False)
    return names


def check_trackers(names: list[str], load: bool = True) -> None:
    """Each name is a tracker and (with `load`) its library imports: before a run claims its folder, so that
    the same command works once the extra is installed."""
    choices = f"{', '.join(TRACKERS)} or none (comma-separated for several)"
    for name in names:
        if name not in TRACKERS:
            raise TrackingError(f"--report-to must be {choices}, not {name!r}")
        if load:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise TrackingError(
                    f"--report-to {name} needs the {name} package ({e.msg}): {INSTALL} installs it"
                ) from None


def figures(record: dict) -> dict[str, float]:
    """A record's numbers under the names a tracker shows; an event's (a loss spike's) under its own name,
    so that its loss is not a point of the loss curve."""
    prefix = f"{record['event']}/" if "event" in record else ""
    return {
        prefix + key: float(value)
        for key, value in record.items()
        if key not in ("step", "event") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def hyperparameters(config: dict, prefix: str = "") -> dict[str, Any]:
    """run.json's nested settings as flat names (loop.max_steps, model.hidden_size) and scalar values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{prefix}{key}."))
        else:
            plain = value is None or isinstance(value, (list, tuple))
            flat[prefix + key] = json.dumps(value) if plain else value
    return flat


class Tracker(Protocol):
    name: str

    def log(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`)."""

    name = "tensorboard"

    def __init__(self, folder: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        fresh = not any(folder.glob("events.out.tfevents.*"))
        # TensorBoard's readers drop every event at or after purge_step that came before this session's
        # start: what a killed run logged after the checkpoint this run resumes from.
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1)
        self.events = cast(Any, self.writer.file_writer)  # its type says None: it is set in the constructor
        if fresh:  # once per run: the hyper-parameters do not change on resume
            # Here, not in the folder of their own that add_hparams makes: the hparams dashboard then
            # pairs them with this run's curves.
            for summary in hparams(hyperparameters(config), {}):
                self.events.add_summary(summary)

    def log(self, step: int, record: dict) -> None:
        if "rewound_to" in record:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            # A loss spike's rewind trains the steps after the checkpoint again: the mark purge_step
            # writes makes the readers drop the first tries, so the curve is the run's, each step once.
            start = SessionLog(status=SessionLog.START)
            self.events.add_event(Event(step=record["rewound_to"] + 1, session_log=start))
        for tag, value in figures(record).items():
            self.writer.add_scalar(tag, value, step)
        # At every step, as metrics.jsonl: a kill must not lose the steps up to the checkpoint, which a
        # resumed run does not log again.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _kept_id(folder: Path) -> str | None:
    """The id of the tracker's run that this run folder reports to, if it has one."""
    path = folder / RUN_ID
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _keep_id(folder: Path, run_id: str) -> None:
    make_dir(folder)
    write_text(folder / RUN_ID, run_id + "\n")


class WandB:
    """An offline W&B run in RUN/wandb (`wandb sync RUN/wandb/offline-run-*` uploads it); a resumed
    run continues the same run id."""

    name = "wandb"

    def __init__(self, layout: RunLayout, config: dict):
        import wandb

        run_id = _kept_id(layout.wandb)
        self.resumed = run_id is not None
        if run_id is None:  # kept before the run opens, so that a run killed at once is resumed under its id
            run_id = secrets.token_hex(4)
            _keep_id(layout.wandb, run_id)
        self.hook, self.step = sys.excepthook, 0
        self.own_service = "WANDB_SERVICE" not in os.environ  # else a service of the caller's, left running
        settings = wandb.Settings(mode="offline", silent=True, console="off", reinit="create_new")
        # wandb writes under DIR/wandb, which is layout.wandb with DIR the run folder.
        self.run = wandb.init(
            project="palm",
            name=layout.root.name,
            id=run_id,
            resume="allow",
            dir=str(layout.root),
            config=config,
            settings=settings,
        )

    def log(self, step: int, record: dict) -> None:
        # W&B drops what is logged at a step below the last; a rewind's event (at the step rewound to)
        # goes on the last step's row instead.
        self.step = max(self.step, step)
        self.run.log(figures(record), step=self.step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        if self.own_service:
            wandb.teardown()  # ends the wandb-core process this run started, and its WANDB_SERVICE variable
        sys.excepthook = self.hook  # wandb.init's hook reports a crash to the run, which is finished now


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Opening a store prints its table migrations at INFO and SQLAlchemy deprecations; the run's output
    is palm's alone."""
    log = logging.getLogger("mlflow")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


class MLflow:
    """An MLflow run in a SQLite store in RUN/mlflow (`mlflow ui --backend-store-uri
    sqlite:///RUN/mlflow/mlflow.db`). SQLite, not a folder of files: MLflow 3 refuses its file store
    unless an environment variable allows it, and a library does not set the process's environment."""

    name = "mlflow"
    BATCH = 100  # MLflow's limit on params per log_batch call

    def __init__(self, folder: Path, config: dict, run_name: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        make_dir(folder)
        with _quiet_mlflow():
            # A client of its own, not mlflow.set_tracking_uri: that would point the whole process there.
            self.client = MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve()}")
            kept = _kept_id(folder)
            self.run_id = kept or self._create(folder, run_name)
        self.resumed = kept is not None
        if kept:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        params = [Param(k, str(v)) for k, v in hyperparameters(config).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self.BATCH])
        _keep_id(folder, self.run_id)  # last: a run killed before this leaves a stray run, never one half set up

    def _create(self, folder: Path, run_name: str) -> str:
        experiment = self.client.get_experiment_by_name("palm")
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment("palm", artifact_location=(folder / "artifacts").resolve().as_uri())
        )
        return self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), v, now, step) for k, v in figures(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_name(key: str) -> str:
    """`key` as MLflow accepts a name: letters, digits and _-. : between single slashes, no . or .. part
    (it stores names as paths). A corpus given by its path is named by it: val_loss//data/x.jsonl."""
    parts = [re.sub(r"[^\w\-. :]", "_", part) for part in key.split("/") if part]
    return "/".join("_" if part in (".", "..") else part for part in parts)[:250]


class Once:
    """A tracker that cannot take a point back (W&B, MLflow) is sent each step once: not again after a
    rewind replays steps (it keeps the first tries), nor the steps a killed run sent past its checkpoint.
    Events are always sent."""

    def __init__(self, tracker: Tracker, sent_through: int):
        self.tracker, self.sent_through, self.name = tracker, sent_through, tracker.name

    def log(self, step: int, record: dict) -> None:
        if "event" not in record:
            if step <= self.sent_through:
                return
            self.sent_through = step
        self.tracker.log(step, record)

    def close(self) -> None:
        self.tracker.close()


def trackers(
    names: list[str], layout: RunLayout, *, config: dict, start_step: int, sent_through: int | None = None
) -> list[Tracker]:
    """The trackers `names` for a run resuming at `start_step` (0: a new run) whose log held steps up to
    `sent_through` before it was cut back to the checkpoint."""
    opened: list[Tracker] = []
    try:
        for name in names:
            check_trackers([name])
            try:
                if name == "tensorboard":
                    opened.append(TensorBoard(layout.tensorboard, config, start_step))
                else:
                    sink = WandB(layout, config) if name == "wandb" else MLflow(layout.mlflow, config, layout.root.name)
                    # A tracker new to this run holds none of the steps the killed run sent after the checkpoint.
                    held = max(start_step, sent_through or 0) if sink.resumed else start_step
                    opened.append(Once(sink, held))
            except PalmError:
                raise
            except Exception as e:  # noqa: BLE001 - the library's own error, as one line for the user
                raise TrackingError(f"--report-to {name} could not open its run: {str(e).splitlines()[0]}") from None
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


class Records:
    """Where the loop's records go: RUN/metrics.jsonl, cut back to the step the run resumes from, and then
    each tracker. A tracker that fails mid-run is dropped with a warning: a dashboard is not worth a run."""

    def __init__(self, layout: RunLayout, report_to: list[str], start_step: int):
        self.log = MetricsLog(layout.metrics, keep_through=start_step)
        try:
            config = json.loads(layout.settings.read_text(encoding="utf-8")) if layout.settings.is_file() else {}
            self.trackers = trackers(
                report_to, layout, config=config, start_step=start_step, sent_through=self.log.last_step
            )
        except BaseException:
            self.log.close()
            raise

    def write(self, record: dict) -> None:
        self.log.write(record)
        for tracker in list(self.trackers):
            try:
                tracker.log(record["step"], record)
            except Exception as e:  # noqa: BLE001 - any failure of the library stops that tracker alone
                logger.warning("--report-to %s stopped at step %s: %s", tracker.name, record["step"], e)
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.close()

    def close(self) -> None:
        self.log.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001 - the others and metrics.jsonl are closed all the same
                logger.warning("--report-to %s did not close cleanly: %s", tracker.name, e)
