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
