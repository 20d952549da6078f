"""One worker per loaded model: a thread that runs one job at a time from a bounded queue.

Generation is CPU-bound PyTorch, so it runs here, off the event loop. A request that finds the
queue full is refused at once (QueueFull carries a Retry-After estimate) instead of piling up, as
A1111's single global lock would. A job can be cancelled at any time: waiting, it leaves the queue
and frees its slot; running, it stops at its next sampler step (the step callback raises).
"""
from __future__ import annotations

import asyncio
import io
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import torch
from PIL import Image

from marble.pipeline import Pipeline
from marble.record import GenerationRecord
from marble.request import ResolvedRequest
from marble.server.outputs import OutputStore


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was interrupted, its client went away, or the server is stopping."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


INTERRUPTED = "interrupted"
DISCONNECTED = "client disconnected"
STOPPING = "server stopping"
SUPERSEDED = "superseded"           # live mode: a newer request of the same stream replaced it


@dataclass
class JobResult:
    images: list[Image.Image]
    records: list[GenerationRecord]
    paths: list[Path]               # where each image was saved, in order
    warnings: list[str]
    seconds: float


@dataclass(eq=False)
class Job:
    request: ResolvedRequest        # within this server's limits
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    cancel_reason: str | None = None
    save: bool = True               # False: a live preview, kept in memory unless the user keeps it

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason


@dataclass(frozen=True)
class Progress:
    """What /sdapi/v1/progress reports for one worker."""
    job_id: str | None
    step: int                       # steps done in the running job
    total: int                      # steps in the running job (0 when idle)
    started: float | None           # time.monotonic() when the running job started
    waiting: int                    # jobs queued behind it
    interrupted: bool
    preview_png: bytes | None       # the decoded x0 estimate of a recent step
    preview_step: int

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def eta_seconds(self, now: float) -> float:
        """A1111's estimate: elapsed / progress - elapsed."""
        if not self.total or not self.step or self.started is None:
            return 0.0
        elapsed = now - self.started
        return max(0.0, elapsed / self.fraction - elapsed)


class Worker:
    def __init__(self, pipe: Pipeline, store: OutputStore, max_queue: int, preview_interval: float = 0.5):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.pipe = pipe
        self.store = store
        self.max_queue = max_queue              # jobs that may wait behind the running one
        self.preview_interval = preview_interval  # seconds between preview decodes
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._current: Job | None = None
        self._step = self._total = 0
        self._started: float | None = None
        self._preview: tuple[int, bytes] | None = None
        self._preview_wanted_until = 0.0
        self._last_preview = 0.0
        self._durations: deque[float] = deque(maxlen=16)  # seconds per recent job, for Retry-After
        self._stopping = False
        self._draining = False                  # retiring: finish the queue, take nothing new
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.pipe.name

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"marble-worker-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            if self._current is not None:
                self._current.cancel(STOPPING)
            self._cond.notify_all()
        for job in dropped:
            _settle(job.future, exc=Cancelled(STOPPING))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def retire(self, timeout: float = 3600.0) -> None:
        """Take no new jobs, finish the queued ones, then stop (a model switched away from)."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- the queue ---------------------------------------------------------------------------
    def submit(self, request: ResolvedRequest, save: bool = True) -> Job:
        """Queue a resolved request; QueueFull if max_queue jobs already wait behind a running one.
        `save`: write the images to the outputs folder (live previews are not)."""
        job = Job(request, save=save)
        with self._cond:
            if self._stopping or self._draining:
                raise Cancelled(STOPPING)
            # full: max_queue waiting plus one running (or about to be picked up by the thread)
            in_system = len(self._pending) + (self._current is not None)
            if in_system >= self.max_queue + 1:
                raise QueueFull(self.max_queue, self._retry_after_locked())
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Waiting: leave the queue now. Running: stop at the next step. Done: nothing."""
        with self._cond:
            job.cancel(reason)
            try:
                self._pending.remove(job)
            except ValueError:
                return
        _settle(job.future, exc=Cancelled(reason))

    def interrupt(self) -> bool:
        """Stop the running job (A1111's /interrupt); queued jobs go on. True if one was running."""
        with self._cond:
            if self._current is None:
                return False
            self._current.cancel(INTERRUPTED)
            return True

    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def _retry_after_locked(self) -> int:
        per_job = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil((len(self._pending) + 1) * per_job))

    # -- progress ----------------------------------------------------------------------------
    def progress(self, want_preview: bool = True) -> Progress:
        now = time.monotonic()
        with self._cond:
            if want_preview:
                # previews cost a decode each (cheap by default), so they are made only while someone watches
                self._preview_wanted_until = now + 5.0
            job = self._current
            preview = self._preview if job is not None else None
            return Progress(job.id if job else None, self._step if job else 0, self._total if job else 0,
                            self._started if job else None, len(self._pending),
                            bool(job and job.cancel_reason == INTERRUPTED),
                            preview[1] if preview else None, preview[0] if preview else 0)

    def _maybe_preview(self, step: int, x0: torch.Tensor) -> None:
        now = time.monotonic()
        if now > self._preview_wanted_until or now - self._last_preview < self.preview_interval:
            return
        self._last_preview = now
        image = self.pipe.preview(x0)   # a linear map or TAESD by default, not the VAE (pipeline.Pipeline)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)   # a transient picture: 3x faster than level 6
        with self._cond:
            self._preview = (step + 1, buf.getvalue())

    # -- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        job = None
        while True:
            with self._cond:
                # finish one job and take the next in one critical section: submit() never sees
                # the worker idle while jobs wait
                if job is not None:
                    self._durations.append(time.monotonic() - self._started)
                    self._current = None
                job = self._next_locked()
                if job is None:
                    return
            try:
                _settle(job.future, result=self._execute(job))
            except Cancelled as e:
                _settle(job.future, exc=e)
            except Exception as e:  # a valid request that failed: reported to its caller as a 500
                _settle(job.future, exc=e)

    def _next_locked(self) -> Job | None:
        """Wait for the next job still wanted and make it current; None when stopping."""
        while True:
            while not self._pending and not self._stopping and not self._draining:
                self._cond.wait()
            if self._stopping or (self._draining and not self._pending):
                return None
            job = self._pending.popleft()
            if job.future.set_running_or_notify_cancel():   # False: its waiter gave up while it was queued
                self._current, self._step, self._total = job, 0, 0
                self._started, self._preview, self._last_preview = time.monotonic(), None, 0.0
                return job

    def _execute(self, job: Job) -> JobResult:
        def callback(step: int, total: int, x0: torch.Tensor) -> None:
            if job.cancel_reason is not None:
                raise Cancelled(job.cancel_reason)
            with self._cond:
                self._step, self._total = step + 1, total
            self._maybe_preview(step, x0)

        if job.cancel_reason is not None:
            raise Cancelled(job.cancel_reason)
        t0 = time.monotonic()
        result = self.pipe.generate(job.request, callback=callback)
        paths = [self.store.save(image, record) for image, record in zip(result.images, result.records)] \
            if job.save else []
        return JobResult(result.images, result.records, paths, result.warnings, time.monotonic() - t0)


def _settle(future: Future, *, result=None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless its waiter already cancelled it."""
    if future.done():
        return
    if future.cancelled():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except Exception:  # InvalidStateError: cancelled between the check and the set
        pass


async def wait_for(worker: Worker, job: Job, is_disconnected: Callable[[], Awaitable[bool]],
                   poll: float = 0.25) -> JobResult:
    """Await a job without blocking the event loop; a client that goes away cancels its job."""
    waiter = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=poll)
            if done:
                return waiter.result()
            if await is_disconnected():
                raise Cancelled(DISCONNECTED)
    finally:
        if not job.future.done():
            worker.cancel(job, DISCONNECTED)
            waiter.cancel()
