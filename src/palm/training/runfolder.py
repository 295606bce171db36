"""Opening a run folder: claiming it for one process (its lock; a new run's folder made, a resumed run's
leftovers of a crash cleared) and reading the settings a run was started with."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass

from ..core.rundir import RunLayout
from . import distributed
from .loop import TrainingError
from .runlock import RunLock

logger = logging.getLogger("palm")


@dataclass
class Claim:
    """Rank 0's hold on a run folder while a run opens: the lock, and whether the folder is new (a new
    run that fails to open leaves nothing behind, so that a retry starts clean)."""

    layout: RunLayout
    lock: RunLock | None
    fresh: bool
    created: bool = False  # the folder itself is ours (else it was there, empty, and stays)

    def abandon(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if not (self.fresh and self.layout.root.is_dir()):
            return
        if self.created:
            shutil.rmtree(self.layout.root, ignore_errors=True)
            return
        for entry in self.layout.root.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def claim(layout: RunLayout, world: distributed.World, resume: bool) -> Claim:
    """Lock the run folder (created if new) on rank 0, after clearing what a crash left half-written."""
    from ..core.atomic import make_dir, remove_stale_temporaries

    if not world.is_main:
        return Claim(layout, None, False)
    exists = layout.root.exists()
    if exists and not layout.root.is_dir():
        raise TrainingError(f"{layout.root} is a file, not a run folder")
    if not resume and exists and any(layout.root.iterdir()):
        raise TrainingError(f"{layout.root} already exists and is not empty; resume it with --resume {layout.root}")
    make_dir(layout.root)
    for inside in (layout.checkpoints, layout.final, layout.best, layout.base, layout.adapter, layout.tokenizer):
        if inside.is_symlink():  # palm writes, rotates and deletes there: only inside the run folder
            raise TrainingError(
                f"{inside} is a symbolic link (to {inside.readlink()}): palm writes and deletes "
                "only inside its run folder; replace the link with a folder"
            )
    lock = RunLock(layout.lock).acquire()
    for folder in (layout.root, layout.checkpoints):
        for gone in remove_stale_temporaries(folder):
            logger.info("removed %s, left half-written by an interrupted run", gone)
    return Claim(layout, lock, fresh=not resume, created=not exists)


def read_settings(layout: RunLayout) -> dict:
    """A run's run.json as a mapping, or a TrainingError in one line."""
    if layout.root.exists() and not layout.root.is_dir():
        raise TrainingError(f"{layout.root} is a file, not a palm run folder")
    try:
        raw = json.loads(layout.settings.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{layout.root} is not a palm run (it has no {layout.settings.name})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TrainingError(f"{layout.settings} is corrupt: {e}") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"{layout.settings} is corrupt: it does not hold a table of settings")
    return raw
