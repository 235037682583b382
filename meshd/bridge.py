"""One asyncio event loop in a thread of its own, owned by a trio component: how meshd (trio)
drives a client library written for asyncio (nats-py for topics on NATS JetStream).

Theory of operation: the component runs `AsyncioBridge.run` in its nursery; the loop's
thread starts on first use (a node that never binds a topic to an engine never starts
it) and is stopped and joined when `run` ends, so the thread lives exactly as long as its
component. Work crosses in batches, in both directions:
- trio -> asyncio: `post(fn, *args)` appends to a queue and wakes the loop once
  (`call_soon_threadsafe`) per burst; the loop runs every queued function, in order.
- asyncio -> trio: `to_trio(fn, *args)` appends to another queue and wakes trio once
  (`TrioToken.run_sync_soon`) per burst; trio runs every queued function, in order.
- `await call(async_fn, *args)` (trio) runs a coroutine on the loop and returns its result
  or raises its exception: the coroutine's completion comes back by `to_trio` and sets a
  trio Event. No thread is blocked per call in flight, however many are.

Rules:
- B1 Functions posted run in the order posted, on the loop's thread; functions sent to trio
  run in the order sent, in trio's thread (outside any task: they must not block, and
  they may only use trio's synchronous APIs).
- B2 A function that raises is logged and dropped; the queue goes on (one bad callback
  never stops the bridge).
- B3 `call` cancelled in trio cancels its asyncio task; a call after the bridge stopped
  raises `BridgeClosed` at once.
- B4 Stopping (the end of `run`): the `on_stop` coroutines run on the loop (bounded by
  STOP_TIMEOUT: connections close), the loop stops, the thread is joined (bounded too; it
  is a daemon thread, so a stuck library cannot hold the process). Work still queued is
  dropped; calls waiting get `BridgeClosed`.
- B5 After trio's run ended, `to_trio` drops what it is given (nothing is left to run it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger("meshd.broker")
T = TypeVar("T")
STOP_TIMEOUT = 5.0  # seconds for on_stop coroutines, then as long again for the thread


class BridgeClosed(RuntimeError):
    """The bridge is not running (its component stopped, or never started)."""


class AsyncioBridge:
    def __init__(self, name: str = "meshd-asyncio") -> None:
        self.name = name
        self.on_stop: list[Callable[[], Awaitable[Any]]] = []  # run on the loop at the end
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._to_loop: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = \
            collections.deque()
        self._to_trio: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = \
            collections.deque()
        self._loop_woken = False
        self._trio_woken = False
        self._waiting: set[trio.Event] = set()  # calls in flight (woken at close)

    @property
    def started(self) -> bool:
        return self._loop is not None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the bridge until cancelled (the loop's thread starts on first use)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop()

    # --- trio -> asyncio --------------------------------------------------------------------

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop's thread, soon (B1). From trio's thread."""
        if self._closed:
            raise BridgeClosed("the asyncio bridge is stopped")
        loop = self._start()
        self._to_loop.append((fn, args))
        if not self._loop_woken:
            self._loop_woken = True
            loop.call_soon_threadsafe(self._drain_loop)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`await fn(*args)` on the loop; its result, or its exception raised here (B3)."""
        done = trio.Event()
        outcome: list[asyncio.Future[Any]] = []
        task: list[asyncio.Future[Any]] = []

        def finish(fut: asyncio.Future[Any]) -> None:  # in trio's thread
            outcome.append(fut)
            done.set()

        def start() -> None:  # on the loop
            fut = asyncio.ensure_future(fn(*args))
            task.append(fut)
            fut.add_done_callback(lambda f: self.to_trio(finish, f))

        self.post(start)
        self._waiting.add(done)
        try:
            await done.wait()
        except BaseException:
            if not done.is_set():
                with contextlib.suppress(BridgeClosed):
                    self.post(lambda: task and task[0].cancel())
            raise
        finally:
            self._waiting.discard(done)
        if not outcome:
            raise BridgeClosed("the asyncio bridge stopped during the call")
        fut = outcome[0]
        if fut.cancelled():
            raise BridgeClosed("the call was cancelled on the asyncio side")
        exc = fut.exception()
        if exc is not None:
            raise exc
        return fut.result()  # type: ignore[no-any-return]

    # --- asyncio -> trio --------------------------------------------------------------------

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in trio's thread, soon (B1, B5). From the loop's thread."""
        token = self._token
        if token is None:
            return
        self._to_trio.append((fn, args))
        if not self._trio_woken:
            self._trio_woken = True
            try:
                token.run_sync_soon(self._drain_trio)
            except trio.RunFinishedError:
                self._to_trio.clear()

    # --- inside -----------------------------------------------------------------------------

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        if self._token is None:
            raise BridgeClosed("the asyncio bridge is not running (its component has not "
                               "started)")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                    for t in pending:
                        t.cancel()
                    if pending:
                        loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
                loop.close()

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)
        self._loop = loop
        return loop

    def _drain_loop(self) -> None:
        self._loop_woken = False
        _run_queued(self._to_loop, "a posted function")

    def _drain_trio(self) -> None:
        self._trio_woken = False
        _run_queued(self._to_trio, "a function sent to trio")

    async def _stop(self) -> None:
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            stopped = threading.Event()

            async def shutdown() -> None:
                for fn in self.on_stop:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(fn(), STOP_TIMEOUT)

            def begin() -> None:
                fut = asyncio.ensure_future(shutdown())
                fut.add_done_callback(lambda _: (loop.stop(), stopped.set()))

            self._to_loop.append((begin, ()))
            with contextlib.suppress(RuntimeError):  # (the loop is closed already)
                loop.call_soon_threadsafe(self._drain_loop)
            await trio.to_thread.run_sync(stopped.wait, STOP_TIMEOUT + 1)
            await trio.to_thread.run_sync(thread.join, STOP_TIMEOUT)
        self._drain_trio()  # what finished meanwhile
        for done in list(self._waiting):
            done.set()  # their outcome is missing: BridgeClosed
        self._token = None


def _run_queued(queue: Any, what: str) -> None:
    """Run every (fn, args) queued, in order; one that fails is logged and the rest run
    (B2)."""
    while queue:
        fn, args = queue.popleft()
        try:
            fn(*args)
        except Exception:  # B2
            log.exception("asyncio bridge: %s failed", what)
