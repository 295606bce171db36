"""The processes that tokenize units: forked workers, each single-threaded, fed at most two units at a time.

Fork rather than spawn on Linux: a worker then starts in milliseconds, without importing torch and
Transformers again. Workers ignore Ctrl-C (it reaches the whole process group; the parent decides
and terminates them), exit when the parent is gone, and send every failure back, where it is raised.
`tokenizers` runs single-threaded in them, and in this process while it tokenizes alone: the
processes are the parallelism, and `--workers 1` means one processor.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Callable, Iterator

from ..core.errors import CorpusError, PalmError
from .shardbuild import Encoder, Job, Task, tokenize_unit


def default_workers() -> int:
    """The processors this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive now kept out of the garbage collector's reach while processes are forked.

    A collection in a forked child writes into the header of every object it visits, which copies every
    page of the parent's heap (torch and Transformers included) into the child: about 100 MiB a worker.
    Frozen objects are never visited; the parent's collector gets them back afterwards. A caller that froze
    its own heap already keeps it as it was: unfreezing would thaw that caller's objects too."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def single_threaded_tokenizers() -> Iterator[None]:
    """`tokenizers` without its own thread pool while this lasts (the processes are the parallelism), and
    for processes forked meanwhile, which then also skip its warning about forking after it ran threads."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _serve(tasks, results, job: Job, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    results.cancel_join_thread()  # a parent killed midway reads nothing more; exit without waiting for it
    encoder = Encoder(job)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed: nobody is left to want the result
                return
            continue
        if task is None:
            return
        try:
            results.put(("done", tokenize_unit(encoder, task)))
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
            message = str(e) if isinstance(e, PalmError) else f"{type(e).__name__}: {e}"
            results.put(("failed", (type(e) if isinstance(e, PalmError) else CorpusError, message)))


class Workers:
    """Tokenizing processes, forked when the first unit needs them (with one worker, or for a single unit,
    units are tokenized in this process)."""

    def __init__(self, job: Job, count: int):
        self.job, self.count = job, max(1, count)
        self.encoder: Encoder | None = None
        self.procs: list = []

    def _start(self) -> None:
        method = "fork" if sys.platform == "linux" else "spawn"  # fork: no re-import of torch and Transformers
        ctx = multiprocessing.get_context(method)
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        with single_threaded_tokenizers(), frozen_heap():
            for _ in range(self.count):
                proc = ctx.Process(target=_serve, args=(self.tasks, self.results, self.job, os.getpid()), daemon=True)  # type: ignore[attr-defined]
                proc.start()
                self.procs.append(proc)

    def run(self, tasks: Iterator[Task], on_done: Callable[[dict], None], many: bool = True) -> None:
        """Tokenize `tasks`, at most two per worker in flight, calling `on_done` as each finishes; in this
        process unless there are several workers and `many` units may come."""
        if not self.procs and (self.count == 1 or not many):
            self.encoder = self.encoder or Encoder(self.job)
            with single_threaded_tokenizers():
                for task in tasks:
                    on_done(tokenize_unit(self.encoder, task))
            return
        in_flight = 0
        for task in tasks:
            if not self.procs:
                self._start()
            while in_flight >= 2 * self.count:
                on_done(self._next())
                in_flight -= 1
            self.tasks.put(task)
            in_flight += 1
        for _ in range(in_flight):
            on_done(self._next())

    def _next(self) -> dict:
        while True:
            try:
                status, value = self.results.get(timeout=1.0)
                break
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise PalmError(
                        f"a tokenizing process died (exit code {dead[0].exitcode}): killed, or out of "
                        "memory? Run again to continue the build, or pass fewer --workers"
                    ) from None
        if status == "failed":
            kind, message = value
            raise kind(message)
        return value

    def close(self) -> None:
        if self.procs:
            self.tasks.cancel_join_thread()  # tasks the killed workers never took must not hold up exit
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join()
        self.procs = []

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self.procs and exc[0] is None:
            for _ in self.procs:
                self.tasks.put(None)
            for proc in self.procs:
                proc.join(timeout=10)
        self.close()
