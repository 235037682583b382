"""Sends and receives on a link's TCP socket without a scheduler round per call.

trio's SocketStream yields to the scheduler after every successful send and receive (a full
run-loop pass: measured ~15 us each on the 2-core project host, against ~2 us for the
system call itself), and a callback cannot send at all: it must wake a task that does. On a
link that carries one small frame per call each way, those rounds were most of a call's
cost. RawSocket does the system call at once, non-blocking, and leaves waiting to trio.

Rules:
- `of(stream)` wraps only a trio.SocketStream (TCP or unix); anything else (WebSocket,
  relayed channel) gets None and goes through its stream as before.
- It reads and writes the stream's own socket (os.read on its descriptor, socket.send
  with MSG_NOSIGNAL, so a reset peer never raises SIGPIPE whatever its disposition; trio
  made it non-blocking) and owns nothing: trio's stream stays the owner of the connection. The
  descriptor is asked for at every call, so once the stream is closed (-1) a call fails
  (OSError) instead of touching a descriptor number the process reused.
- `send_now` sends what the kernel takes now and says how much (0 when its buffer is full):
  the caller queues the rest for a task, or sends it through trio's stream, in order. It
  raises OSError when the connection failed. A task that sends this way yields every
  YIELD_EVERY writes (Link._write), so a sender whose writes all go at once cannot starve
  the other tasks either.
- `receive_some` returns data already there without yielding, up to YIELD_EVERY times in a
  row; then it yields once, so a link that always has data cannot starve the other tasks.
  With nothing there it waits for the socket in trio (cancellable). A cancelled caller
  reads nothing; bytes read are returned even if a cancel arrives during the yield.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import trio

YIELD_EVERY = 8  # receives in a row without a yield
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


class RawSocket:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._trio_sock = stream.socket
        self._sock: socket.socket = stream.socket._sock  # type: ignore[attr-defined]
        self._streak = 0
        self.writes = 0  # writes sent whole by send_now (the link yields every YIELD_EVERY)

    @classmethod
    def of(cls, stream: Any) -> RawSocket | None:
        """A RawSocket on a TCP stream; None for any other stream."""
        if not isinstance(stream, trio.SocketStream) or \
                stream.socket.type != socket.SOCK_STREAM:
            return None
        return cls(stream)

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes of `data` the kernel took now (0: its buffer is full)."""
        try:  # MSG_NOSIGNAL: a reset peer is an EPIPE, never a SIGPIPE to the process
            return self._sock.send(data, _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to max_bytes, b"" at end of stream (trio.BrokenResourceError on a reset)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller reads nothing
        while True:
            try:
                data = os.read(self._trio_sock.fileno(), max_bytes)
            except (BlockingIOError, InterruptedError):
                self._streak = 0
                await trio.lowlevel.wait_readable(self._trio_sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            self._streak += 1
            if self._streak >= YIELD_EVERY:
                self._streak = 0  # read: a yield that cannot raise Cancelled and lose it
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def send_all(self, stream: trio.SocketStream, data: bytes) -> None:
        """Send `data` whole on `stream` (the one this wraps): at once when the socket
        takes it, yielding every YIELD_EVERY such writes; the rest through the stream."""
        try:
            sent = self.send_now(data)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if sent == len(data):
            self.writes += 1
            if self.writes % YIELD_EVERY == 0:  # sent: a yield that cannot raise Cancelled,
                await trio.lowlevel.cancel_shielded_checkpoint()  # as trio's own send_all
            return
        await stream.send_all(memoryview(data)[sent:])
