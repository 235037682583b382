"""Worker threads for the engines' blocking clients (psycopg, redis-py), with one wakeup of
trio per burst of finished calls instead of one per call.

Theory of operation: `Workers(n)` keeps n threads (started on first use, as many as the
engine's connection pool) blocked on one job queue. `await workers.run(fn, *args)` puts the
job on the queue and parks the calling task; the thread that takes it runs it and appends
the outcome to a finished queue, and wakes trio (`TrioToken.run_sync_soon`) only if no
wakeup is pending, so a burst of calls finishing together costs trio one wakeup; trio then
reschedules every finished task with its outcome. trio.to_thread.run_sync does one
round trip per call (and a thread start or handoff each), which under 32 concurrent store
calls cost the daemon more CPU than the engines' own work (bench/store.py, docs/store.md).

Rules:
- W1 A call is not cancellable once queued (as trio.to_thread.run_sync by default): the
  engine's own timeouts bound it (statement_timeout, socket timeouts), and a caller never
  sees a statement as not done while the engine may still commit it.
- W2 A job that raises hands its exception to its caller; the thread goes on.
- W3 `close()` stops the threads after the jobs queued so far (each gets a sentinel);
  threads are daemon threads, so a client stuck in I/O cannot hold the process at exit.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
_STOP = object()


class Workers:
    def __init__(self, n: int, name: str) -> None:
        self.n = max(1, n)
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[Any, outcome.Outcome[Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._woken = False
        self._threads: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread; its result, or its exception raised here."""
        self._token = trio.lowlevel.current_trio_token()
        if len(self._threads) < self.n:
            self._spawn()
        task = trio.lowlevel.current_task()
        self._jobs.put((task, fn, args))
        # the outcome given to reschedule() is unwrapped here: its value, or its exception
        return await trio.lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _: trio.lowlevel.Abort.FAILED)  # W1

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        self._threads.clear()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            task, fn, args = job
            result = outcome.capture(fn, *args)  # W2
            with self._lock:
                self._done.append((task, result))
                if self._woken:
                    continue
                self._woken = True
            try:
                assert self._token is not None
                self._token.run_sync_soon(self._wake)
            except trio.RunFinishedError:
                return

    def _wake(self) -> None:  # in trio's thread
        with self._lock:
            self._woken = False
            done, self._done = self._done, collections.deque()
        for task, result in done:
            trio.lowlevel.reschedule(task, result)
