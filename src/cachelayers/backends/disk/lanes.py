"""The threads that own the disk tier's SQLite connections: one lane for writes, one for reads, per process.

A lane is a thread with its own connection and a queue. Callers put jobs on the queue and wait on an event;
the thread takes everything that is queued (up to a budget) and runs it as one batch, so a thousand writers
that arrive together make one transaction instead of a thousand transactions fighting for one lock. Waiters
are woken with one thread-safe callback per event loop and batch, which works under asyncio and trio.

A lane's thread ends after a few idle seconds (closing its connection) and starts again on the next job, so an
unused backend holds no thread and no file.

Waiting has a deadline that tells a tier that fails from one that is busy (see `wait_for`): a lane refused a lock
by another connection for the engine's tier timeout has failed; a thousand callers queued behind each other on a
busy event loop, or a batch waiting for a checkpoint, have not, and wait while the lane makes progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final, cast

import anyio

from cachelayers.backends.base import BackendBusyError
from cachelayers.loops import current_loop_token

__all__ = ["PATIENCE", "Job", "Lane", "submit_and_wait"]

IDLE_SECONDS: Final = 2.0
BUSY_ROUNDS: Final = 8
"""A job is given up after waiting this many timeouts: as congestion if its lane made progress meanwhile."""
WORKING_CPU: Final = 0.001
"""CPU seconds a lane's thread must have used during a wait to count as working (not stalled)."""

PATIENCE: Final[contextvars.ContextVar[float | None]] = contextvars.ContextVar("cachelayers_disk_patience",
                                                                               default=None)
"""The engine's tier timeout for the operation being run (set by `DiskBackend.within`); ``None``: no deadline."""


class Job:
    """One unit of work for a lane, and its outcome for the caller.

    ``work`` is whatever the lane's ``run_batch`` knows how to do (a function of the connection, or a request
    it merges with its neighbours). ``size`` counts against the lane's byte budget per batch. A job without
    ``done`` is fire-and-forget.
    """

    __slots__ = ("done", "error", "finished", "result", "size", "token", "work")

    def __init__(self, work: Any, size: int = 0, *, token: object = None, done: anyio.Event | None = None) -> None:
        self.work = work
        self.size = size
        self.token = token
        self.done = done
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        """Set by the lane's thread once ``result``/``error`` hold the outcome (before ``done`` is set)."""


class Lane:
    """A thread that runs queued jobs in batches through ``run_batch(lane, jobs)``.

    Attributes:
        db: The lane's connection (opened and replaced by ``run_batch``; closed here when the thread ends).
        generation: Which opening of the database file ``db`` belongs to (see `DiskBackend`).
        batches: Batches the lane has finished (its progress, as waiters see it).
    """

    def __init__(self, name: str, run_batch: Callable[[Lane, list[Job]], None], *, max_jobs: int,
                 max_size: int) -> None:
        self.name = name
        self.db: sqlite3.Connection | None = None
        self.generation = -1
        self._run_batch = run_batch
        self._max_jobs = max_jobs
        self._max_size = max_size
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clock: int | None = None
        self.batches = 0
        self.locked_out_since: float | None = None
        """While the lane waits for a lock another connection holds: when it began (`time.monotonic`)."""

    def progress(self) -> tuple[int, float]:
        """``(batches finished, CPU seconds of the thread)``: what tells a working lane from a stuck one.

        A stalled lane (a disk that does not answer) finishes nothing and uses no CPU; a lane working through
        a long queue does one or the other. The CPU time is 0 where the platform cannot read another thread's
        clock.
        """
        clock = self._clock
        cpu = 0.0
        if clock is not None:
            with contextlib.suppress(OSError):
                cpu = time.clock_gettime(clock)
        return self.batches, cpu

    @contextlib.contextmanager
    def locked_out(self) -> Iterator[None]:
        """Mark the statement run inside as waiting for another connection's lock (SQLite's busy handler)."""
        self.locked_out_since = time.monotonic()
        try:
            yield
        finally:
            self.locked_out_since = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; start the thread if it is not running."""
        with self._cond:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"cachelayers-disk-{self.name}",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def stop(self) -> threading.Thread | None:
        """Ask the thread to end once the queue is empty; return it (to join), or ``None``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            return self._thread

    def stopped(self) -> None:
        """The thread returned by `stop` has been joined: accept work again."""
        with self._cond:
            self._stopping = False

    def forget(self) -> None:
        """After a fork: the thread does not exist in this process and the connection must not be used."""
        self._cond = threading.Condition()
        self._jobs = deque()
        self._thread = None
        self._stopping = False
        self.locked_out_since = None  # the parent's thread may have been waiting for a lock at the fork
        _INHERITED.append(self.db)  # never closed here: closing would release the parent's locks
        self.db = None
        self.generation = -1

    def close_db(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _loop(self) -> None:
        self._clock = None
        if hasattr(time, "pthread_getcpuclockid"):
            with contextlib.suppress(OSError):
                self._clock = time.pthread_getcpuclockid(threading.get_ident())
        while True:
            with self._cond:
                while not self._jobs:
                    if self._stopping or (not self._cond.wait(IDLE_SECONDS) and not self._jobs):
                        self._thread = None
                        self.close_db()
                        return
                batch = self._take()
            try:
                self._run_batch(self, batch)
            except BaseException as exc:  # run_batch handles its errors; this is the last line of defence
                for job in batch:
                    if job.error is None:
                        job.error = exc
            for job in batch:
                job.finished = True
            self.batches += 1
            _wake(batch)

    def _take(self) -> list[Job]:
        first = self._jobs.popleft()
        batch, size = [first], first.size
        while self._jobs and len(batch) < self._max_jobs and size + self._jobs[0].size <= self._max_size:
            job = self._jobs.popleft()
            size += job.size
            batch.append(job)
        return batch


_INHERITED: Final[list[sqlite3.Connection | None]] = []


def _wake(batch: list[Job]) -> None:
    """Set the events of the batch's waiters: one callback per event loop."""
    loops: dict[int, tuple[object, list[anyio.Event]]] = {}
    for job in batch:
        if job.done is not None:
            loops.setdefault(id(job.token), (job.token, []))[1].append(job.done)
    for token, events in loops.values():
        def wake(events: list[anyio.Event] = events) -> None:
            for event in events:
                event.set()

        with contextlib.suppress(Exception):  # raised when the loop has ended: nobody is waiting any more
            if isinstance(token, asyncio.AbstractEventLoop):
                token.call_soon_threadsafe(wake)
            else:  # a trio run's token
                cast(Any, token).run_sync_soon(wake)


async def submit_and_wait(lane: Lane, work: Any, size: int = 0) -> Any:
    """Run ``work`` in ``lane`` and return its result (or raise its error), within `PATIENCE` if it is set.

    Cancelled while waiting, the caller returns at once; the job still runs (its outcome is dropped).
    """
    done = anyio.Event()
    job = Job(work, size, token=current_loop_token(), done=done)
    lane.submit(job)
    seconds = PATIENCE.get()
    if seconds is None:
        await done.wait()
    else:
        await wait_for(lane, job, done, seconds)
    if job.error is not None:
        raise job.error
    return job.result


async def wait_for(lane: Lane, job: Job, done: anyio.Event, seconds: float) -> None:
    """Wait for ``job``: `TimeoutError` once ``lane`` has waited ``seconds`` for a lock another connection holds,
    or went `BUSY_ROUNDS` times ``seconds`` without finishing a batch or using CPU (a stalled disk);
    `BackendBusyError` once the job waited that long while the lane worked for others.

    A wall-clock deadline fails under load though nothing is wrong: a thousand callers on one event loop wake
    late, the lane (which needs the interpreter lock between statements) runs slower, and a checkpoint waits
    (up to half a second) for readers to leave the log, sleeping without CPU. A lane that another process's lock
    keeps from writing has failed, and says so by `Lane.locked_out`.
    """
    started = time.monotonic()
    seen = lane.progress()
    rounds, wait = 0, seconds
    while True:
        with anyio.move_on_after(wait):
            await done.wait()
            return
        if job.finished:  # answered; the wake-up is still queued behind other callbacks of a busy loop
            return
        since = lane.locked_out_since
        locked = 0.0 if since is None else time.monotonic() - since
        if locked >= seconds:
            raise TimeoutError(f"the disk tier's {lane.name} waited {locked:.2g}s for a lock another connection "
                               f"holds (tier timeout {seconds:g}s)")
        rounds += 1  # rounds of this waiter's timer, not seconds: a late event loop is not the lane's doing
        if rounds >= BUSY_ROUNDS:
            batches, cpu = lane.progress()
            waited = time.monotonic() - started
            if batches == seen[0] and cpu - seen[1] < WORKING_CPU:
                raise TimeoutError(f"the disk tier's {lane.name} made no progress for {waited:.2g}s")
            raise BackendBusyError(f"the disk tier's {lane.name} was busy with other callers for {waited:.2g}s")
        wait = seconds - locked  # a lock wait under way times out when it reaches ``seconds``
