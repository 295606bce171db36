"""The one thread that touches the model, and the dispatcher that feeds it.

The model is not thread-safe, so every generation runs on ONE worker thread. A dispatcher task feeds
it: non-streaming requests that arrive while the model is busy and share the same sampling settings
are decoded together in one left-padded `Generator.generate` batch (at most `max_batch` rows); a
streaming request runs `Generator.stream` alone on that thread and its text deltas travel to the
response through an asyncio queue as soon as they are produced.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..generate import Completion, Generator, SamplingConfig

logger = logging.getLogger("uvicorn.error")


class WorkerNotRunning(RuntimeError):
    """A job was submitted outside the server's lifespan (before start or after stop)."""


@dataclass
class GenerationJob:
    """One request's generation: a whole completion (`future`) or a stream of text deltas (`events`)."""

    prompt: str
    cfg: SamplingConfig
    prompt_tokens: int
    future: asyncio.Future | None = None  # a whole completion
    events: asyncio.Queue | None = None  # a stream: ("delta", str), ("done", stats) or ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationWorker:
    """Owns the one thread that touches the model, and batches what waits for it."""

    def __init__(self, generator: Generator, max_batch: int = 8):
        self.generator = generator
        self.max_batch = max(1, max_batch)
        self.batch_sizes: list[int] = []  # one entry per generate() call, for monitoring and tests
        self._queue: asyncio.Queue[GenerationJob] | None = None
        self._pending: deque[GenerationJob] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Requests queued and not yet handed to the model."""
        return len(self._pending) + (self._queue.qsize() if self._queue is not None else 0)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="palm-generate")
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: GenerationJob) -> None:
        if self._queue is None:
            raise WorkerNotRunning("the generation worker is not running")
        self._queue.put_nowait(job)

    async def complete(self, prompt: str, cfg: SamplingConfig, prompt_tokens: int) -> Completion:
        job = GenerationJob(prompt, cfg, prompt_tokens, future=asyncio.get_running_loop().create_future())
        self.submit(job)
        return await job.future

    def stream(self, prompt: str, cfg: SamplingConfig, prompt_tokens: int) -> GenerationJob:
        """A submitted streaming job; read its `events`, and set `cancelled` when the client is gone."""
        job = GenerationJob(prompt, cfg, prompt_tokens, events=asyncio.Queue())
        self.submit(job)
        return job

    def _batch_key(self, job: GenerationJob) -> tuple | None:
        """Jobs with equal keys decode together and get exactly what each would get alone."""
        c = job.cfg
        if job.events is not None:
            return None
        if c.temperature > 0 and c.seed is not None:
            return None  # a seeded sample must not depend on which requests share its batch
        if job.prompt_tokens + c.max_new_tokens > self.generator.context:
            return None  # a long row would shorten every other row's budget
        return (c.max_new_tokens, c.temperature, c.top_k, c.top_p, c.repetition_penalty, tuple(c.stop))

    def _live(self, job: GenerationJob) -> bool:
        return not (job.cancelled.is_set() or (job.future is not None and job.future.done()))

    def _take_batch(self, job: GenerationJob) -> list[GenerationJob]:
        """`job` and the waiting jobs that decode with it, taken out of the pending queue."""
        batch = [job]
        key = self._batch_key(job)
        if key is None:
            return batch
        rest: deque[GenerationJob] = deque()
        for other in self._pending:
            if len(batch) < self.max_batch and self._live(other) and self._batch_key(other) == key:
                batch.append(other)
            else:
                rest.append(other)
        self._pending = rest
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            # Everything that arrived while the model was busy is a candidate for the next batch.
            while not self._queue.empty():
                self._pending.append(self._queue.get_nowait())
            job = self._pending.popleft()
            if not self._live(job):
                continue
            try:
                if job.events is not None:
                    await loop.run_in_executor(self._executor, self._run_stream, job, loop)
                    continue
                batch = self._take_batch(job)
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
                for j, result in zip(batch, results):
                    if j.future is not None and not j.future.done():
                        if isinstance(result, BaseException):
                            j.future.set_exception(result)
                        else:
                            j.future.set_result(result)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving whatever one request did
                logger.exception("generation worker failed")
                if job.future is not None and not job.future.done():
                    job.future.set_exception(e)

    # The two methods below run on the worker thread.

    def _run_batch(self, batch: list[GenerationJob]) -> list[Completion | BaseException]:
        self.batch_sizes.append(len(batch))
        try:
            return list(self.generator.generate([j.prompt for j in batch], batch[0].cfg))
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                return [e]
        results: list[Completion | BaseException] = []
        for j in batch:  # one bad row must not fail its neighbours
            try:
                results.append(self.generator.generate([j.prompt], j.cfg)[0])
            except Exception as e:  # noqa: BLE001
                results.append(e)
        return results

    def _run_stream(self, job: GenerationJob, loop: asyncio.AbstractEventLoop) -> None:
        assert job.events is not None
        put = job.events.put_nowait

        def send(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(put, item)
            except RuntimeError:  # the event loop has closed: the server is going away
                job.cancelled.set()

        stats: dict = {}
        try:
            pieces = self.generator.stream(job.prompt, job.cfg, stats)
            for piece in pieces:
                if job.cancelled.is_set():
                    pieces.close()
                    return
                send(("delta", piece))
            send(("done", stats))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            send(("error", e))
