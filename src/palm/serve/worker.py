"""The one thread that touches the model, and the dispatcher that feeds it.

The model is not thread-safe, so every generation runs on ONE worker thread. A dispatcher task feeds
it: non-streaming requests that wait while the model is busy and share the same sampling settings
are decoded together in one left-padded batch (at most `max_batch` rows); a streaming request is
decoded alone and its text deltas travel to the response through an asyncio queue as soon as they
are produced.

What request handling relies on is the small `GenerationJob` interface, whatever the worker does
inside (a later worker batches continuously): `submit` refuses a job once `max_queue` jobs wait
(QueueFull), and `GenerationJob.cancel` stops a job at its next token, or before it starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..generate import Completion, Generator, SamplingConfig
from .decoding import Row

logger = logging.getLogger("uvicorn.error")


class WorkerNotRunning(RuntimeError):
    """A job was submitted outside the server's lifespan (before start or after stop)."""


class QueueFull(RuntimeError):
    """As many jobs as the server allows already wait for the model."""


@dataclass(eq=False)
class GenerationJob:
    """One request's generation: a whole completion (`future`) or a stream of events (`events`).

    A stream's events: ("delta", str), then ("done", Completion) or ("error", exception); or
    ("cancelled", None) once the job is cancelled. `submit` creates the future or the queue.
    """

    prompt_ids: list[int]
    cfg: SamplingConfig
    streamed: bool = False
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # read by the worker thread
    tokens: int = 0  # tokens decoded for this job: what it cost the model, whether or not anyone read them

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Stop this job at its next token, or before it starts. Call it on the event loop's thread."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self.future is not None and not self.future.done():
            self.future.cancel()
        if self.events is not None:
            self.events.put_nowait(("cancelled", None))  # wakes a stream waiting for its next delta


class GenerationWorker:
    """Owns the one thread that touches the model, and batches what waits for it."""

    def __init__(self, generator: Generator, max_batch: int = 8, max_queue: int = 64):
        self.generator = generator
        self.max_batch = max(1, max_batch)
        self.max_queue = max(1, max_queue)
        self.batch_sizes: deque[int] = deque(maxlen=1024)  # the latest batches' sizes, for monitoring and tests
        self.decode_steps = 0  # model steps run, one token per row each: the work done, for monitoring and tests
        self.running: list[GenerationJob] = []  # the jobs on the model now
        self._pending: deque[GenerationJob] = deque()
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Requests queued and not yet handed to the model (cancelled ones do not count)."""
        return sum(not job.cancelled.is_set() for job in self._pending)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="palm-generate")
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        for job in [*self.running, *self._pending]:
            job.cancel()  # a decode in flight ends at its next token, so the thread can exit
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._wakeup = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: GenerationJob) -> None:
        """Queue `job`; QueueFull at once when `max_queue` jobs are waiting (checked here, not later, so that
        a flood of requests costs the server a list of bounded length, and each client learns at once)."""
        if self._wakeup is None:
            raise WorkerNotRunning("the generation worker is not running")
        self._pending = deque(j for j in self._pending if not j.cancelled.is_set())  # the abandoned give way
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests are waiting for the model")
        if job.streamed:
            job.events = asyncio.Queue()
        else:
            job.future = asyncio.get_running_loop().create_future()
        self._pending.append(job)
        self._wakeup.set()

    def _batch_key(self, job: GenerationJob) -> tuple | None:
        """Jobs with equal keys decode together and get exactly what each would get alone."""
        c = job.cfg
        if job.streamed:
            return None
        if c.temperature > 0 and c.seed is not None:
            return None  # a seeded sample must not depend on which requests share its batch
        if job.prompt_tokens + c.max_new_tokens > self.generator.context:
            return None  # a long row would shorten every other row's budget
        return (c.max_new_tokens, c.temperature, c.top_k, c.top_p, c.repetition_penalty, tuple(c.stop))

    def _take_batch(self, job: GenerationJob) -> list[GenerationJob]:
        """`job` and the waiting jobs that decode with it, taken out of the pending queue."""
        batch = [job]
        key = self._batch_key(job)
        if key is None:
            return batch
        rest: deque[GenerationJob] = deque()
        for other in self._pending:
            if len(batch) < self.max_batch and not other.cancelled.is_set() and self._batch_key(other) == key:
                batch.append(other)
            else:
                rest.append(other)
        self._pending = rest
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                assert self._wakeup is not None
                self._wakeup.clear()
                await self._wakeup.wait()
            # Everything that arrived while the model was busy is a candidate for the next batch.
            job = self._pending.popleft()
            if job.cancelled.is_set():
                continue  # its client left while it waited: it never starts
            batch = self._take_batch(job)
            self.running = batch
            try:
                results = await loop.run_in_executor(self._executor, self._run, batch, loop)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving whatever one request did
                logger.exception("generation worker failed")
                results = [e] * len(batch)
            finally:
                self.running = []
            for j, result in zip(batch, results):
                _settle(j, result)

    # The methods below run on the worker thread.

    def _run(self, batch: list[GenerationJob], loop: asyncio.AbstractEventLoop) -> list[Completion | BaseException]:
        self.batch_sizes.append(len(batch))
        try:
            return self._decode(batch, loop)
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                return [e]
        results: list[Completion | BaseException] = []
        for j in batch:  # one bad row must not fail its neighbours
            try:
                results.extend(self._decode([j], loop))
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return results

    def _decode(self, batch: list[GenerationJob], loop: asyncio.AbstractEventLoop) -> list[Completion]:
        rows = [Row(self.generator, j.cfg.stop, j.streamed) for j in batch]
        steps = self.generator.token_stream([j.prompt_ids for j in batch], batch[0].cfg)
        try:
            for token in steps:
                self.decode_steps += 1
                for job, row, t in zip(batch, rows, token.tolist()):
                    if row.finish is None and not job.cancelled.is_set():
                        job.tokens += 1
                        _send(job, loop, row.feed(t))
                if all(row.finish is not None or job.cancelled.is_set() for job, row in zip(batch, rows)):
                    break  # every row is done or abandoned: not one more step for anyone
        finally:
            steps.close()
        for job, row in zip(batch, rows):
            _send(job, loop, row.close())
        return [row.completion(j.prompt_tokens) for j, row in zip(batch, rows)]


def _send(job: GenerationJob, loop: asyncio.AbstractEventLoop, piece: str) -> None:
    """Hand a stream's new text to its response (from the worker thread)."""
    if not (piece and job.streamed and not job.cancelled.is_set()):
        return
    try:
        loop.call_soon_threadsafe(job.events.put_nowait, ("delta", piece))
    except RuntimeError:  # the event loop has closed: the server is going away
        job.cancelled.set()


def _settle(job: GenerationJob, result: Completion | BaseException) -> None:
    """Deliver a job's end (on the event loop's thread); a cancelled job's reader is gone."""
    if job.cancelled.is_set():
        return
    failed = isinstance(result, BaseException)
    if job.streamed:
        job.events.put_nowait(("error" if failed else "done", result))
    elif job.future.done():
        return
    elif failed:
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
