"""What the pipelined engine connections share (resp.py for Redis, pgpipe.py for
PostgreSQL): the calls in flight on one connection, their deadlines, and connecting once.

Rules:
- `Inflight` holds a connection's calls in the order they were queued (the order the
  server answers in). At most MAX_WAITING (`Overloaded` past it). `fail(exc)` ends every
  call still waiting with `exc` and cancels the connection's tasks; nothing is resent.
- A call's deadline is `timeout` after it began and covers the connect too. The
  connection watches the deadline of its oldest call, whether or not that caller still
  waits (a cancelled caller keeps its place; its answer is read and dropped): past it, the
  connection fails (an answer that late means the connection or the server is stuck, and
  every later call is queued behind it). `wait` has a backstop a second later.
- A call is awaited by its caller (`wait`) or answered through a callback (`then`), run
  where the answer is read: a request on a control connection's fast path needs no task.
- `Connections`: a client's connections, served by its `run` and failed when it ends.
- `Gate`: one connect attempt at a time, each bounded by the caller's deadline; callers
  that queued behind an attempt that failed get its failure instead of trying again one
  after another (k callers would otherwise wait k timeouts).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger("meshd.store")
MAX_WAITING = 10_000  # calls queued on one connection
T = TypeVar("T")


class Overloaded(OSError):
    """Too many calls already queued on the connection."""


class Call:
    __slots__ = ("deadline", "error", "finished", "task", "then")

    def __init__(self, deadline: float, then: Callable[[Any], None] | None = None) -> None:
        self.deadline = deadline
        self.error: BaseException | None = None
        self.finished = False
        self.task: Any = None  # the caller while it waits
        self.then = then  # or: called with the call once it is answered (no caller task)

    def finish(self) -> None:
        """Answered (or failed): wake the caller if it still waits (no Event per call:
        one is made and set for every operation on the hot path), or call `then`."""
        self.finished = True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)
        then, self.then = self.then, None
        if then is not None:
            try:
                then(self)
            except Exception:  # a caller's bug never stops the connection
                log.exception("an engine call's answer could not be handled")


class Inflight:
    def __init__(self, server: str) -> None:
        self.server = server  # for messages: "Redis", "PostgreSQL"
        self.waiting: collections.deque[Any] = collections.deque()
        self.lot = trio.lowlevel.ParkingLot()  # tasks waiting for work park here
        self.closed = False
        self._scope = trio.CancelScope()

    def admit(self, call: Call) -> None:
        """Queue `call` (its request must be queued with it, with no checkpoint between)."""
        if len(self.waiting) >= MAX_WAITING:
            raise Overloaded(f"too many calls queued on the connection to {self.server}")
        self.waiting.append(call)
        self.lot.unpark_all()

    def fail(self, exc: BaseException) -> None:
        """Close: every call still waiting gets `exc`, and the tasks end."""
        if self.closed:
            return
        self.closed = True
        while self.waiting:
            call = self.waiting.popleft()
            call.error = exc
            call.finish()
        self._scope.cancel()

    async def run(self, tasks: list[Callable[[], Awaitable[None]]],
                  close: Callable[[], Awaitable[None]]) -> None:
        """The connection's `tasks` and its deadline watch, until it fails or the owner
        ends; then `close` (shielded)."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for task in tasks:
                        nursery.start_soon(task)
                    nursery.start_soon(self._deadlines)
        finally:
            self.fail(ConnectionResetError(f"the connection to {self.server} was closed"))
            with trio.CancelScope(shield=True):
                await close()

    async def _deadlines(self) -> None:
        """Sleep until the oldest call's deadline (calls are queued in the order they
        began, so it is the earliest); fail the connection if that call is still waiting
        then. One wakeup per deadline, not per call."""
        while True:
            if not self.waiting:
                await self.lot.park()
                continue
            deadline = self.waiting[0].deadline
            if trio.current_time() >= deadline:
                self.fail(TimeoutError(f"no answer from {self.server} in time"))
                return
            await trio.sleep_until(deadline)

    async def wait(self, call: Call) -> None:
        """Until `call` is answered (or failed); raises its error."""
        if not call.finished:
            call.task = trio.lowlevel.current_task()

            def abort(_: Any) -> Any:
                call.task = None  # it keeps its place; its answer is dropped
                return trio.lowlevel.Abort.SUCCEEDED

            with trio.move_on_at(call.deadline + 1.0):  # the deadline watch ends it first
                await trio.lowlevel.wait_task_rescheduled(abort)
        if not call.finished:
            self.fail(TimeoutError(f"no answer from {self.server} in time"))
        if call.error is not None:
            raise call.error


class Gate:
    """Connect attempts one at a time (module docstring)."""

    def __init__(self, server: str) -> None:
        self.server = server
        self._lock = trio.Lock()
        self._ended = 0
        self._failure: str | None = None

    async def open(self, deadline: float, ready: Callable[[], T | None],
                   connect: Callable[[], Awaitable[T]]) -> T:
        """`ready()` if it gives a connection once the gate is ours, else `connect()`."""
        seen = self._ended  # an attempt under way now ends after this
        acquired = False
        with trio.move_on_at(deadline):
            await self._lock.acquire()
            acquired = True
        if not acquired:
            raise TimeoutError(f"no connection to {self.server} in time")
        try:
            got = ready()
            if got is not None:
                return got
            if self._ended != seen and self._failure is not None:
                raise ConnectionError(self._failure)  # the attempt we waited on
            try:
                conn = await connect()
            except Exception as exc:  # (a cancelled caller's attempt fails nobody else)
                self._ended += 1
                self._failure = str(exc).strip() or type(exc).__name__
                raise
            self._ended += 1
            self._failure = None
            return conn
        finally:
            self._lock.release()


class Connections:
    """The pipelined connections of one engine client (resp.Multiplexer,
    pgpipe.Pipeline): each served in the nursery of the client's `run`, all failed when it
    ends, made one attempt at a time through `_gate`."""

    def __init__(self, server: str) -> None:
        self._conns: list[Any] = []  # newest last; closed ones leave at the next `_add`
        self._gate = Gate(server)
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connections' tasks until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for conn in self._conns:
                conn.fail(ConnectionResetError("the engine stopped"))
            self._conns = []

    async def _add(self, connect: Callable[[], Awaitable[T]], wrap: Callable[[T], Any],
                   discard: Callable[[T], Awaitable[None]]) -> Any:
        """`connect()`, `wrap` what it gives into a connection and serve it; refused while
        `run` is not running (before it, or when it stopped during the connect: then what
        was connected is `discard`ed)."""
        if self._nursery is None:
            raise ConnectionResetError("the engine is not running")
        raw = await connect()
        if self._nursery is None:
            with trio.CancelScope(shield=True):
                await discard(raw)
            raise ConnectionResetError("the engine is not running")
        conn = wrap(raw)
        self._nursery.start_soon(conn.serve)
        self._conns = [c for c in self._conns if not c.closed] + [conn]
        return conn
