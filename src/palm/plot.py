"""Training curves of a run, drawn from RUN/metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError


def read_metrics(run: str | Path) -> list[dict]:
    log = Path(run) / "metrics.jsonl"
    if not log.is_file():
        raise CheckpointError(f"{run} is not a palm run (it has no metrics.jsonl)")
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{log} is corrupt: {e}") from None


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed, or wanted, on a training machine
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run) if "loss" in r and "event" not in r]
    if not records:
        raise CheckpointError(f"{run} has no training steps logged yet")
    out = Path(out) if out else Path(run) / "curves.png"
    fig, (ax_loss, ax_bpb, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["lm_loss"] for r in records], lw=0.8, label="train (cross-entropy)")
    val_names = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("val_loss/")})
    for name in val_names:
        pts = [(r["step"], r[f"val_loss/{name}"]) for r in records if f"val_loss/{name}" in r]
        ax_loss.plot(*zip(*pts), marker="o", ms=3, label=f"val {name}")
        pts = [(r["step"], r[f"val_bpb/{name}"]) for r in records if f"val_bpb/{name}" in r]
        ax_bpb.plot(*zip(*pts), marker="o", ms=3, label=name)
    for event in (r for r in read_metrics(run) if r.get("event") == "loss_spike"):
        ax_loss.axvline(event["spike_step"], color="red", ls=":", lw=1)
    ax_lr.plot(steps, [r["lr"] for r in records])
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate", yscale="log")
    for ax in (ax_loss, ax_bpb):
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
