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
from .ops import REQUEST_SOURCE, REQUEST_TOKEN, Conn, OpTable, serve_request
from .transport import listeners as serving

log = logging.getLogger("meshd.control")
LENGTH = struct.Struct(">I")
MAX_REQUEST = 4 << 20
FIRST_REQUEST = 10.0  # seconds a new connection has to send its first request

__all__ = [
    "REQUEST_SOURCE",
    "REQUEST_TOKEN",
    "Conn",
    "ControlClient",
    "ControlServer",
    "Framed",
    "socket_path",
]


def _peer_source(stream: trio.SocketStream) -> str:
    """"uid:N" of the process at the other end of a unix socket (SO_PEERCRED)."""
    try:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return f"uid:{uid}"
    except (OSError, AttributeError, struct.error):
        return "local"


def socket_path(data_dir: Path) -> Path:
    env = os.environ.get("MESHD_ADDR")
    if env:
        return Path(env.removeprefix("unix:")).expanduser()
    return data_dir / "meshd.sock"


class Framed:
    """Length-prefixed CBOR frames on a stream, read through a buffer (one receive often
    brings several frames: fewer system calls and wake-ups on busy connections)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError
            self._buf += chunk

    async def read(self, limit: int = MAX_REQUEST) -> Any:
        await self._fill(4)
        (n,) = LENGTH.unpack_from(self._buf)
        if n > limit:
            raise MeshError(400, f"request of {n} bytes exceeds the {limit}-byte limit")
        await self._fill(4 + n)
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        try:
            return wire.loads(body, max_depth=32)
        except wire.WireError as exc:
            raise bad_request(f"request is not valid: {exc}") from None

    async def write(self, value: Any) -> None:
        data = cbor2.dumps(value)
        await self.stream.send_all(LENGTH.pack(len(data)) + data)

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
        """One client connection; whatever it does, only this connection can end."""
        framed = Framed(stream)
        REQUEST_SOURCE.set(_peer_source(stream))
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
            if not await self._handle(framed, req):
                return

    async def _handle(self, framed: Framed, req: Any) -> bool:
        return await serve_request(self.table, framed, req)


class ControlClient:
    """Talks to the local daemon; every failure is a MeshError."""

    def __init__(self, path: Path, token: str | None = None) -> None:
        self.path = path
        self.token = token
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
            await framed.write(req)
            reply = await framed.read(limit=1 << 30)
        except (EOFError, trio.BrokenResourceError):
            raise unavailable("meshd closed the control connection") from None
        if not isinstance(reply, dict):
            raise MeshError(500, "malformed reply from meshd")
        if not reply.get("ok"):
            raise MeshError.from_dict(reply.get("error"))
        return reply.get("result")

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
