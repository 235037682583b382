"""Serving connections: every stream listener of the node accepts through here.

Theory of operation
-------------------
A listener owns a :class:`Gate`: each accepted connection asks it for a :class:`Ticket`
before anything else happens. A connection is *pending* until its handler calls
``ticket.authenticated()`` (the link handshake finished, the proxy's first message checked
out, the control request arrived), then *open* until it ends.

Rules:
- A handler's failure ends its connection only. Any exception (a peer that reset mid-
  handshake, a decoder that raised, a bug) is caught here, counted and logged; it never
  reaches the listener or the node's nursery.
- Caps: at most ``max_pending`` connections of a listener may be pending and at most
  ``max_open`` open (pending ones included). A new connection that finds the pending cap
  full evicts the oldest pending one (as SYN-flood defences drop the oldest half-open
  connection): idle connections cannot lock out a peer that completes its handshake
  promptly. One over the open cap is closed at once, before a byte is read. Both are
  counted. The defaults come from the process's open-file limit (``default_caps``), so a
  flood of idle connections cannot take the descriptors the node needs for its links, its
  store and its service sessions.
- Per source address at most ``max_per_source`` connections may be open (a quarter of
  ``max_open`` by default): one host cannot take every slot, even with connections it
  authenticates (a holder of the cluster secret can complete link handshakes). A source at
  its cap first loses its own oldest pending connection; with none, the new one is closed.
- A pending connection has ``pending_timeout`` seconds to authenticate; the handler runs
  its pre-authentication part under ``ticket.deadline`` (trio time).
- accept() failing for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs
  off (100 ms doubling to 1 s) and retries: the listener stays up and drains its backlog once
  descriptors are free again. It is counted and logged at most once a minute.
- WebSocket listeners (``serve_websocket``) run the HTTP upgrade inside the pending deadline
  with trio-websocket's stream wrapper, so a reset or a slow upgrade ends that connection and
  nothing else.
- TLS listeners (``tls_handler``) run the TLS handshake inside the same pending deadline,
  before any upgrade or first message: a plain-text client, a client that distrusts the
  certificate, garbage or a stalled handshake end that connection only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger("meshd.transport.listeners")

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_START, BACKOFF_MAX = 0.1, 1.0


def default_caps() -> tuple[int, int]:
    """(max_open, max_pending) per listener from the open-file limit: an eighth of the
    descriptors may wait in handshakes on one listener, a third may be open on it. With the
    common limit of 1024 that is 128 and 341; with 256 it is 32 and 85, which leaves room
    for the node's own links, files and service sessions even with every listener full."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 65536
    return max(16, min(16384, soft // 3)), max(8, min(1024, soft // 8))


class Ticket:
    """One admitted connection: pending until authenticated, released when it ends."""

    __slots__ = ("_gate", "_open", "_pending", "deadline", "scope", "source")

    def __init__(self, gate: Gate, deadline: float, source: str | None = None) -> None:
        self._gate = gate
        self._pending = True
        self._open = True
        self.deadline = deadline
        self.scope = trio.CancelScope()  # cancelled to evict the connection
        self.source = source

    @property
    def pending(self) -> bool:
        """Not authenticated yet (still under the pending deadline and cap)."""
        return self._pending

    def authenticated(self) -> None:
        """The connection proved itself: it no longer counts against the pending cap."""
        if self._pending:
            self._pending = False
            self._gate.pending -= 1
            self._gate._waiting.pop(self, None)

    def release(self) -> None:
        if self._pending:
            self.authenticated()
        if self._open:
            self._open = False
            self._gate.open -= 1
            if self.source is not None:
                gate = self._gate
                left = gate._by_source.get(self.source, 1) - 1
                if left > 0:
                    gate._by_source[self.source] = left
                else:
                    gate._by_source.pop(self.source, None)


class Gate:
    """Counts one listener's connections against its caps; stats use the listener's name."""

    def __init__(self, name: str, stats: dict[str, int], max_open: int = 0,
                 max_pending: int = 0, pending_timeout: float = 10.0,
                 max_per_source: int = 0) -> None:
        d_open, d_pending = default_caps()
        self.name = name
        self.max_open = max_open or d_open
        self.max_pending = min(max_pending or d_pending, self.max_open)
        self.max_per_source = max_per_source or max(8, self.max_open // 4)
        self._by_source: dict[str, int] = {}
        self.pending_timeout = pending_timeout
        self.open = 0
        self.pending = 0
        self._waiting: dict[Ticket, None] = {}  # pending tickets, oldest first
        self.stats = stats
        for key in ("accepted", "refused_cap", "refused_source", "evicted", "failed",
                    "accept_errors"):
            stats.setdefault(f"{name}_{key}", 0)
        self._last_warned = -1e9

    def _warn(self, what: str) -> None:
        now = trio.current_time()
        if now - self._last_warned > 60:
            self._last_warned = now
            log.warning("%s: %s (%d open, %d pending; caps %d/%d)", self.name, what,
                        self.open, self.pending, self.max_open, self.max_pending)

    def _evict(self, ticket: Ticket) -> None:
        ticket.authenticated()  # no longer pending: it is on its way out
        ticket.scope.cancel()
        self.stats[f"{self.name}_evicted"] += 1

    def admit(self, source: str | None = None) -> Ticket | None:
        if source is not None and self._by_source.get(source, 0) >= self.max_per_source:
            own = next((t for t in self._waiting if t.source == source), None)
            if own is None:
                self.stats[f"{self.name}_refused_source"] += 1
                self._warn(f"{source} holds its share of connections: closing new ones")
                return None
            self._evict(own)
        if self.pending >= self.max_pending and self._waiting:
            self._evict(next(iter(self._waiting)))
            self._warn("pending cap reached: evicting the oldest unauthenticated "
                       "connections")
        if self.open >= self.max_open:
            self.stats[f"{self.name}_refused_cap"] += 1
            self._warn("connection cap reached: closing new connections until some end")
            return None
        self.open += 1
        self.pending += 1
        self.stats[f"{self.name}_accepted"] += 1
        ticket = Ticket(self, trio.current_time() + self.pending_timeout, source)
        if source is not None:
            self._by_source[source] = self._by_source.get(source, 0) + 1
        self._waiting[ticket] = None
        return ticket

    def failed(self, exc: BaseException) -> None:
        self.stats[f"{self.name}_failed"] += 1
        expected = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    OSError, EOFError, ValueError, _ws_closed())
        if isinstance(exc, expected):
            log.debug("%s: connection ended: %s: %s", self.name, type(exc).__name__, exc)
        else:  # a bug, not a peer's doing: keep the traceback, keep serving
            log.warning("%s: connection handler failed", self.name, exc_info=exc)


Handler = Callable[[Any, Ticket], Awaitable[None]]


def _ws_closed() -> type[BaseException]:
    """trio-websocket's ConnectionClosed (a peer that went away), if it is loaded."""
    import sys

    module = sys.modules.get("trio_websocket")
    return getattr(module, "ConnectionClosed", EOFError) if module else EOFError


def must_propagate(exc: BaseException) -> BaseException | None:
    """What of `exc` must propagate (cancellation, KeyboardInterrupt); None if it is all
    ordinary errors that end only this connection."""
    if isinstance(exc, Exception) and not isinstance(exc, BaseExceptionGroup):
        return None
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(Exception)
        return rest
    return exc


async def run_guarded(gate: Gate, ticket: Ticket, handler: Handler, stream: Any) -> None:
    """Run one connection's handler; whatever it raises ends this connection only."""
    try:
        with ticket.scope:
            await handler(stream, ticket)
    except BaseException as exc:  # sorted below: only errors are contained
        rest = must_propagate(exc)
        if rest is not None:
            raise
        gate.failed(exc)
    finally:
        ticket.release()
        # the connection is gone either way: close it quietly, even when cancelled
        with trio.CancelScope(shield=True), trio.move_on_after(1), \
                contextlib.suppress(Exception):
            await stream.aclose()


async def _accept_loop(listener: trio.abc.Listener[Any], handler: Handler, gate: Gate,
                       nursery: trio.Nursery) -> None:
    backoff = BACKOFF_START
    last_logged = -1e9
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            gate.stats[f"{gate.name}_accept_errors"] += 1
            now = trio.current_time()
            if now - last_logged > 60:
                last_logged = now
                log.warning("%s: accept failed (%s): backing off; raise the open-file "
                            "limit (ulimit -n) if this persists", gate.name,
                            errno.errorcode.get(exc.errno or 0, exc))
            await trio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)
            continue
        backoff = BACKOFF_START
        ticket = gate.admit(_source(stream))
        if ticket is None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            continue
        nursery.start_soon(run_guarded, gate, ticket, handler, stream)


def _source(stream: Any) -> str | None:
    """The peer's IP address (None for unix sockets and what has none)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        transport = getattr(stream, "transport_stream", None)  # TLS over TCP
        sock = getattr(transport, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    return peer[0] if isinstance(peer, tuple) and peer else None


async def serve(listeners: list[Any], handler: Handler, gate: Gate,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept on every listener until cancelled; each connection runs handler(stream,
    ticket) in its own task under the gate's caps."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, gate, nursery)
        task_status.started(listeners)


async def open_tcp(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


async def serve_tcp(host: str, port: int, handler: Handler, gate: Gate,
                    tls: ssl.SSLContext | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on host:port and serve until cancelled (https/TLS only with `tls`, the
    handshake within the pending deadline); started with the bound port. A bind failure
    raises OSError before that."""
    listeners = await open_tcp(host, port)
    bound = listeners[0].socket.getsockname()[1]
    on_stream = handler if tls is None else tls_handler(handler, tls)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, listeners, on_stream, gate)
        task_status.started(bound)


def websocket_handler(handler: Callable[[Any, Ticket], Awaitable[None]],
                      max_message_size: int) -> Handler:
    """A stream handler that does the WebSocket upgrade within the ticket's deadline, then
    hands the accepted WebSocket to `handler` (which authenticates the ticket itself)."""
    import trio_websocket

    async def on_stream(stream: Any, ticket: Ticket) -> None:
        async with trio.open_nursery() as nursery:
            ws = None
            with trio.move_on_at(ticket.deadline):
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, max_message_size=max_message_size)
                try:
                    ws = await request.accept()
                except (trio_websocket.ConnectionClosed,
                        trio_websocket.HandshakeError) as exc:  # a peer gone mid-upgrade
                    raise trio.BrokenResourceError(f"closed during the upgrade: {exc}"
                                                   ) from None
            if ws is None:
                nursery.cancel_scope.cancel()
                raise trio.TooSlowError("WebSocket upgrade did not finish in time")
            try:
                await handler(ws, ticket)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1), \
                        contextlib.suppress(Exception):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    return on_stream


def tls_handler(handler: Handler, context: ssl.SSLContext) -> Handler:
    """A stream handler that runs the server side of a TLS handshake within the ticket's
    deadline, then hands the encrypted stream to `handler` (still pending: the upgrade and
    first message that follow share the same deadline)."""

    async def on_stream(stream: Any, ticket: Ticket) -> None:
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        done = False
        with trio.move_on_at(ticket.deadline):
            await tls.do_handshake()  # a failed handshake raises BrokenResourceError
            done = True
        if not done:
            raise trio.TooSlowError("TLS handshake did not finish in time")
        await handler(tls, ticket)

    return on_stream
