"""Training curves of a run, drawn from RUN/metrics.jsonl.

matplotlib's object API (a Figure and its Agg canvas), not pyplot: pyplot keeps global state and a
process-wide backend, which a library must not choose for its caller.
"""

from __future__ import annotations

from pathlib import Path

from ..core.atomic import atomic_file
from ..core.errors import CheckpointError
from ..core.rundir import RunLayout
from .runlog import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None, skipped: list[int] | None = None) -> Path:
    """Draw the run's curves to `out` (RUN/curves.png); the numbers of metrics.jsonl's lines left out (a torn
    last line) are added to `skipped`, for the caller to tell."""
    from matplotlib.figure import Figure

    layout = RunLayout(Path(run_dir))
    if not layout.metrics.is_file():
        raise CheckpointError(f"{run_dir} is not a palm run (it has no {layout.metrics.name})")
    everything = read_metrics(layout.metrics, skipped=skipped)
    records = [r for r in everything if "loss" in r and "event" not in r]
    if not records:
        raise CheckpointError(f"{run_dir} has no training steps logged yet")
    out = Path(out) if out else layout.curves
    fig = Figure(figsize=(15, 4.2))
    ax_loss, ax_bpb, ax_lr = fig.subplots(1, 3)
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["lm_loss"] for r in records], lw=0.8, label="train (cross-entropy)")
    val_names = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("val_loss/")})
    for name in val_names:
        pts = [(r["step"], r[f"val_loss/{name}"]) for r in records if f"val_loss/{name}" in r]
        ax_loss.plot(*zip(*pts), marker="o", ms=3, label=f"val {name}")
        pts = [(r["step"], r[f"val_bpb/{name}"]) for r in records if f"val_bpb/{name}" in r]
        ax_bpb.plot(*zip(*pts), marker="o", ms=3, label=name)
    fine_tuning = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if fine_tuning:
        ax_loss.plot(*zip(*fine_tuning), marker="o", ms=3, label="val (completions)")
    task_names = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("eval/")})
    for name in task_names:  # fine-tuning with --eval-task: the held-out metrics take the middle panel
        pts = [(r["step"], r[f"eval/{name}"]) for r in records if f"eval/{name}" in r]
        ax_bpb.plot(*zip(*pts), marker="o", ms=3, label=name)
    for event in (r for r in everything if r.get("event") == "loss_spike"):
        ax_loss.axvline(event["spike_step"], color="red", ls=":", lw=1)
    ax_lr.plot(steps, [r["lr"] for r in records])
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    if task_names:
        ax_bpb.set(xlabel="step", ylabel="score", title="held-out task metrics")
    else:
        ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate", yscale="log")
    for ax in (ax_loss, ax_bpb):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return out
