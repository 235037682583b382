"""The gateway's HTTP/1.1 connections: h11 drives the protocol, this loop drives the IO and
runs the ASGI app once per request, in the connection's own task.

Why not hypercorn for every request: on trio, hypercorn's connection handler costs about
480 µs of CPU per request before the app runs (a task, a task group and several channels
and cancel scopes per request; headers and body in two writes), four times uvicorn's, and
the gateway's throughput goal is set against nginx (docs/benchmarks.md, issue 16). A
WebSocket upgrade is still handed to hypercorn's handler (which speaks WebSocket), with the
request head replayed in front of the connection's unread bytes.

Theory of operation
-------------------
One h11.Connection per TCP (or TLS) connection. The loop waits for a request head (at most
api.read_timeout for the first and while one is half-sent, api.keep_alive between
requests), builds the ASGI scope and calls the app with `receive` (the body's chunks as
they arrive, then, once the body is in, waiting for the client to go: http.disconnect) and
`send` (the response head is held until the first body chunk so both leave in one write;
a body without Content-Length is chunked by h11). Then the next request on the same
connection, or close.

Rules:
- Bounds: the request head at api.max_header_bytes (431 beyond, h11's limit), bytes read
  while a response streams (pipelined requests) at MAX_AHEAD (then reading stops until the
  response ends), every write at most api.timeout (a client that does not read is dropped).
- `receive` times body reads itself: a body that stops arriving for api.read_timeout raises
  a 408 MeshError into the app (scope extension "meshd.timed": the app sets no timer of its
  own). Timers cost: only waits that must wait get one.
- A malformed request gets 400 (h11's status hint: 431 for a head too large, 505 for a
  version it cannot speak) with the structured error as JSON, then the connection closes;
  so does a request with both Content-Length and Transfer-Encoding (smuggling).
- A request head's first bytes must come within read_timeout (the first request) or
  api.keep_alive (the next ones), and the whole head within read_timeout of its first byte,
  however slowly it trickles.
- A body the app did not read (it answered first) is read and dropped when it is at most
  DRAIN_MAX, so the connection goes on; a larger or chunked one gets Connection: close.
- `Expect: 100-continue` is answered when the app first reads the body. HEAD answers carry
  no body. Every response carries Date.
- Whatever the app raises ends this connection only (a 500 if nothing was sent yet). A write
  that finds the client gone raises ClientGone (bodies.py) into the app, which stops and
  logs nothing; a send after that is dropped.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import time
from typing import Any
from urllib.parse import unquote

import h11
import trio

from meshd.errors import MeshError
from meshd.settings import ApiSettings, WebSettings

from .bodies import TIMED, ClientGone, dumps

log = logging.getLogger("meshd.api")
CHUNK = 64 * 1024
MAX_AHEAD = 256 * 1024  # bytes read ahead while a response streams (pipelined requests)
DRAIN_MAX = 64 * 1024  # an unread body up to this is read and dropped to keep the connection
ID = "meshd.api"


class _Closed(ClientGone):
    """The client went away or broke the protocol: end the connection."""


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = email.utils.formatdate(second, usegmt=True).encode()
        return self.value


class Http11:
    """Serves one connection at a time per call of `serve` (one task per connection)."""

    def __init__(self, app: Any, settings: ApiSettings | WebSettings, upgrade: Any,
                 scheme: str) -> None:
        self.app = app
        self.s = settings
        self.upgrade = upgrade  # async (stream, head bytes) -> None: a WebSocket's handler
        self.scheme = scheme
        self.date = _Date()

    async def serve(self, stream: Any) -> None:
        # One cancel scope for the connection's waits (a request head, a write): its
        # deadline is moved for each and put back after (cheaper than a scope each); when
        # it passes, the connection ends.
        with trio.CancelScope() as guard:
            await self._serve(stream, guard)

    async def _serve(self, stream: Any, guard: trio.CancelScope) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.s.max_header_bytes)
        client, server = _addresses(stream)
        wait = self.s.read_timeout
        while True:
            try:
                event = await self._next(conn, stream, wait, guard)
            except _Closed:
                return
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, stream, exc)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            if _ambiguous(event):  # both framings: what a proxy in front reads may differ
                await self._refuse(conn, stream, h11.RemoteProtocolError(
                    "both Content-Length and Transfer-Encoding", error_status_hint=400))
                return
            if _wants_websocket(event):
                head = _head(event) + conn.trailing_data[0]
                await self.upgrade(stream, head)
                return
            request = _Request(self, conn, stream, event, guard)
            try:
                await self.app(request.scope(client, server, self.scheme), request.receive,
                               request.send)
                await request.finish()
            except _Closed:
                return
            except Exception:
                log.exception("api connection handler failed")
                await request.fail()
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # the app left the body unread, or either side must close
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            wait = self.s.keep_alive

    async def _next(self, conn: h11.Connection, stream: Any, wait: float,
                    guard: trio.CancelScope) -> Any:
        """The next request head (or ConnectionClosed): its first bytes within `wait`, the
        whole head within read_timeout of them however slowly it trickles (the guard ends
        the connection otherwise). Reads of at most max_header_bytes, so a head over the
        limit is refused even when it arrives in one piece."""
        deadline = trio.current_time() + wait
        started = False
        limit = self.s.max_header_bytes
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                if type(event) is h11.Request and _head_size(event) > limit:
                    raise h11.RemoteProtocolError("request head too large",
                                                  error_status_hint=431)
                return event
            guard.deadline = deadline
            try:
                conn.receive_data(await _receive(stream, limit))
            finally:
                guard.deadline = math.inf
            if not started:
                started = True
                deadline = trio.current_time() + self.s.read_timeout

    async def _refuse(self, conn: h11.Connection, stream: Any,
                      exc: h11.RemoteProtocolError) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        detail = "request head too large" if status == 431 else f"malformed request: {exc}"
        body = dumps({"id": ID, "code": "bad_request", "detail": detail, "status": status})
        try:
            data = conn.send(h11.Response(status_code=status, headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                (b"date", self.date.now())])) + conn.send(h11.Data(data=body)) + \
                conn.send(h11.EndOfMessage())
            with trio.move_on_after(self.s.timeout):
                await stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError):
            pass


class _Request:
    """One request's ASGI receive and send."""

    __slots__ = ("conn", "event", "gone", "guard", "head", "in_done", "owner", "started",
                 "stream")

    def __init__(self, owner: Http11, conn: h11.Connection, stream: Any,
                 event: h11.Request, guard: trio.CancelScope) -> None:
        self.owner = owner
        self.guard = guard
        self.conn = conn
        self.stream = stream
        self.event = event
        self.head: h11.Response | None = None  # held until the first body chunk
        self.started = False
        self.in_done = False
        self.gone = False

    def scope(self, client: Any, server: Any, scheme: str) -> dict[str, Any]:
        target = self.event.target
        raw_path, _, query = target.partition(b"?")
        if raw_path.startswith((b"http://", b"https://")):  # absolute form: the path only
            raw_path = b"/" + raw_path.split(b"/", 3)[-1] if raw_path.count(b"/") >= 3 \
                else b"/"
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": self.event.http_version.decode(),
                "method": self.event.method.decode("ascii", "replace").upper(),
                "scheme": scheme, "path": unquote(raw_path.decode("latin-1")),
                "raw_path": raw_path, "query_string": query, "root_path": "",
                "headers": list(self.event.headers), "client": client, "server": server,
                "extensions": {TIMED: True}}

    async def receive(self) -> dict[str, Any]:
        if self.gone:
            return {"type": "http.disconnect"}
        if self.in_done:
            return await self._await_disconnect()
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            await self._write(conn.send(h11.InformationalResponse(status_code=100,
                                                                 headers=[])))
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                self.gone = True
                return {"type": "http.disconnect"}
            if event is h11.NEED_DATA:  # the body is not all here: wait, at most read_timeout
                timeout = self.owner.s.read_timeout
                with trio.move_on_after(timeout) as waited:
                    try:
                        conn.receive_data(await _receive(self.stream))
                    except _Closed:
                        self.gone = True
                        return {"type": "http.disconnect"}
                if waited.cancelled_caught:
                    raise MeshError(408, f"the body did not arrive within {timeout:g} s",
                                    id=ID)
                continue
            if isinstance(event, h11.Data):
                return {"type": "http.request", "body": bytes(event.data), "more_body": True}
            if isinstance(event, h11.EndOfMessage):
                self.in_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            self.gone = True  # ConnectionClosed mid-body
            return {"type": "http.disconnect"}

    async def _await_disconnect(self) -> dict[str, Any]:
        """The body is in: wait for the client to go (SSE and streamed answers watch this);
        bytes that arrive meanwhile are the next requests, kept for later (bounded)."""
        read = 0
        while read < MAX_AHEAD:
            try:
                data = await _receive(self.stream)
            except _Closed:
                break
            read += len(data)
            self.conn.receive_data(data)
        else:
            await trio.sleep_forever()
        self.gone = True
        return {"type": "http.disconnect"}

    async def send(self, msg: dict[str, Any]) -> None:
        if self.gone:
            return
        kind = msg["type"]
        if kind == "http.response.start":
            headers = [(k, v) for k, v in msg.get("headers", [])]
            headers.append((b"date", self.owner.date.now()))
            if not self.in_done and (_large_body(self.event) or  # answered before it was read
                                     self.conn.they_are_waiting_for_100_continue):
                headers.append((b"connection", b"close"))
            self.head = h11.Response(status_code=msg["status"], headers=headers)
            return
        if kind != "http.response.body" or (self.head is None and not self.started):
            return
        body = msg.get("body", b"")
        more = msg.get("more_body", False)
        out = b""
        conn = self.conn
        if self.head is not None:
            out = conn.send(self.head)
            self.head = None
            self.started = True
        if body and self.event.method != b"HEAD":
            out += conn.send(h11.Data(data=body))
        if not more:
            out += conn.send(h11.EndOfMessage())
        if out:
            await self._write(out)

    async def _write(self, data: bytes) -> None:
        """Send within api.timeout (the connection's guard: a client that does not read
        is let go)."""
        guard = self.guard
        guard.deadline = trio.current_time() + self.owner.s.timeout
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.gone = True
            raise _Closed from None
        finally:
            guard.deadline = math.inf

    async def finish(self) -> None:
        """After the app returned: a response it never finished is ended here."""
        if self.gone:
            raise _Closed
        if self.conn.our_state is h11.SEND_RESPONSE:
            await self.fail()
        elif self.conn.our_state is h11.SEND_BODY:
            await self._write(self.conn.send(h11.EndOfMessage()))
        await self._drain()

    async def _drain(self) -> None:
        """Read what is left of a small request body the app did not read (a bodyless
        request's end, a body answered with an error), so the connection serves the next
        request; a large one was answered with Connection: close instead."""
        conn = self.conn
        left = DRAIN_MAX
        while conn.their_state is h11.SEND_BODY and conn.our_state is h11.DONE:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(self.owner.s.read_timeout):
                    data = await _receive(self.stream)
                    left -= len(data)
                    if left < 0:
                        raise _Closed
                    conn.receive_data(data)
                    continue
                raise _Closed
            if not isinstance(event, h11.Data | h11.EndOfMessage):
                raise _Closed

    async def fail(self) -> None:
        """A 500 if nothing was sent yet (the app failed), else close."""
        if self.started or self.gone or self.conn.our_state is not h11.SEND_RESPONSE:
            return
        self.head = None
        body = dumps({"id": ID, "code": "error", "detail": "the gateway failed on this "
                      "request (see the node's log)", "status": 500})
        await self.send({"type": "http.response.start", "status": 500, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        with contextlib.suppress(_Closed):
            await self.send({"type": "http.response.body", "body": body})


async def _receive(stream: Any, n: int = CHUNK) -> bytes:
    try:
        data = await stream.receive_some(n)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        raise _Closed from None
    if not data:
        raise _Closed
    return data


def _head_size(event: h11.Request) -> int:
    """The size of a request head as h11 parsed it (a little under its bytes: h11 strips
    whitespace): h11 checks max_incomplete_event_size only while a head is incomplete, so a
    head that completes within a second read of max_header_bytes would pass unchecked."""
    return len(event.method) + len(event.target) + 12 + sum(
        len(name) + len(value) + 4 for name, value in event.headers)


def _ambiguous(event: h11.Request) -> bool:
    """A request with both Content-Length and Transfer-Encoding (request smuggling: h11
    would read it chunked, a proxy in front might not)."""
    names = {name for name, _ in event.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _large_body(event: h11.Request) -> bool:
    """Whether the request's body may be larger than DRAIN_MAX (chunked: unknown)."""
    for name, value in event.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return not value.isdigit() or int(value) > DRAIN_MAX
    return False


def _wants_websocket(event: h11.Request) -> bool:
    for name, value in event.headers:
        if name == b"upgrade" and value.lower() == b"websocket":
            return True
    return False


def _head(event: h11.Request) -> bytes:
    """The request head again, for a handler that reads it from the stream itself."""
    lines = [b"%s %s HTTP/%s" % (event.method, event.target, event.http_version)]
    lines += [b"%s: %s" % (k, v) for k, v in event.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _addresses(stream: Any) -> tuple[Any, Any]:
    sock = getattr(stream, "socket", None)
    if sock is None:
        sock = getattr(getattr(stream, "transport_stream", None), "socket", None)
    try:
        peer, me = sock.getpeername(), sock.getsockname()
        return (peer[0], peer[1]), (me[0], me[1])
    except (AttributeError, OSError, TypeError, IndexError):
        return None, None


class Replay:
    """A stream that gives `head` before what its stream still has to give (a WebSocket's
    request head, read already, for hypercorn's handler); otherwise the stream itself."""

    def __init__(self, stream: Any, head: bytes) -> None:
        self._stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            n = max_bytes or len(self._head)
            out, self._head = self._head[:n], self._head[n:]
            return out
        return await self._stream.receive_some(max_bytes)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
