"""The SDK from asyncio (FastAPI, aiohttp, anything on an asyncio loop).

    from meshd_sdk import aio

    async with aio.Client() as client:
        reply = await client.call("greeter", "Greeter.Hello", {"name": "Ada"})

    service = aio.Service("greeter")

    @service.handler("Greeter.Hello")
    async def hello(req: HelloRequest) -> HelloResponse: ...   # an asyncio coroutine

    asyncio.run(service.run())

Theory of operation: the SDK is written for trio. On an asyncio loop, trio runs as a guest
(`trio.lowlevel.start_guest_run`): its scheduler steps are callbacks on the same loop and
thread, so nothing here is threaded. One `Bridge` per loop, started on first use, holds a
trio nursery; an asyncio `await` of an SDK coroutine becomes a trio task in it (started in
a copy of the caller's context, so a handler's service token, namespace and trace go along)
whose result completes an asyncio future, and a trio handler that must run the user's
asyncio coroutine starts it as an asyncio task (in a copy of the trio task's context, marked
asyncio for sniffio, so `current_call()` works in it and httpx or anyio pick asyncio) and
waits for it.

Rules:
- Cancellation crosses both ways: an asyncio task cancelled while it awaits the SDK cancels
  the trio task doing the work, and a trio cancellation (the daemon ended a call) cancels the
  handler's asyncio task and waits for it to finish.
- Whatever holds trio state across awaits (the client's connections, a subscription, a
  publisher, a watch) is entered, iterated and left inside one trio task that the bridge
  keeps for it, never from several: trio's cancel scopes belong to one task. An `async with`
  body that fails hands its exception to that task, which leaves the block with it (a
  publisher then does not flush); iterators fetch an item only when the consumer asks, so
  leaving a loop early loses nothing.
- No error of one call ends the bridge: anything a call raises (but the bridge's own
  cancellation) goes to its caller, a non-Exception wrapped as a 500. If the bridge ends,
  calls waiting on it fail (503) and the next call starts a new one.
- The bridge ends when its loop shuts down (`asyncio.run` cancelling what is left): the trio
  nursery is cancelled and the guest run awaited. A loop closed without cancelling its tasks
  leaves the bridge's trio run unfinished in that thread: run asyncio with `asyncio.run`, or
  `await aio.close()` before closing the loop.
- Objects of the trio SDK are never handed to asyncio code: what an SDK coroutine returns
  that does trio things (a subscription, a message to ack) comes wrapped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import sniffio
import trio

from meshd.errors import MeshError

from . import client as _client
from . import service as _service
from . import store as _store

T = TypeVar("T")
_PACKAGE = __name__.rsplit(".", 1)[0]  # meshd_sdk
_END = object()
_BRIDGES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Bridge] = \
    weakref.WeakKeyDictionary()  # one running bridge per loop; a bridge removes itself


class Bridge:
    """trio as a guest on one asyncio loop, and the crossings between the two."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self.ready = asyncio.Event()
        self.done: asyncio.Future[None] = loop.create_future()
        self.pending: set[asyncio.Future[Any]] = set()
        self.keeper: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the asyncio loop of this bridge is gone")
        return loop

    def start(self) -> None:
        loop = self.loop
        trio.lowlevel.start_guest_run(
            self._main, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=self._finished, host_uses_signal_set_wakeup_fd=True)
        self.keeper = loop.create_task(self.keep(), name="meshd-trio-bridge")

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.ready.set()
            await trio.sleep_forever()

    def _finished(self, outcome: Any) -> None:
        loop = self._loop()
        if loop is not None and _BRIDGES.get(loop) is self:
            del _BRIDGES[loop]
        self.token = self.nursery = None
        gone = MeshError(503, "the SDK's trio bridge ended", id="sdk")
        for fut in list(self.pending):
            if not fut.done():
                fut.set_exception(gone)
        self.ready.set()  # anyone still waiting to start learns it is gone
        if not self.done.done():
            self.done.set_result(None)

    async def keep(self) -> None:
        """Lives as long as the loop's tasks: when the loop shuts down (it cancels this),
        trio is cancelled and awaited."""
        try:
            await asyncio.Future()
        finally:
            self.stop()
            await asyncio.wait([self.done], timeout=5.0)

    def stop(self) -> None:
        if self.token is not None and self.nursery is not None:
            self._soon(self.nursery.cancel_scope.cancel)

    def _soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run `fn(*args)` in trio's context; False if the bridge is gone."""
        token = self.token
        if token is None:
            return False
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            return False
        return True

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start `fn(*args)` as a trio task, in a copy of the caller's context."""
        nursery = self.nursery
        if nursery is None:
            return False
        ctx = contextvars.copy_context()
        return self._soon(lambda: ctx.run(nursery.start_soon, fn, *args))

    def _track(self, fut: asyncio.Future[Any]) -> None:
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """`await fn(*args, **kw)` in a trio task, from asyncio."""
        fut: asyncio.Future[T] = self.loop.create_future()
        ended: asyncio.Future[None] = self.loop.create_future()
        self._track(fut)
        self._track(ended)
        scopes: list[trio.CancelScope] = []

        async def call() -> None:
            try:
                await work()
            finally:
                if not ended.done():
                    ended.set_result(None)

        async def work() -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                if fut.done():  # cancelled before it started
                    return
                try:
                    result = await fn(*args, **kw)
                except BaseException as exc:
                    if isinstance(exc, trio.Cancelled | KeyboardInterrupt | SystemExit) \
                            or _only_cancelled(exc):
                        raise
                    if not fut.done():
                        fut.set_exception(_for_asyncio(exc))
                    return
                if not fut.done():
                    fut.set_result(result)
            if not fut.done():
                fut.cancel()

        if not self._spawn(call):
            raise _gone()
        try:
            return await fut
        except asyncio.CancelledError:
            if scopes:  # the work stops before the caller goes on (structured, both sides)
                self._soon(scopes[0].cancel)
                await asyncio.wait([ended])
            raise

    async def to_asyncio(self, coro: Awaitable[T]) -> T:
        """Await an asyncio coroutine from a trio task (a handler the user wrote)."""
        ctx = contextvars.copy_context()
        ctx.run(sniffio.current_async_library_cvar.set, None)
        task = self.loop.create_task(coro, context=ctx)  # type: ignore[arg-type]
        finished = trio.Event()
        token = self.token
        assert token is not None

        def wake(_: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished.set)

        task.add_done_callback(wake)
        try:
            await finished.wait()
        except trio.Cancelled:
            task.cancel()
            with trio.CancelScope(shield=True):
                await finished.wait()  # the handler ends before the call does
                if not task.cancelled():
                    task.exception()  # retrieved: its cleanup's error is not "lost"
            raise
        if task.cancelled():
            raise MeshError(503, "the handler was cancelled", id="sdk")
        return task.result()

    async def hold(self, enter: Callable[[], Any]) -> Held:
        """Enter the async context manager `enter()` returns in a trio task of its own,
        which keeps it open until `Held.exit`."""
        entered: asyncio.Future[Any] = self.loop.create_future()
        left: asyncio.Future[None] = self.loop.create_future()
        self._track(entered)
        self._track(left)
        held = Held(self, left)

        async def keep_open() -> None:
            with trio.CancelScope() as scope:
                held.scope = scope
                if entered.done():  # the caller gave up before it started
                    left.set_result(None)
                    return
                try:
                    async with enter() as value:
                        if entered.done():
                            return
                        held.release = trio.Event()
                        entered.set_result(value)
                        await held.release.wait()
                        if held.failure is not None:
                            raise _BodyFailed()
                except _BodyFailed:
                    pass
                except BaseException as exc:
                    if isinstance(exc, trio.Cancelled | KeyboardInterrupt | SystemExit) \
                            or _only_cancelled(exc):
                        raise
                    target = left if entered.done() else entered
                    if not target.done():
                        target.set_exception(_for_asyncio(exc))
                    return
                finally:
                    if not entered.done():
                        entered.cancel()
            if not left.done():
                left.set_result(None)

        if not self._spawn(keep_open):
            raise _gone()
        try:
            held.value = await entered
        except asyncio.CancelledError:
            held.cancel()
            raise
        return held

    async def iterate(self, items: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        """The items of the async iterator `items()` makes, fetched by one trio task, one
        each time the consumer asks (nothing is read ahead and lost)."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        want_send, want_recv = trio.open_memory_channel[None](1)
        closed: list[bool] = []

        async def pump() -> None:
            try:
                if closed:
                    return
                source = items()
                try:
                    async with want_recv:
                        async for _ in want_recv:
                            try:
                                item = await source.__anext__()
                            except StopAsyncIteration:
                                answers.put_nowait(_END)
                                return
                            answers.put_nowait(item)
                finally:
                    if inspect.isasyncgen(source):  # a generator we made; not an object
                        with trio.CancelScope(shield=True):  # the caller holds (a sub)
                            await source.aclose()
            except BaseException as exc:
                if isinstance(exc, trio.Cancelled | KeyboardInterrupt | SystemExit) \
                        or _only_cancelled(exc):
                    raise
                answers.put_nowait(_Failed(_for_asyncio(exc)))

        if not self._spawn(pump):
            raise _gone()
        try:
            while True:
                if not self._soon(want_send.send_nowait, None):
                    raise _gone()
                item = await answers.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield wrap(item)
        finally:
            closed.append(True)
            self._soon(want_send.close)


class _BodyFailed(Exception):
    """The asyncio block of a held context failed: leave the trio block with an error."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _only_cancelled(exc: BaseException) -> bool:
    """A group (trio's MultiError) holding nothing but trio cancellations."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _for_asyncio(exc: BaseException) -> BaseException:
    """What asyncio code gets: an Exception as it is, anything else as a 500 saying what."""
    if isinstance(exc, Exception):
        return exc
    return MeshError(500, f"the SDK failed: {exc!r}"[:500], id="sdk")


def _gone() -> MeshError:
    return MeshError(503, "the SDK's trio bridge ended", id="sdk")


class Held:
    """An async context manager of the trio SDK held open for asyncio code."""

    def __init__(self, bridge: Bridge, left: asyncio.Future[None]) -> None:
        self.bridge = bridge
        self.left = left
        self.value: Any = None
        self.scope: trio.CancelScope | None = None
        self.release: trio.Event | None = None
        self.failure: BaseException | None = None

    def cancel(self) -> None:
        if self.scope is not None:
            self.bridge._soon(self.scope.cancel)

    async def exit(self, failure: BaseException | None = None) -> None:
        """Leave the block: with the asyncio body's exception (the trio block sees an error:
        a publisher does not flush) or without (errors of leaving raise here)."""
        self.failure = failure
        if self.release is None or not self.bridge._soon(self.release.set):
            self.cancel()
        try:
            await asyncio.shield(self.left)
        except asyncio.CancelledError:
            self.cancel()
            await asyncio.wait([self.left])
            _retrieve(self.left)
            raise
        except Exception:
            if failure is None:
                raise  # leaving failed: the caller hears it


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if fut.done() and not fut.cancelled():
        fut.exception()


async def bridge() -> Bridge:
    """The running loop's bridge, started on first use."""
    loop = asyncio.get_running_loop()
    found = _BRIDGES.get(loop)
    if found is None:
        found = Bridge(loop)
        found.start()  # raises as is: nothing registered, no one left waiting
        _BRIDGES[loop] = found
    await found.ready.wait()
    if found.nursery is None:
        raise _gone()
    return found


async def close() -> None:
    """End the running loop's bridge now (before closing a loop not run by asyncio.run)."""
    found = _BRIDGES.get(asyncio.get_running_loop())
    if found is not None:
        found.stop()
        await asyncio.wait([found.done], timeout=5.0)


def _bridge_now() -> Bridge:
    """The bridge of the loop a trio task of it runs on (inside a handler)."""
    return _BRIDGES[asyncio.get_running_loop()]


def wrap(value: Any) -> Any:
    """An SDK object that does trio things (a subscription, a message to ack) as asyncio
    sees it; anything else (data) as it is."""
    kind = type(value)
    if isinstance(value, Proxy) or not (kind.__module__ or "").startswith(_PACKAGE):
        return value
    if hasattr(kind, "__aiter__") or hasattr(kind, "__aenter__") or any(
            inspect.iscoroutinefunction(getattr(kind, n, None)) for n in dir(kind)
            if not n.startswith("__")):
        return Proxy(value)
    return value


class _HeldContext:
    """`async with` on what an SDK method returns as an async context manager."""

    def __init__(self, enter: Callable[[], Any]) -> None:
        self._enter = enter
        self.held: Held | None = None

    async def __aenter__(self) -> Any:
        b = await bridge()
        self.held = await b.hold(self._enter)
        return wrap(self.held.value)

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        held, self.held = self.held, None
        if held is not None:
            await held.exit(exc if kind is not None else None)


class Proxy:
    """An object of the trio SDK, for asyncio: its coroutines run in trio tasks, its async
    context managers and iterators are held by one trio task each."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_held", None)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "aclose" and self._held is not None:
            return self._close_held  # the block's own task leaves it
        if inspect.isasyncgenfunction(attr):
            @functools.wraps(attr)
            def items(*args: Any, **kw: Any) -> AsyncIterator[Any]:
                return _Items(lambda: attr(*args, **kw))
            return items
        if inspect.iscoroutinefunction(attr):
            @functools.wraps(attr)
            async def call(*args: Any, **kw: Any) -> Any:
                b = await bridge()
                return wrap(await b.run(attr, *args, **kw))
            return call
        if callable(attr) and _returns_context(self._inner, name):
            @functools.wraps(attr)
            def context(*args: Any, **kw: Any) -> _HeldContext:
                return _HeldContext(lambda: attr(*args, **kw))
            return context
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    async def _close_held(self) -> None:
        held = self._held
        object.__setattr__(self, "_held", None)
        if held is not None:
            await held.__aexit__(None, None, None)

    async def __aenter__(self) -> Proxy:
        if hasattr(self._inner, "__aenter__"):
            held = _HeldContext(lambda: self._inner)
            await held.__aenter__()
            object.__setattr__(self, "_held", held)
        return self

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        held = self._held
        object.__setattr__(self, "_held", None)
        if held is not None:
            await held.__aexit__(kind, exc, tb)

    def __aiter__(self) -> AsyncIterator[Any]:
        inner = self._inner
        return _Items(lambda: inner).__aiter__()


def _returns_context(obj: Any, name: str) -> bool:
    """Whether the method `name` of obj's class is an @asynccontextmanager."""
    fn = getattr(type(obj), name, None)
    return getattr(fn, "__wrapped__", None) is not None and inspect.isasyncgenfunction(
        fn.__wrapped__)


class _Items:
    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._gen: Any = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._gen is None:
            b = await bridge()
            self._gen = b.iterate(self._make)
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()


def Client(*args: Any, **kw: Any) -> Any:
    """`meshd_sdk.Client` for asyncio: the same methods, awaited on the loop."""
    return Proxy(_client.Client(*args, **kw))


def Store(*args: Any, **kw: Any) -> Any:
    """`meshd_sdk.Store` for asyncio."""
    return Proxy(_store.Store(*args, **kw))


def Config(*args: Any, **kw: Any) -> Any:
    """`meshd_sdk.Config` for asyncio."""
    return Proxy(_store.Config(*args, **kw))


class Service:
    """`meshd_sdk.Service` for asyncio: handlers, stream handlers and subscribers are
    asyncio code; `await service.run()` serves until cancelled."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.inner = _service.Service(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @staticmethod
    def _on_trio(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn.__name__} must be an async function")

        @functools.wraps(fn)
        async def on_trio(*args: Any) -> Any:
            return await _bridge_now().to_asyncio(fn(*(wrap(a) for a in args)))
        return on_trio

    @staticmethod
    def _generator_on_trio(fn: Callable[..., AsyncIterator[Any]]
                           ) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(fn)
        async def on_trio(*args: Any) -> AsyncIterator[Any]:
            b = _bridge_now()
            source = fn(*args)
            try:
                while True:
                    try:
                        item = await b.to_asyncio(source.__anext__())
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                with trio.CancelScope(shield=True):
                    await b.to_asyncio(source.aclose())  # type: ignore[attr-defined]
        return on_trio

    def handler(self, name: str | None = None) -> Callable[[Any], Any]:
        def wrap_handler(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            self.inner.handler(name)(self._on_trio(fn))
            return fn
        return wrap_handler

    def stream(self, name: str, request: Any = Any, response: Any = Any
               ) -> Callable[[Any], Any]:
        """As the trio SDK's: an async generator (one request, many replies) or a function
        taking the stream (both ways, its send/receive awaited on the loop)."""
        def wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            on_trio = self._generator_on_trio(fn) if inspect.isasyncgenfunction(fn) \
                else self._on_trio(fn)
            self.inner.stream(name, request, response)(on_trio)
            return fn
        return wrap_stream

    def subscriber(self, pattern: str, queue: str | None = None,
                   durable: str | None = None, event: Any = Any) -> Callable[[Any], Any]:
        def wrap_subscriber(fn: Callable[..., Awaitable[Any]]
                            ) -> Callable[..., Awaitable[Any]]:
            self.inner.subscriber(pattern, queue, durable, event)(self._on_trio(fn))
            return fn
        return wrap_subscriber

    async def run(self) -> None:
        b = await bridge()
        await b.run(self.inner.run)

    async def wait_registered(self) -> None:
        b = await bridge()
        await b.run(self.inner.registered.wait)
