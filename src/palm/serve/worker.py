"""The one thread that touches the model, batching continuously (palm.inference.engine).

The model is not thread-safe, so every generation runs on ONE worker thread. It loops: admit waiting
jobs while the engine has free cache rows, drop the jobs whose clients have gone, run one engine
step (prefill of new prompts within a token budget, then one decode step for every running row),
and hand each new token to its job. A job joins the running batch at whatever step a row frees for
it and leaves at its end (eos, a stop string, max_tokens, its client gone), streaming or not, each
under its own sampling settings. A stream's text deltas travel to its response through an asyncio
queue as soon as they are decoded.

What request handling relies on is the small `GenerationJob` interface: `submit` refuses a job once
`max_queue` jobs wait for a row (QueueFull), and `GenerationJob.cancel` stops a job at its next
token, or before it starts; its row is free at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..inference.engine import Engine, Request
from ..inference.generate import Completion, Generator, SamplingConfig
from .decoding import Row

logger = logging.getLogger("uvicorn.error")


class WorkerNotRunning(RuntimeError):
    """A job was submitted outside the server's lifespan (before start or after stop)."""


class QueueFull(RuntimeError):
    """As many jobs as the server allows already wait for the model."""


@dataclass(eq=False)
class GenerationJob:
    """One request's generation: a whole completion (`future`) or a stream of events (`events`).

    A stream's events: ("delta", (str, [(token, Score), ...])), then ("done", Completion) or ("error", exception); or
    ("cancelled", None) once the job is cancelled. `submit` creates the future or the queue.
    """

    prompt_ids: list[int]
    cfg: SamplingConfig
    streamed: bool = False
    adapter: int = 0  # the served LoRA adapter the request's `model` names (0: the base model)
    logprobs: int | None = None  # each generated token's log-probability and the top k (None: not asked for)
    prompt_logprobs: bool = False  # the prompt's tokens scored too (echo)
    grammar: Any = None  # structured output: the compiled grammar the reply must follow (palm.inference.structured)
    scores: list = field(
        default_factory=list
    )  # palm.inference.engine's Scores of the tokens returned, set when it ends
    prompt_scores: list = field(default_factory=list)
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


@dataclass(eq=False)
class _Running:
    job: GenerationJob
    request: Request
    row: Row
    sent: int = 0  # scores already handed to a stream with its text


class GenerationWorker:
    """Owns the one thread that touches the model, and the engine whose rows the jobs share."""

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 8,
        max_queue: int = 64,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        prefix_reuse: bool = True,
    ):
        self.generator = generator
        self.engine = Engine(generator, max(1, max_batch), max_model_len, prefill_chunk, reuse=prefix_reuse)
        self.max_batch = self.engine.max_batch
        self.max_queue = max(1, max_queue)
        self.batch_sizes: deque[int] = deque(
            maxlen=1024
        )  # rows decoded per step, latest steps: for monitoring and tests
        self.decode_steps = 0  # engine steps run: the work done, for monitoring and tests
        self._running: list[_Running] = []
        self._pending: deque[GenerationJob] = deque()
        self._wake = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> list[GenerationJob]:
        """The jobs on the model now."""
        return [r.job for r in self._running]

    @property
    def waiting(self) -> int:
        """Requests queued and not yet handed to the model (cancelled ones do not count)."""
        with self._wake:
            return sum(not job.cancelled.is_set() for job in self._pending)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="palm-generate", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            jobs = [*self.running, *self._pending]
        for job in jobs:
            job.cancel()  # a step in flight ends, and nothing more starts
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        self._loop = None

    def submit(self, job: GenerationJob) -> None:
        """Queue `job`; QueueFull at once when `max_queue` jobs are waiting (checked here, not later, so that
        a flood of requests costs the server a list of bounded length, and each client learns at once)."""
        if self._loop is None or self._stopping:
            raise WorkerNotRunning("the generation worker is not running")
        with self._wake:
            self._pending = deque(j for j in self._pending if not j.cancelled.is_set())  # the abandoned give way
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting for the model")
            if job.streamed:
                job.events = asyncio.Queue()
            else:
                job.future = self._loop.create_future()
            self._pending.append(job)
            self._wake.notify()

    # The methods below run on the worker thread.

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._pending or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
            self._drop_cancelled()
            if not self._running:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - keep serving whatever one batch did
                logger.exception("generation worker failed")
                for r in list(self._running):
                    self._finish(r, e)
                continue
            self.decode_steps += 1
            self.batch_sizes.append(len(events))
            self._deliver(events)
        for r in list(self._running):
            self.engine.remove(r.request)
        self._running.clear()

    def _admit(self) -> None:
        """Waiting jobs into free rows, first come first served (under the lock)."""
        while self._pending and not self.engine.full:
            job = self._pending.popleft()
            if job.cancelled.is_set():
                continue  # its client left while it waited: it never starts
            constraint = self.generator.grammars().constraint(job.grammar) if job.grammar is not None else None
            request = Request(
                job.prompt_ids,
                job.cfg,
                adapter=job.adapter,
                logprobs=job.logprobs,
                prompt_logprobs=job.prompt_logprobs,
                constraint=constraint,
            )
            try:
                self.engine.add(request)
            except Exception as e:  # noqa: BLE001 - a request the engine refuses fails alone
                self._settle(job, e)
                continue
            self._running.append(_Running(job, request, Row(self.generator, job.cfg.stop, job.streamed)))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._running if r.job.cancelled.is_set()]:
            self.engine.remove(r.request)  # the row is free for the next step
            self._running.remove(r)

    def _deliver(self, events: list[tuple[Request, int]]) -> None:
        by_request = {id(r.request): r for r in self._running}
        for request, token in events:
            r = by_request.get(id(request))
            if r is None or r.job.cancelled.is_set():
                continue
            r.job.tokens += 1
            self._send(r, r.row.feed(token))
            if r.row.finish is not None or request.finish is not None:
                self._finish(r, None)

    def _finish(self, r: _Running, error: BaseException | None) -> None:
        self.engine.remove(r.request)  # a stop string ends it here; eos and length already did
        if r in self._running:
            self._running.remove(r)
        if error is None:
            self._send(r, r.row.close(), last=True)
            r.job.scores = r.request.scores[: len(r.row.ids)]  # none for an eos, nor past a stop string
            r.job.prompt_scores = r.request.prompt_scores
        self._settle(r.job, error if error is not None else r.row.completion(r.job.prompt_tokens))

    def _send(self, r: _Running, piece: str, last: bool = False) -> None:
        """Hand a stream's new text to its response, with the scores of the tokens it holds (all that are
        left, with the last piece)."""
        job = r.job
        if not (job.streamed and not job.cancelled.is_set()) or not (piece or last and job.logprobs is not None):
            return
        upto = len(r.row.ids) if last else len(r.request.scores)
        scores = list(zip(r.request.tokens[r.sent : upto], r.request.scores[r.sent : upto]))
        r.sent = max(r.sent, upto)
        if piece or scores:
            self._call(job, job.events.put_nowait, ("delta", (piece, scores)))

    def _settle(self, job: GenerationJob, result: Completion | BaseException) -> None:
        self._call(job, _settle, job, result)

    def _call(self, job: GenerationJob, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except (RuntimeError, AttributeError):  # the event loop has closed: the server is going away
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
    elif isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
