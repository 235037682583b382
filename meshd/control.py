"""Local control API: CBOR requests and event streams on a unix socket in the data dir.

Rules:
- The socket is created mode 0600 inside the 0700 data dir: only the node's owner (the local
  operator) can use it. It never listens on the network.
- Framing: 4-byte big-endian length, then a CBOR map. Request: {"id", "op", "args"}.
  Reply: {"id", "ok": true, "result"} or {"id", "ok": false, "error": {id, code, detail,
  status}}. A streaming op sends {"id", "event": ...} items until either side closes.
- Every failure inside a handler becomes a structured error reply; a malformed request gets
  a 400 and the connection stays usable. Nothing a client sends can crash the node.
- The listener goes through transport/listeners.py: capped connections, a first request
  within FIRST_REQUEST seconds, EMFILE back-off; requests are decoded by meshd.wire (size and
  depth bounded, no CBOR tags).
- Clients find the socket via MESHD_ADDR (a path, optionally "unix:"-prefixed) or
  <data dir>/meshd.sock.
- A connection whose first request is `control.mux` carries many calls at once (the SDK's
  Client sends every unary request this way): each request runs in its own task as it
  arrives, replies go out in whatever order they finish, matched by `id`; at most
  MUX_IN_FLIGHT run at once per connection (the next request is read when one finishes).
  Only `call` ops: a stream or session needs a connection of its own (400). Hanging up
  cancels the calls still running.
- Writes to a connection may come from many tasks at once: frames queued while one task is
  sending go out together in the next send (one system call for many replies on a busy
  connection); a send that fails, or is cancelled once it has begun, leaves the connection
  broken for every writer (a half-sent frame cannot be taken back). A writer cancelled
  before its frame was handed over returns at once; the frame stays queued and goes out
  with the next send (a call given up on may still reach the service, as one sent just
  before its deadline would).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import trio

from . import wire
from .errors import MeshError, bad_request, unavailable
from .ops import (
    REQUEST_PGID,
    REQUEST_REMOTE,
    REQUEST_SOURCE,
    REQUEST_TOKEN,
    Conn,
    OpTable,
    serve_request,
)
from .transport import listeners as serving
from .transport.rawio import RawSocket

log = logging.getLogger("meshd.control")
LENGTH = struct.Struct(">I")
MAX_REQUEST = 4 << 20
FIRST_REQUEST = 10.0  # seconds a new connection has to send its first request
MUX_OP = "control.mux"
MUX_IN_FLIGHT = 256  # calls running at once on one multiplexed connection

__all__ = [
    "REQUEST_SOURCE",
    "REQUEST_TOKEN",
    "Conn",
    "ControlClient",
    "ControlServer",
    "Framed",
    "MuxClient",
    "socket_path",
]


def _peer(stream: trio.SocketStream) -> tuple[str, int]:
    """("uid:N", process group) of the process at the other end of a unix socket
    (SO_PEERCRED; the group looked up at once, while that process is surely the one that
    connected); ("local", 0) where the kernel does not say."""
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
    except (OSError, AttributeError, struct.error):
        return "local", 0
    try:
        group = os.getpgid(pid) if pid > 0 else 0
    except OSError:
        group = 0
    return f"uid:{uid}", group


def socket_path(data_dir: Path) -> Path:
    env = os.environ.get("MESHD_ADDR")
    if env:
        return Path(env.removeprefix("unix:")).expanduser()
    return data_dir / "meshd.sock"


class Framed:
    """Length-prefixed CBOR frames on a stream, read through a buffer (one receive often
    brings several frames: fewer system calls and wake-ups on busy connections). Any number
    of tasks may write at once: frames queued while one of them sends go out together in
    the next send. On a socket, reads and writes skip trio's scheduler round when the
    kernel has the data or the room (transport/rawio.py), and write_nowait sends at once
    when nothing else is sending (the flusher sends only what the socket did not take)."""

    concurrent_writes = True  # Conn needs no lock of its own around write()

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._out = bytearray()
        self._queued = 0  # bytes ever queued for sending
        self._sent = 0  # of which handed to the stream
        self._sending = False
        self._broken: BaseException | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self.flushing = False  # run_flusher is running: write_nowait may be used
        self.last_size = 0  # bytes of the last frame read
        # a socket: reads and writes without a scheduler round each (transport/rawio.py)
        self._raw = RawSocket.of(stream)
        self._receive = self._raw.receive_some if self._raw is not None else \
            stream.receive_some

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self._receive(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError
            self._buf += chunk

    async def read(self, limit: int = MAX_REQUEST) -> Any:
        await self._fill(4)
        (n,) = LENGTH.unpack_from(self._buf)
        if n > limit:
            raise MeshError(400, f"request of {n} bytes exceeds the {limit}-byte limit")
        await self._fill(4 + n)
        self.last_size = n
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        try:
            return wire.loads(body, max_depth=32)
        except wire.WireError as exc:
            raise bad_request(f"request is not valid: {exc}") from None

    async def write(self, value: Any) -> None:
        """Returns once this frame was handed to the stream (by this task or by whichever
        task was sending when it was queued)."""
        mine = self._queue(value)
        while self._sent < mine:
            if self._broken is not None:
                raise trio.BrokenResourceError("the connection failed while sending")
            if self._sending:
                await self._lot.park()
                continue
            await self._send_queued()

    def _queue(self, value: Any) -> int:
        """Encode a frame onto the send queue; the queue's end after it (what `_sent` must
        reach for it to be out). BrokenResourceError if the connection already failed."""
        data = cbor2.dumps(value)
        if self._broken is not None:
            raise trio.BrokenResourceError("the connection failed in an earlier write")
        self._out += LENGTH.pack(len(data))
        self._out += data
        self._queued += 4 + len(data)
        return self._queued

    async def _send_queued(self) -> None:
        """Send everything queued (no one else is sending); a failure breaks the
        connection for every writer. A writer cancelled before anything was sent leaves
        the connection whole (its frame goes out with the next send)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # send_all's own first checkpoint
        self._sending = True
        chunk = bytes(self._out)
        self._out.clear()
        try:
            if self._raw is not None:
                await self._raw.send_all(self.stream, chunk)
            else:
                await self.stream.send_all(chunk)
        except BaseException as exc:
            self._broken = exc
            raise
        finally:
            self._sending = False
            self._lot.unpark_all()
        self._sent += len(chunk)

    def write_nowait(self, value: Any) -> None:
        """Queue a frame without waiting (replies answered from callbacks, not tasks); the
        connection's flusher sends it with whatever else is queued. BrokenResourceError if
        the connection already failed."""
        if not self.flushing:
            raise RuntimeError("write_nowait needs the connection's run_flusher running")
        self._queue(value)
        if not self._sending:
            if self._raw is not None and self._send_now():
                return
            self._lot.unpark_all()

    def _send_now(self) -> bool:
        """Send what is queued at once, as far as the socket takes it (nobody is sending);
        whether all of it went. A failure breaks the connection as a failed send does."""
        try:
            n = self._raw.send_now(self._out)  # type: ignore[union-attr]
        except OSError as exc:
            self._broken = trio.BrokenResourceError(str(exc))
            return False  # the flusher learns it and stops
        self._sent += n
        del self._out[:n]
        return not self._out

    async def run_flusher(self) -> None:
        """Send what write_nowait queues, until cancelled or the connection fails."""
        self.flushing = True
        try:
            while True:
                if not self._out or self._sending:
                    await self._lot.park()
                    continue
                try:
                    await self._send_queued()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
        finally:
            self.flushing = False

    async def aclose(self) -> None:
        await self.stream.aclose()


class ControlServer:
    """Serves the node's op table to the local operator on a unix socket."""

    def __init__(self, path: Path, table: OpTable) -> None:
        self.path = path
        self.table = table
        self.stats: dict[str, int] = {}
        self.gate = serving.Gate("control", self.stats, pending_timeout=FIRST_REQUEST)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # stale: the data dir lock proves no node is using it
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(1024)
        listener = trio.SocketListener(sock)
        try:
            await serving.serve([listener], self._serve, self.gate, task_status=task_status)
        finally:
            self.path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream, ticket: serving.Ticket) -> None:
        """One client connection; whatever it does, only this connection can end. Its
        flusher sends what handlers queue with write_nowait."""
        framed = Framed(stream)
        source, group = _peer(stream)
        REQUEST_SOURCE.set(source)
        REQUEST_PGID.set(group)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(framed.run_flusher)
            await self._serve_requests(framed, ticket)
            nursery.cancel_scope.cancel()

    async def _serve_requests(self, framed: Framed, ticket: serving.Ticket) -> None:
        while True:
            req = None
            try:
                if ticket.pending:
                    with trio.move_on_at(ticket.deadline):
                        req = await framed.read()
                    if req is None:
                        return  # no first request in time
                else:
                    req = await framed.read()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except MeshError as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await framed.write({"id": None, "ok": False, "error": exc.to_dict()})
                return
            ticket.authenticated()
            if isinstance(req, dict) and req.get("op") == MUX_OP:
                await self._mux(framed, req)
                return
            if not await self._handle(framed, req):
                return

    async def _handle(self, framed: Framed, req: Any) -> bool:
        return await serve_request(self.table, framed, req)

    async def _mux(self, framed: Framed, first: dict[str, Any]) -> None:
        """A multiplexed connection: every request a task, at most MUX_IN_FLIGHT at once;
        only calls (a stream or session would take the connection over)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await framed.write({"id": first.get("id"), "ok": True,
                                "result": {"in_flight": MUX_IN_FLIGHT}})
        room = trio.Semaphore(MUX_IN_FLIGHT)

        async def run(req: Any) -> None:
            try:
                await self._handle(framed, req)
            finally:
                room.release()

        def fast(op: Any, req: dict[str, Any]) -> bool:
            """Hand a call to its op's fast path (answered from a callback, no task)."""
            args = req.get("args") or {}
            token = req.get("token")
            if not isinstance(args, dict) or (token is not None and not isinstance(token, str)):
                return False
            rid = req.get("id")

            def finish(result: Any, error: MeshError | None) -> None:
                room.release()
                if not framed.flushing:
                    return  # the client hung up (its flusher stopped): nobody to answer
                frame = {"id": rid, "ok": True, "result": result} if error is None else \
                    {"id": rid, "ok": False, "error": error.to_dict()}
                try:
                    framed.write_nowait(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                except Exception:  # e.g. a result that does not encode: this reply only
                    log.exception("reply to a fast call of %s failed", op.name)

            REQUEST_TOKEN.set(token or None)
            if req.get("remote") is True:
                REQUEST_REMOTE.set(True)
            try:
                self.table.admit(op, args)
                return bool(op.fast(args, token or None, finish, framed.last_size))
            except MeshError:
                return False  # the ordinary path says why
            except Exception:  # a bug in a fast path: the ordinary path answers (or 500s)
                log.exception("fast path of %s failed", op.name)
                return False

        async with trio.open_nursery() as nursery:
            while True:
                try:
                    req = await framed.read()
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                except MeshError as exc:  # unreadable: the stream cannot be trusted after it
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await framed.write({"id": None, "ok": False, "error": exc.to_dict()})
                    break
                op = self.table.get(req.get("op")) if isinstance(req, dict) and \
                    isinstance(req.get("op"), str) else None
                if op is not None and op.kind != "call":
                    error = bad_request(f"{op.name} is a {op.kind}: it needs a connection of "
                                        f"its own, not one opened with {MUX_OP}")
                    try:
                        await framed.write({"id": req.get("id"), "ok": False,
                                            "error": error.to_dict()})
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    continue
                await room.acquire()
                if op is not None and op.fast is not None and fast(op, req):
                    continue
                nursery.start_soon(run, req)
            nursery.cancel_scope.cancel()  # the caller hung up: its calls are not wanted


def _result(reply: Any) -> Any:
    """The result of a call's reply; MeshError for an error reply or a malformed one."""
    if not isinstance(reply, dict):
        raise MeshError(500, "malformed reply from meshd")
    if not reply.get("ok"):
        raise MeshError.from_dict(reply.get("error"))
    return reply.get("result")


class ControlClient:
    """Talks to the local daemon; every failure is a MeshError."""

    def __init__(self, path: Path, token: str | None = None, remote: bool = False) -> None:
        self.path = path
        self.token = token
        self.remote = remote  # act as a remote caller (with the token, or as nobody)
        self._stream: trio.SocketStream | None = None
        self._framed: Framed | None = None
        self._next = 0

    async def _connect(self) -> Framed:
        if self._framed is None:
            try:
                self._stream = await trio.open_unix_socket(str(self.path))
                self._framed = Framed(self._stream)
            except (FileNotFoundError, ConnectionRefusedError):
                raise unavailable(f"no meshd is running at {self.path}; start one with "
                                  "`meshd up` (or point MESHD_ADDR / --data-dir at it)"
                                  ) from None
            except PermissionError:
                raise MeshError(403, f"no permission to use {self.path}; run as the "
                                     "user that runs meshd") from None
            except OSError as exc:  # out of descriptors, a socket path too long...
                raise unavailable(f"cannot reach meshd at {self.path}: "
                                  f"{exc.strerror or exc}") from None
        return self._framed

    async def call(self, op: str, /, **args: Any) -> Any:
        framed = await self._connect()
        self._next += 1
        try:
            req = {"id": self._next, "op": op, "args": args}
            if self.token:
                req["token"] = self.token
            if self.remote:
                req["remote"] = True
            await framed.write(req)
            reply = await framed.read(limit=1 << 30)
        except (EOFError, trio.BrokenResourceError):
            raise unavailable("meshd closed the control connection") from None
        return _result(reply)

    async def stream(self, op: str, /, **args: Any) -> AsyncIterator[Any]:
        """The events of a streaming op; a refusal or failure the daemon sends once the
        stream started (the rules checked by the op itself) is raised as MeshError."""
        await self.call(op, **args)
        assert self._framed is not None
        while True:
            try:
                item = await self._framed.read(limit=1 << 30)
            except (EOFError, trio.BrokenResourceError):
                return
            if isinstance(item, dict) and "event" in item:
                yield item["event"]
            elif isinstance(item, dict) and item.get("ok") is False:
                raise MeshError.from_dict(item.get("error"))

    async def session(self, op: str, /, **args: Any) -> tuple[Any, Conn]:
        """Open a two-way session (e.g. a service registration)."""
        result = await self.call(op, **args)
        assert self._framed is not None
        return result, Conn(self._framed, None)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None
            self._framed = None


class _Waiter:
    """One call on a MuxClient: its reply, and the event that wakes its task."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.reply: Any = None
        self.event = trio.Event()


class MuxClient:
    """Many calls at once over one control connection (`control.mux`); every failure is a
    MeshError. No task of its own: a caller waiting for its reply reads the connection for
    everyone until its own reply comes, then hands reading to another waiting caller, so it
    can be used from any task without a nursery."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed: MeshError | None = None
        self._client: ControlClient | None = None
        self._opening = trio.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._next = 0
        self._reading = False

    async def _open(self) -> Framed:
        async with self._opening:
            if self._client is None:
                client = ControlClient(self.path)
                try:
                    await client.call(MUX_OP)
                except BaseException:
                    await client.aclose()
                    raise
                self._client = client
        assert self._client._framed is not None
        return self._client._framed

    def _fail(self, error: MeshError) -> MeshError:
        if self.failed is None:
            self.failed = error
            for waiter in self._pending.values():
                waiter.event.set()
        return self.failed

    async def call(self, op: str, args: dict[str, Any], token: str | None = None) -> Any:
        if self.failed is not None:
            raise self.failed
        framed = self._client._framed if self._client is not None else None
        if framed is None:
            framed = await self._open()
        self._next += 1
        rid = self._next
        waiter = self._pending[rid] = _Waiter()
        req: dict[str, Any] = {"id": rid, "op": op, "args": args}
        if token:
            req["token"] = token
        try:
            try:
                await framed.write(req)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._fail(unavailable("meshd closed the control connection")) from None
            while waiter.reply is None:
                if self.failed is not None:
                    raise self.failed
                if not self._reading:
                    await self._read_until(waiter, framed)
                else:
                    await waiter.event.wait()
                    waiter.event = trio.Event()
        finally:
            del self._pending[rid]
        return _result(waiter.reply)

    async def _read_until(self, mine: _Waiter, framed: Framed) -> None:
        """Read replies for every waiting call until `mine` has its own; then wake another
        waiting call to read on."""
        self._reading = True
        try:
            while mine.reply is None:
                try:
                    frame = await framed.read(limit=1 << 30)
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                        MeshError):
                    raise self._fail(unavailable("meshd closed the control connection")
                                     ) from None
                waiter = self._pending.get(frame.get("id")) if isinstance(frame, dict) \
                    else None
                if waiter is None or waiter.reply is not None:
                    continue  # the reply of a call given up on (cancelled)
                waiter.reply = frame
                waiter.event.set()
        finally:
            self._reading = False
            if self.failed is None:
                for waiter in self._pending.values():
                    if waiter.reply is None and waiter is not mine:
                        waiter.event.set()  # its turn to read
                        break

    async def aclose(self) -> None:
        self._fail(unavailable("the client was closed"))
        if self._client is not None:
            await self._client.aclose()
