"""Tools for attacking a real node from a test: raw WebSocket upgrades and resets, hostile
first messages, idle connections, a rogue link peer that holds the cluster secret.

Everything here talks to 127.0.0.1 only and closes what it opens.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import cbor2
import trio

from meshd.identity import Identity
from meshd.secure.frames import FrameCipher
from meshd.secure.handshake import Initiator
from meshd.secure.keyring import Keyring
from meshd.transport.links import END, HEADER, OPEN, _plain, _read_plain


def upgrade_request(port: int, path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def reset_upgrades(port: int, count: int, wait_reply: bool = False) -> None:
    """`count` WebSocket upgrades, each followed by a TCP reset (before or after the 101)."""
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(upgrade_request(port))
            if wait_reply or i % 2:
                with contextlib.suppress(OSError):
                    s.recv(1024)
        finally:
            reset(s)


def ws_frame(payload: bytes, opcode: int = 2) -> bytes:
    """One masked client frame (RFC 6455)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def raw_ws(port: int) -> socket.socket:
    """A connected, upgraded WebSocket as a plain socket (the 101 reply consumed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(upgrade_request(port))
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        got += chunk
    assert b" 101 " in got.split(b"\r\n", 1)[0], got[:200]
    return s


async def proxy_request(url: str, message: bytes | str, timeout: float = 20) -> Any:
    """Send one first message to a proxy endpoint and return its decoded reply (None when
    the endpoint closed without one)."""
    import trio_websocket

    with trio.fail_after(timeout):
        async with trio_websocket.open_websocket_url(url, max_message_size=4 << 20) as ws:
            await ws.send_message(message)
            try:
                return cbor2.loads(await ws.get_message())
            except trio_websocket.ConnectionClosed:
                return None


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections that send nothing; closed on exit. Connections the node
    refuses (closed at once) are counted as opened all the same."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                time.sleep(0.01)
        yield socks
    finally:
        for s in socks:
            s.close()


class RoguePeer:
    """A link peer with the cluster secret and its own identity: it can dial a node's link
    port, claim any address, open channels and send whatever it likes (trio)."""

    def __init__(self, secret: bytes, claim: str, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.keyring = Keyring([secret])
        self.claim = claim
        self.stream: trio.SocketStream | None = None
        self.cipher: FrameCipher | None = None
        self.peer_id = ""
        self._next = 1

    async def connect(self, addr: str, local_address: str | None = None) -> None:
        host, port = addr.rsplit(":", 1)
        self.stream = await trio.open_tcp_stream(host, int(port),
                                                 local_address=local_address)
        init = Initiator(self.identity, self.keyring, self.claim)
        await self.stream.send_all(_plain(init.hello()))
        confirm, keys = init.on_welcome(await _read_plain(self.stream))
        await self.stream.send_all(_plain(confirm))
        self.cipher = FrameCipher(keys.send_key, keys.recv_key, 1 << 20)
        self.peer_id = keys.peer_id

    async def open(self, name: str) -> int:
        cid = self._next
        self._next += 2
        await self.send_frame(OPEN, cid, name.encode())
        return cid

    async def join(self, name: str) -> bool:
        """Become a member under `name` at the claimed address: a join push-pull carrying
        our own signed alive (what any holder of the secret can do). True if answered."""
        from meshd.membership import messages
        from meshd.membership.messages import ALIVE, MemberState, PushPull, encode_packet

        tags = {"id": self.identity.node_id}
        key = self.identity.public_bytes
        cid = await self.open("membership")
        if hasattr(messages, "alive_payload"):
            sig = self.identity.sign(messages.alive_payload(1, name, self.claim, tags, key))
            state = MemberState(name, self.claim, 1, ALIVE, tags, key, sig)
        else:  # a release whose alives carry no identity (the attack is easier there)
            state = MemberState(name, self.claim, 1, ALIVE, tags)
        await self.send(cid, encode_packet([PushPull(name, True, False, [state])]))
        try:
            while True:
                ftype, got, _ = await self.receive(timeout=5)
                if got == cid and ftype == END:
                    return True
        except (trio.TooSlowError, EOFError):
            return False

    async def request(self, channel: str, message: bytes, timeout: float = 10) -> Any:
        """Open a channel, send one message, return the decoded first reply (None if the
        channel closed without one)."""
        cid = await self.open(channel)
        await self.send(cid, message)
        with contextlib.suppress(trio.TooSlowError, EOFError):
            while True:
                ftype, got, payload = await self.receive(timeout=timeout)
                if got != cid:
                    continue
                if ftype == END:
                    return cbor2.loads(payload)
                if ftype == 4:  # CLOSE
                    return None
        return None

    async def send_frame(self, ftype: int, cid: int, payload: bytes) -> None:
        assert self.stream is not None and self.cipher is not None
        await self.stream.send_all(self.cipher.seal(HEADER.pack(ftype, cid) + payload))

    async def send(self, cid: int, message: bytes) -> None:
        await self.send_frame(END, cid, message)

    async def receive(self, timeout: float = 10) -> tuple[int, int, bytes]:
        """The next frame that is not a keepalive: (type, channel, payload)."""
        assert self.stream is not None and self.cipher is not None
        with trio.fail_after(timeout):
            while True:
                head = await _read_exact(self.stream, 4)
                n = struct.unpack(">I", head)[0]
                plain = self.cipher.open(await _read_exact(self.stream, n))
                ftype, cid = HEADER.unpack_from(plain)
                if ftype != 6:  # PING
                    return ftype, cid, plain[HEADER.size:]

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def _read_exact(stream: trio.SocketStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return buf


def identity_below(node_id: str) -> Identity:
    """A fresh identity whose node id sorts before `node_id` (the old link rules let the
    lower id win when two links to one address met)."""
    while True:
        ident = Identity.generate()
        if ident.node_id < node_id:
            return ident


class RogueListener:
    """Answers link handshakes on a loopback port with its own identity (the cluster secret
    in hand) and records every channel a node opens to it and what it sends there."""

    def __init__(self, secret: bytes, port: int, claim: str) -> None:
        self.identity = Identity.generate()
        self.keyring = Keyring([secret])
        self.port = port
        self.claim = claim
        self.hellos = 0  # handshakes begun by a dialer
        self.handshakes = 0  # handshakes the dialer completed
        self.opened: list[str] = []
        self.received: list[bytes] = []

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from meshd.secure.handshake import Responder

        async def handle(stream: trio.SocketStream) -> None:
            with contextlib.suppress(Exception):
                responder = Responder(self.identity, self.keyring, self.claim)
                welcome = responder.on_hello(await _read_plain(stream))
                self.hellos += 1
                await stream.send_all(_plain(welcome))
                keys = responder.on_confirm(await _read_plain(stream))
                self.handshakes += 1
                cipher = FrameCipher(keys.send_key, keys.recv_key, 1 << 20)
                while True:
                    head = await _read_exact(stream, 4)
                    plain = cipher.open(await _read_exact(stream, struct.unpack(">I", head)[0]))
                    ftype, _ = HEADER.unpack_from(plain)
                    if ftype == OPEN:
                        self.opened.append(plain[HEADER.size:].decode())
                    elif ftype == END:
                        self.received.append(plain[HEADER.size:])
            await stream.aclose()

        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        await trio.serve_listeners(handle, listeners, task_status=task_status)


# --- WebSocket at the byte level ----------------------------------------------------------

PROXY_STATUSES = frozenset({400, 401, 403, 404, 408, 500, 503})  # meshd.errors, as documented
CLOSE, PING_OP, PONG_OP = 8, 9, 10


def ws_raw_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                 masked: bool = True, length: int | None = None,
                 encoding: int | None = None) -> bytes:
    """One client frame with every header field chosen by the caller: `length` is the payload
    length the header declares (default: the real one), `encoding` forces the length form (7,
    16 or 64 bits; default: the shortest), so a frame may lie about its size or use a form
    RFC 6455 forbids."""
    n = len(payload) if length is None else length
    form = encoding or (7 if n < 126 else 16 if n < 1 << 16 else 64)
    first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    mbit = 0x80 if masked else 0
    if form == 7:
        head = struct.pack("!BB", first, mbit | (n & 0x7F))
    elif form == 16:
        head = struct.pack("!BBH", first, mbit | 126, n & 0xFFFF)
    else:
        head = struct.pack("!BBQ", first, mbit | 127, n & 0xFFFFFFFFFFFFFFFF)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + _xor(payload, mask)


def _xor(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    key = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def parse_server_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Split bytes a server sent into frames (opcode, fin, payload) and the incomplete rest.
    AssertionError for anything RFC 6455 forbids a server to send."""
    frames: list[tuple[int, bool, bytes]] = []
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
        assert b0 & 0x70 == 0, f"reserved bits set by the server: {data[pos:pos + 16]!r}"
        assert opcode in (0, 1, 2, CLOSE, PING_OP, PONG_OP), f"server opcode {opcode}"
        assert not b1 & 0x80, "a server frame must not be masked"
        n, off = b1 & 0x7F, 2
        if n == 126:
            if len(data) - pos < 4:
                break
            (n,) = struct.unpack_from("!H", data, pos + 2)
            off = 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            (n,) = struct.unpack_from("!Q", data, pos + 2)
            off = 10
        if opcode >= CLOSE:
            assert n <= 125 and fin, "a server control frame must be short and whole"
        if len(data) - pos - off < n:
            break
        frames.append((opcode, fin, data[pos + off:pos + off + n]))
        pos += off + n
    return frames, data[pos:]


class WsOutcome:
    """What a server sent on one raw WebSocket connection: its data messages (reassembled),
    its close code, and how the connection ended."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.close_code: int | None = None
        self.ended = ""  # "eof" (the server closed) or "reset"
        self.status_line = b""

    def replies(self) -> list[Any]:
        """The binary messages, CBOR-decoded (AssertionError if one does not decode)."""
        out = []
        for opcode, payload in self.messages:
            assert opcode == 2, f"the proxy answers in binary messages, got opcode {opcode}"
            out.append(cbor2.loads(payload))
        return out


async def ws_exchange(port: int, sends: list[bytes], timeout: float = 20.0,
                      shut_write: bool = False, path: str = "/") -> WsOutcome:
    """Upgrade one raw connection, send each of `sends` verbatim, then read until the server
    closes it, answering its close frame as a client must. `shut_write` half-closes our side
    after sending (for inputs that are incomplete on purpose). trio.TooSlowError if the
    server has not closed within `timeout`: a hang."""
    out = WsOutcome()
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(upgrade_request(port, path))
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = await _receive(stream)
                if chunk is None or not chunk:
                    out.ended = "reset" if chunk is None else "eof"
                    return out
                buf += chunk
            head, data = buf.split(b"\r\n\r\n", 1)
            out.status_line = head.split(b"\r\n", 1)[0]
            assert out.status_line.startswith(b"HTTP/1.1 101 "), head[:200]
            for part in sends:
                try:
                    await stream.send_all(part)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break  # the server already gave up on us: read what it said
            if shut_write:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         OSError):
                    await stream.send_eof()
            answered = False
            while True:
                frames, _ = parse_server_frames(data)
                if not answered and any(op == CLOSE for op, _, _ in frames):
                    answered = True
                    code = next(p for op, _, p in frames if op == CLOSE)[:2]
                    with contextlib.suppress(trio.BrokenResourceError,
                                             trio.ClosedResourceError, OSError):
                        await stream.send_all(ws_raw_frame(CLOSE, code))
                chunk = await _receive(stream)
                if not chunk:
                    out.ended = "reset" if chunk is None else "eof"
                    break
                data += chunk
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    frames, rest = parse_server_frames(data)
    assert not rest or out.ended == "reset", f"the server left a frame unfinished: {rest[:64]!r}"
    message: list[bytes] = []
    kind = 0
    for opcode, fin, payload in frames:
        if opcode == CLOSE:
            out.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            break
        if opcode in (PING_OP, PONG_OP):
            continue
        if opcode in (1, 2):
            assert not message, "the server started a message inside another one"
            kind = opcode
        else:
            assert kind, "the server sent a continuation frame outside a message"
        message.append(payload)
        if fin:
            out.messages.append((kind, b"".join(message)))
            message, kind = [], 0
    return out


async def _receive(stream: trio.SocketStream) -> bytes | None:
    """Some bytes, b"" at EOF, None when the peer reset the connection."""
    try:
        return await stream.receive_some(65536)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None


def cbor_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A CBOR map encoded by hand: a value given as `Raw(bytes)` is spliced in verbatim (for
    nesting deeper than any encoder would go, tags, or invalid items inside a valid map)."""
    n = len(pairs)
    head = bytes([0xA0 | n]) if n < 24 else b"\xb8" + bytes([n])
    return head + b"".join(cbor2.dumps(k) + (v.data if isinstance(v, Raw) else cbor2.dumps(v))
                           for k, v in pairs)


class Raw:
    """Pre-encoded CBOR for `cbor_map`."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def nested_cbor(depth: int, kind: str = "array") -> bytes:
    """`depth` nested arrays ([[[...0]]]), maps ({0: {0: ...}}) or tags (tag 1 in tag 1...),
    innermost value 0."""
    prefix = {"array": b"\x81", "map": b"\xa1\x00", "tag": b"\xc1"}[kind]
    return prefix * depth + b"\x00"


def nested_token(depth: int) -> str:
    """A PASETO-looking token whose footer is `depth` nested JSON arrays."""
    return "v4.public.A." + base64.urlsafe_b64encode(b"[" * depth).decode().rstrip("=")


# --- HTTP/1.1 at the byte level -----------------------------------------------------------

class HttpResponse:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes,
                 cut: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.cut = cut  # the connection ended before the whole body arrived

    @property
    def closes(self) -> bool:
        return self.headers.get(b"connection", b"").lower() == b"close"


class HttpConn:
    """A raw HTTP/1.1 client connection (trio): send any bytes, parse the responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.eof = False
        self.reset = False  # the server reset the connection (rather than closing it)

    @classmethod
    async def open(cls, port: int) -> HttpConn:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> bool:
        """False if the server has already closed the connection."""
        try:
            await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def shut_write(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.send_eof()

    async def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = await _receive(self.stream)
        if not chunk:
            self.eof = True
            self.reset = chunk is None
            return False
        self.buf += chunk
        return True

    async def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not await self._fill():
                return None
        i = self.buf.index(b"\r\n")
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    async def _exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def response(self, head: bool = False, allow_cut: bool = False
                       ) -> HttpResponse | None:
        """The next final response (1xx skipped); None if the server closed before one began.
        AssertionError for a malformed response, and for one whose body was cut short unless
        `allow_cut` (then it comes back with `cut` set)."""
        while True:
            if not self.buf and not await self._fill():
                return None
            line = await self._line()
            assert line is not None, f"truncated status line: {bytes(self.buf)[:100]!r}"
            parts = line.split(b" ", 2)
            assert len(parts) >= 2 and parts[0] in (b"HTTP/1.1", b"HTTP/1.0") \
                and parts[1].isdigit(), f"not an HTTP/1.x status line: {line[:100]!r}"
            status = int(parts[1])
            headers: dict[bytes, bytes] = {}
            while True:
                h = await self._line()
                assert h is not None, "response headers cut short"
                if not h:
                    break
                name, _, value = h.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:
                continue
            if head or status in (204, 304):
                return HttpResponse(status, headers, b"")
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                body = b""
                while True:
                    size = await self._line()
                    assert size is not None, "chunked response cut short"
                    n = int(size.split(b";")[0], 16)
                    chunk = await self._exactly(n + 2)
                    assert chunk is not None, "chunked response cut short"
                    body += chunk[:n]
                    if n == 0:
                        break
                return HttpResponse(status, headers, body)
            n = int(headers.get(b"content-length", b"-1"))
            if n < 0:
                body = bytes(self.buf)
                self.buf.clear()
                while await self._fill():
                    body += bytes(self.buf)
                    self.buf.clear()
                return HttpResponse(status, headers, body)
            body_bytes = await self._exactly(n)
            if body_bytes is None and allow_cut:
                return HttpResponse(status, headers, bytes(self.buf), cut=True)
            assert body_bytes is not None, f"response body cut short (status {status})"
            return HttpResponse(status, headers, body_bytes)

    async def drain(self) -> None:
        """Read until the server closes (or resets) the connection."""
        while await self._fill():
            pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


# --- slow and idle clients ----------------------------------------------------------------

async def slow_send(port: int, data: bytes, interval: float, prefix: bytes = b""
                    ) -> tuple[int, bytes]:
    """Send `prefix` at once (an HTTP upgrade: its answer is awaited), then `data` one byte
    every `interval` seconds, reading all the while; stops when the server closes (or
    resets) the connection. Returns how many bytes of `data` were sent by then and what the
    server sent. Runs until cut off: bound it with a timeout."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    answered = trio.Event()
    sent = 0
    try:
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                nonlocal sent
                try:
                    if prefix:
                        await stream.send_all(prefix)
                        await answered.wait()
                    for i in range(len(data)):
                        await stream.send_all(data[i:i + 1])
                        sent += 1
                        await trio.sleep(interval)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep_forever()  # all sent: wait for the server's verdict

            nursery.start_soon(trickle)
            while (chunk := await _receive(stream)):
                received += chunk
                if b"\r\n\r\n" in received:
                    answered.set()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return sent, bytes(received)


async def silent_client(port: int, prefix: bytes = b"") -> bytes:
    """Send `prefix` (maybe nothing), then only read until the server closes: returns what
    it sent. Bound it with a timeout."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    try:
        if prefix:
            await stream.send_all(prefix)
        while (chunk := await _receive(stream)):
            received += chunk
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
    return bytes(received)


def open_idle(target: int | str, count: int, connect_timeout: float = 1.0,
              give_up_after: int = 0) -> tuple[list[socket.socket], int]:
    """`count` connections that send nothing, to a TCP port on 127.0.0.1 or a unix socket
    path; returns them and how many could not be opened (a full backlog times out; after
    `give_up_after` failures in a row the rest are not tried and count as failed). The
    caller closes them."""
    socks: list[socket.socket] = []
    failed = in_a_row = 0
    for _ in range(count):
        if give_up_after and in_a_row >= give_up_after:
            return socks, count - len(socks)
        family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(connect_timeout)
        try:
            for attempt in range(100):
                try:
                    s.connect(target if isinstance(target, str) else ("127.0.0.1", target))
                    break
                except BlockingIOError:  # a unix socket's backlog is full: wait for accept
                    if attempt == 99:
                        raise
                    time.sleep(0.01)
            socks.append(s)
            in_a_row = 0
        except OSError:
            failed += 1
            in_a_row += 1
            s.close()
    return socks, failed


async def one(port: int, data: bytes, bound: float = 20.0) -> HttpResponse | None:
    """The first response to `data` on a fresh connection (None: none within `bound`)."""
    conn = await HttpConn.open(port)
    try:
        await conn.send(data)
        with trio.move_on_after(bound):
            return await conn.response(allow_cut=True)
        return None
    finally:
        await conn.aclose()


def request(method: str, path: str, body: bytes = b"", headers: str = "",
            ctype: str = "application/json") -> bytes:
    """A raw HTTP/1.1 request (a JSON body by default)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
    if body or method == "POST":
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return head.encode("latin-1") + b"\r\n" + body
