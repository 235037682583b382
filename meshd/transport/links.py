"""Secure stream links over TCP: one link per peer pair, multiplexed into channels.

Theory of operation
-------------------
A link is a TCP connection that passed the handshake (secure/handshake.py); after that every
frame is AEAD-sealed (secure/frames.py). Inside, frames carry [type, channel id, payload]:

    OPEN   name        open a channel to the handler registered under `name`
    DATA   bytes       part of a message
    END    bytes       last part of a message
    CLOSE              no more messages from this side
    WINDOW increment   the receiver consumed this many bytes: the sender may send more
    PING               keepalive; any frame proves the link alive

Rules:
- Channel ids: the dialing side uses odd numbers, the accepting side even ones.
- Flow control per channel: a sender may have at most `window` unconsumed bytes in flight;
  it waits for WINDOW frames beyond that. A peer that overruns the window is dropped. So one
  busy channel cannot make a link buffer without bound, and a slow reader slows its writer.
- Messages larger than a frame are split into DATA parts and a final END part.
- Writes: frames sent while a write is under way leave together in the next write (one
  system call for many calls' frames); a write is shielded from its caller's cancellation
  (a sealed frame never sent would break the nonce sequence) and bounded by SEND_STALL (a
  peer that reads nothing that long loses the link). A reader takes the messages a group of
  frames brought without yielding with `Channel.receive_ready`.
- Callback paths (no task per message): `Channel.send_nowait` seals a one-frame message
  at once and leaves it to the link's flusher task when the window has room and no
  multi-frame send is under way on the channel (else False, nothing sent: use `send`).
  A channel's `hook` is handed each one-frame message as it arrives, in the reader, while
  nothing waits in the channel's queue; a hook that declines (returns False or fails)
  leaves it queued for `receive`, and every message after it goes to the queue until the
  queue is empty again (order is kept). A taken message gives its window back as a
  received one does. On a link relayed with trace tags a queued frame goes untagged (a
  sampled call's frames must be sent from its task). On a TCP link a queued frame that
  nothing waits before goes to the socket at once (rawio.py), and the reader receives
  without a scheduler round per receive; what the socket does not take waits for the
  flusher, in order.
- One link per peer address: a link dialed while another is being set up waits for it; if
  both sides dial at once, the link dialed by the lower node id is kept and the other stops
  taking new channels and closes once idle, after DRAIN_GRACE (the peer may have opened a
  channel on it before it saw the winner: that channel is served to its end); a newer link
  dialed by the same side replaces the older one (closed at once if idle).
- Any protocol fault (bad frame, unknown type, window overrun, failed decryption) closes the
  link and counts it; it never escapes the link's task.
- Keepalive: each side pings every KEEPALIVE seconds; a link that heard nothing for
  DEAD_AFTER seconds is closed, so a path that silently stops (a firewall starts dropping)
  fails the calls on it and gets dialed again instead of hanging them.
- When the routes say a destination is now reached through relays, a direct link to it is
  dropped (closed once idle) and the destination is dialed along the route. A live relayed
  link stays in use when the route goes away, until it ends (the next dial is direct): a
  route that blinks does not cost a handshake. A relay bounds the hop budget it passes on.
Identity (who is at the other end):
- A link's peer is the identity key it proved in the handshake (`peer_public`), never the
  address it claims. `expected_key(addr)` (membership: the key of the live member at an
  address) decides: a dialed link whose key is not the one expected at the address it was
  dialed is refused (so a relay, or a member squatting an address, cannot terminate a link
  meant for someone else); an existing link is reused for an address only while its key is
  the one expected there.
- An accepted link is filed under the address its peer claims only if no live member holds
  that address with another key; otherwise under "key:<node id>", an address nothing else
  uses, so it serves the channels that peer opens and nothing meant for the real owner.
  A link never replaces another link of a different key (the lower-id rule applies only to
  the same peer dialing both ways).
- `is_revoked(key)`: links of a revoked identity are refused both ways, and a link whose
  peer is revoked later ends at its next channel open (the evictor closes idle ones).
- An accepted link whose key is not a live member is closed after NON_MEMBER_GRACE
  seconds (and at every later check): links from keys that never join cannot pile up.
Bounds (a member may act as a node, never take the node down):
- At most `max_channels` channels per link; OPENs beyond it are refused (closed at once).
- A channel's queued frames are charged at least MIN_FRAME_COST bytes of window each, so
  empty or tiny frames cannot queue without bound; an empty DATA frame is a protocol fault.
- A message is at most `max_message` bytes; bytes held in partly received messages of one
  link are bounded too; beyond either the link is closed.
- Received bytes that no handler has read yet are bounded per link (`link_buffer`: the
  link is closed beyond it) and per node (`node_buffer`: the link holding the most is
  closed), so channels a peer fills and never lets drain (4 MiB windows each) cannot
  exhaust memory.
- Accepting goes through transport/listeners.py: caps on pending and open connections per
  listener, the handshake deadline, EMFILE back-off, and a failure ends one connection only.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd import wire
from meshd.buckets import TokenBuckets
from meshd.debug import traces
from meshd.debug.traces import RELAYED
from meshd.identity import Identity, node_id_from_public
from meshd.secure.frames import LENGTH, FrameCipher, FrameError
from meshd.secure.handshake import HandshakeError, Initiator, LinkKeys, Responder
from meshd.secure.keyring import Keyring

from . import addr as addrs
from . import listeners as serving
from .rawio import YIELD_EVERY, RawSocket

log = logging.getLogger("meshd.transport.links")

OPEN, DATA, END, CLOSE, WINDOW, PING = 1, 2, 3, 4, 5, 6
KEEPALIVE = 5.0  # seconds between pings on a link
DEAD_AFTER = 15.0  # a link that heard nothing for this long is closed (no silent hangs)
HEADER = struct.Struct(">BI")
WINDOW_BYTES = 4 * 1024 * 1024
CHUNK = 64 * 1024
HANDSHAKE_FRAME = 4096
CLOSE_WAIT = 1.0  # seconds a WebSocket close waits for the peer's close frame
MIN_FRAME_COST = 64  # window bytes a queued frame costs at least (bounds empty frames)
MAX_CHANNEL_NAME = 64
MAX_CHANNELS = 8192  # open channels per link (streams, tunnels, calls in flight)
MAX_MESSAGE = 64 << 20  # one channel message, all its DATA parts together
KEY_PREFIX = "key:"  # address of an accepted link whose claimed address is someone else's
DRAIN_GRACE = 2.0  # seconds an idle link that lost to a simultaneous dial stays open
NON_MEMBER_GRACE = 30.0  # seconds an accepted link may stay without being a live member
LINK_BUFFER = 128 << 20  # unread bytes one link may leave on its channels (32 full windows)
NODE_BUFFER = 1 << 30  # unread bytes on all links together


class WsStream:
    """A WebSocket connection as a byte stream: the secure link runs over it unchanged, its
    frames carried in binary messages (so a mesh can cross proxies that only pass HTTP(S))."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._buf = b""

    async def send_all(self, data: bytes) -> None:
        import trio_websocket

        try:
            await self.ws.send_message(bytes(data))
        except trio_websocket.ConnectionClosed:
            raise trio.BrokenResourceError("websocket closed") from None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        import trio_websocket

        if not self._buf:
            try:
                msg = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return b""
            if not msg:
                return b""  # an empty message is end-of-data (links never send one)
            self._buf = msg if isinstance(msg, bytes) else msg.encode()
        n = max_bytes or len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def aclose(self) -> None:
        # the closing handshake waits for the peer's close frame: a peer that never sends
        # one must not keep the connection (and its listener slot) for ever
        # (cut short, trio-websocket still closes the TCP stream on its way out)
        with contextlib.suppress(Exception), trio.move_on_after(CLOSE_WAIT):
            await self.ws.aclose()


class ChannelStream:
    """A channel as a byte stream: a relayed link runs its own handshake and frames over it,
    so relays carry only ciphertext they cannot read (end-to-end encryption).

    A tagged stream (both ends and every relay agreed in the relay header) starts each
    message with a byte: 0, or 1 followed by the 55-byte W3C traceparent of the call whose
    frame it carries (`traces.RELAYED` of the sending task) when that call is sampled, so
    each relay records its span of the call (once per call and direction, at most
    RELAY_SPAN_RATE a second per session); the trace context of sampled calls is all a
    relay learns."""

    def __init__(self, ch: Channel, tagged: bool = False) -> None:
        self.ch = ch
        self.tagged = tagged
        self._buf = b""

    async def send_all(self, data: bytes) -> None:
        if self.tagged:
            tp = RELAYED.get()  # only a sampled call's: relays learn nothing of the others
            data = (b"\x01" + tp.encode() + data) if len(tp) == TAG_BYTES and tp[-1] == "1" \
                else b"\x00" + data
        try:
            await self.ch.send(bytes(data))
        except ChannelClosed:
            raise trio.BrokenResourceError("relay channel closed") from None

    def send_nowait(self, data: bytes) -> bool:
        """Send `data` untagged without waiting if the channel takes it now (else False,
        nothing sent)."""
        return self.ch.send_nowait(b"\x00" + data if self.tagged else data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._buf:
            try:
                self._buf = await self.ch.receive()
            except ChannelClosed:
                return b""
            if self.tagged:
                self._buf = self._buf[1 + TAG_BYTES:] if self._buf[:1] == b"\x01" \
                    else self._buf[1:]
            if not self._buf:
                return b""
        n = max_bytes or len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def aclose(self) -> None:
        await self.ch.aclose()


RELAY = "relay"
YIELD_FRAMES = 256  # frames the reader handles between yields at most
YIELD_BYTES = 256 * 1024  # or bytes
SEND_STALL = 30.0  # seconds a link write may make no progress before the link is dropped
MAX_HOPS = 8
TAG_BYTES = 55  # a traceparent on a tagged relay message
RELAY_RECENT = 256  # traceparents a relay session remembers (one span per call, direction)
RELAY_SPAN_RATE, RELAY_SPAN_BURST = 50.0, 200.0  # spans a relay session records a second


class LinkError(Exception):
    """A link could not be set up or broke; str() says why."""


class ChannelClosed(Exception):
    """The other side closed the channel (or the link went away)."""


class _Reader:
    """Buffered reads: one receive call often brings several frames."""

    def __init__(self, stream: trio.abc.Stream, raw: RawSocket | None = None) -> None:
        self.receive_some = raw.receive_some if raw is not None else stream.receive_some
        self.buf = bytearray()

    async def read(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            chunk = await self.receive_some(max(n - len(buf), 262144))
            if not chunk:
                raise LinkError("connection closed by peer")
            buf += chunk
        with memoryview(buf) as view:
            out = bytes(view[:n])  # one copy (a bytearray slice would make two)
        del buf[:n]
        return out


async def _read_exact(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise LinkError("connection closed by peer")
        buf += chunk
    return bytes(buf)


async def _read_plain(stream: trio.abc.Stream) -> bytes:
    (n,) = LENGTH.unpack(await _read_exact(stream, 4))
    if n > HANDSHAKE_FRAME:
        raise HandshakeError("peer did not speak the meshd link protocol")
    return await _read_exact(stream, n)


def _plain(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


class Channel:
    """One multiplexed conversation: send()/receive() whole messages, with backpressure."""

    def __init__(self, link: Link, cid: int, name: str) -> None:
        self.link = link
        self.id = cid
        self.name = name
        self._in_send, self._in = trio.open_memory_channel[tuple[int, bytes]](math.inf)
        self._buffered = 0
        self._consumed = 0
        self._send_window = WINDOW_BYTES
        self._window_changed = trio.Event()
        self._closed_local = False
        self._closed_remote = False
        self._send_lock = trio.Lock()
        self._stash: tuple[int, bytes] | None = None  # taken by receive_ready, not a message
        # taken in the reader (see the rules): a hook that returns False leaves the message
        self.hook: Callable[[bytes], bool] | None = None
        self._queued = 0  # frames in the queue (messages waiting for receive)
        self._partial = False  # DATA parts of a message came, its END part not yet
        self._holding = False  # receive took a message from the queue, not returned yet

    @property
    def peer_id(self) -> str:
        return self.link.peer_id

    @property
    def peer_addr(self) -> str:
        return self.link.peer_addr

    @property
    def peer_public(self) -> bytes:
        """The identity key the peer proved in the link handshake."""
        return self.link.peer_public

    @property
    def peer_node(self) -> str | None:
        """The member this channel's peer is, by the key it proved (None: not a member)."""
        return self.link.peer_node()

    # called by the link reader
    def _on_data(self, ftype: int, payload: bytes) -> None:
        if ftype == DATA and not payload:
            raise FrameError(f"empty DATA frame on channel {self.id}")
        cost = max(len(payload), MIN_FRAME_COST)
        if ftype == DATA:
            self._partial = True
        elif self._partial:
            self._partial = False
        elif self.hook is not None and not self._queued and self._stash is None and \
                not self._holding and self.link.can_queue and self._hooked(payload):
            self._consumed += cost  # taken at once: its window goes back like receive's
            if self._consumed >= WINDOW_BYTES // 4:
                grant, self._consumed = self._consumed, 0
                self.link.queue_frame(WINDOW, self.id, grant.to_bytes(4, "big"))
            return
        self._buffered += cost
        if self._buffered > WINDOW_BYTES:
            raise FrameError(f"peer overran the flow-control window on channel {self.id}")
        self.link._hold(cost)
        self._queued += 1
        self._in_send.send_nowait((ftype, payload))

    def _hooked(self, payload: bytes) -> bool:
        """Whether the hook took the message (a failing hook declines it: the message
        goes the ordinary way, and the link is not the hook's to break)."""
        try:
            return bool(self.hook(payload))  # type: ignore[misc]
        except Exception:
            log.exception("hook of channel %r failed", self.name)
            return False

    def _on_window(self, increment: int) -> None:
        self._send_window += increment
        self._window_changed.set()
        self._window_changed = trio.Event()

    def _on_close(self) -> None:
        self._closed_remote = True
        self._queued += 1
        self._in_send.send_nowait((CLOSE, b""))
        self._window_changed.set()

    async def send(self, message: bytes) -> None:
        """Send one whole message; safe to call from several tasks at once. Only a message
        split into several frames needs the channel lock (its parts must not interleave
        with another message); a one-frame message goes straight out unless such a send is
        under way."""
        if len(message) > CHUNK or self._send_lock.locked():
            async with self._send_lock:
                await self._send_message(message)
        else:
            await self._send_message(message)

    def send_nowait(self, message: bytes) -> bool:
        """Queue a one-frame message for the link's flusher without waiting; False (nothing
        sent) when it cannot go that way now: too long for one frame, a multi-frame send
        under way, the window short, the channel or link closed, or a link that sends
        only from tasks (relayed with trace tags). Then `send` it."""
        cost = max(len(message), MIN_FRAME_COST)
        link = self.link
        if len(message) > CHUNK or self._send_lock.locked() or self._send_window < cost or \
                self._closed_local or self._closed_remote or link.closed or \
                not link.can_queue:
            return False
        self._send_window -= cost
        return link.queue_frame(END, self.id, message)  # False: the link broke on it

    async def _send_message(self, message: bytes) -> None:
        if self._closed_local:
            raise ChannelClosed("channel already closed")
        if self._closed_remote:  # nobody reads it: stop the sender now, not when the window
            raise ChannelClosed("peer closed the channel")  # is spent (a pipe would go on)
        if len(message) <= CHUNK:  # the common case: one frame, no slicing copies
            await self._take_window(max(len(message), MIN_FRAME_COST))
            await self.link._send(END, self.id, message)
            return
        view = memoryview(message)
        while True:
            part = bytes(view[:CHUNK])
            view = view[CHUNK:]
            await self._take_window(max(len(part), MIN_FRAME_COST))
            await self.link._send(END if not view else DATA, self.id, part)
            if not view:
                return

    async def _take_window(self, n: int) -> None:
        """Wait until the peer's window has room for n bytes, then use it."""
        while self._send_window < n:
            if self._closed_remote or self.link.closed:
                raise ChannelClosed("peer closed the channel")
            await self._window_changed.wait()
        if self.link.closed:
            raise ChannelClosed(f"link to {self.link.peer_addr} closed")
        self._send_window -= n

    def receive_ready(self) -> bytes | None:
        """The next message if it is already here, whole in one frame; else None (then
        `receive`). A reader takes the messages a group of frames brought without yielding
        between them (the calls of one link write start together, and their own writes go
        out together). The window it frees is granted by the next `receive`."""
        if self._stash is not None:
            return None
        try:
            item = self._in.receive_nowait()
        except trio.WouldBlock:
            return None
        self._queued -= 1
        ftype, payload = item
        if ftype != END:
            self._stash = item  # a close, or the first part of a long message: receive's
            return None
        cost = max(len(payload), MIN_FRAME_COST)
        self._buffered -= cost
        self.link._release(cost)
        self._consumed += cost
        return payload

    async def receive(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        link = self.link
        self._holding = self._stash is not None
        try:
            if self._consumed >= WINDOW_BYTES // 4 and not link.closed:  # receive_ready's
                grant, self._consumed = self._consumed, 0
                await link._send(WINDOW, self.id, grant.to_bytes(4, "big"))
            while True:
                if self._stash is not None:
                    (ftype, payload), self._stash = self._stash, None
                else:
                    ftype, payload = await self._in.receive()
                    self._queued -= 1
                    self._holding = True
                if ftype == CLOSE:
                    self._queued += 1
                    self._in_send.send_nowait((CLOSE, b""))  # stay closed for later calls
                    raise ChannelClosed("peer closed the channel")
                cost = max(len(payload), MIN_FRAME_COST)
                self._buffered -= cost
                link._release(cost)
                self._consumed += cost
                if ftype == END and not parts:
                    message = payload  # the common case: a one-frame message
                else:
                    size += len(payload)
                    link.assembling += len(payload)
                    if size > link.manager.max_message or \
                            link.assembling > 2 * link.manager.max_message:
                        link.protocol_fault(f"message on channel {self.id} over "
                                            f"{link.manager.max_message} bytes")
                        raise ChannelClosed("peer sent a message over the size limit")
                    parts.append(payload)
                if self._consumed >= WINDOW_BYTES // 4 and not link.closed:
                    grant, self._consumed = self._consumed, 0
                    await link._send(WINDOW, self.id, grant.to_bytes(4, "big"))
                if ftype == END:
                    return message if not parts else b"".join(parts)
        finally:
            link.assembling -= size
            self._holding = False

    async def aclose(self) -> None:
        if not self._closed_local:
            self._closed_local = True
            if not self.link.closed:
                with trio.move_on_after(1), contextlib.suppress(
                        ChannelClosed, LinkError, trio.BrokenResourceError,
                        trio.ClosedResourceError):
                    await self.link._send(CLOSE, self.id, b"")
            self.link._forget(self)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Link:
    def __init__(self, manager: LinkManager, stream: trio.abc.Stream, cipher: FrameCipher,
                 keys: LinkKeys, initiator: bool, initiator_id: str) -> None:
        self.manager = manager
        self.stream = stream
        self.cipher = cipher
        self.peer_id = keys.peer_id
        self.peer_public = keys.peer_public
        self.peer_addr = keys.peer_addr
        self.assembling = 0  # bytes held in partly received messages of all channels
        self.buffered = 0  # bytes received on its channels that no handler read yet
        self.initiator = initiator
        self.initiator_id = initiator_id
        self.channels: dict[int, Channel] = {}
        self._next_id = 1 if initiator else 2
        self._out: list[bytes] = []  # sealed frames waiting for the writer (see _send)
        self._writing = False
        self._sent = trio.Event()  # set when the batch being gathered has been written
        self.tagged = bool(getattr(stream, "tagged", False))  # see _send
        self._tag_lock = trio.Lock()
        # a tagged link's frames with the trace tag of their sender (_send_tagged), unsealed
        # (None) or already sealed (the sealed frame)
        self._tag_out: collections.deque[tuple[bytes, str, bool]] = collections.deque()
        self._flush_lot = trio.lowlevel.ParkingLot()  # the flusher waits here for frames
        self._raw = RawSocket.of(stream)  # TCP: sends and receives without a scheduler round
        self._reader: _Reader | None = None  # set by the read loop
        self._in_frame = False  # the read loop has a frame's header, not yet its body
        self.can_queue = False  # queue_frame may be used: the flusher runs (see run)
        self.closed = False
        self.draining = False
        self.relayed = False
        self.last_rx = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._drain_grace: float | None = None  # set when it lost to a simultaneous dial

    async def _send(self, ftype: int, cid: int, payload: bytes) -> None:
        """Seal a frame and send it. Frames sent while a write is under way go out together
        in the next write, by whichever task is writing (group send: one system call for
        the frames of many calls at once); the caller returns once its frame is written.
        A write is shielded from its caller's cancellation (a frame sealed but never sent
        would leave a gap in the peer's nonce sequence) and bounded by SEND_STALL instead:
        a peer that reads nothing for that long loses the link. A relayed link whose frames
        carry trace tags sends each frame in a relay message of its own, tagged with its
        sender's call (_send_tagged)."""
        if self.closed:
            raise ChannelClosed(f"link to {self.peer_addr} closed")
        if self.tagged:
            await self._send_tagged(ftype, cid, payload)
            return
        data = self.cipher.seal(HEADER.pack(ftype, cid) + payload)  # no await: in order
        st = self.manager.stats
        st["link_frames_out"] += 1
        st["link_bytes_out"] += len(data)
        self._out.append(data)
        if self._writing:  # the writer sends ours with its next batch
            await self._sent.wait()
            if self.closed:
                raise ChannelClosed(f"link to {self.peer_addr} broke")
            return
        await self._drain()

    async def _drain(self) -> None:
        """Write what is queued, batch after batch, until the queue is empty (the caller
        is the link's one writer until it returns)."""
        self._writing = True
        try:
            while self._out:
                batch, self._out = self._out, []
                done, self._sent = self._sent, trio.Event()
                try:
                    await self._write(batch[0] if len(batch) == 1 else b"".join(batch))
                finally:
                    done.set()
        finally:
            self._writing = False
            if self.closed:
                self._sent.set()  # those queued behind a failed write learn it now

    def queue_frame(self, ftype: int, cid: int, payload: bytes) -> bool:
        """Seal a frame now and leave it to the flusher (or to whichever task is writing):
        for callbacks, which cannot wait. Only while `can_queue`. (A tagged link's frame
        is sealed when written, untagged: callbacks carry no sampled call's context.) False
        when the connection failed on it: the link is closed and the frame lost."""
        if self.tagged:
            plain = HEADER.pack(ftype, cid) + payload
            if self._tag_out or self._tag_lock.locked():
                self._tag_out.append((plain, "", False))  # behind what waits, in order
            else:  # nothing waits before it: sealed now, and sent now if the relay channel
                data = self.cipher.seal(plain)  # takes it
                st = self.manager.stats
                st["link_frames_out"] += 1
                st["link_bytes_out"] += len(data)
                if self.stream.send_nowait(data):
                    return True
                self._tag_out.append((data, "", True))
            self._flush_lot.unpark_all()
            return True
        data = self.cipher.seal(HEADER.pack(ftype, cid) + payload)  # in order, as _send
        st = self.manager.stats
        st["link_frames_out"] += 1
        st["link_bytes_out"] += len(data)
        if not self._writing and not self._out and self._raw is not None:
            try:  # nothing before it waits to be sent: straight to the socket
                sent = self._raw.send_now(data)
            except OSError as exc:  # the connection failed: the link ends (as _write's)
                log.debug("link %s broke: %s", self.peer_addr, exc)
                self._mark_closed()
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()
                return False
            if sent == len(data):
                return True
            data = data[sent:]  # the rest goes first, from the flusher
        self._out.append(data)
        if not self._writing:
            self._flush_lot.unpark_all()
        return True

    async def _flusher(self) -> None:
        """Write what queue_frame left, until the link ends."""
        self.can_queue = True
        try:
            while not self.closed:
                if self.tagged:
                    if not self._tag_out:
                        await self._flush_lot.park()
                        continue
                    async with self._tag_lock:
                        await self._drain_tagged()
                    continue
                if not self._out or self._writing:
                    await self._flush_lot.park()
                    continue
                await self._drain()
        except ChannelClosed:
            pass
        finally:
            self.can_queue = False

    async def _send_tagged(self, ftype: int, cid: int, payload: bytes) -> None:
        """Queue the frame with this task's trace tag; whoever holds the tag lock writes
        the queue in order (a frame is sealed just before it is written, so the nonces
        stay in the order of the wire). Returns once the frame was written."""
        self._tag_out.append((HEADER.pack(ftype, cid) + payload, RELAYED.get(), False))
        try:
            async with self._tag_lock:
                await self._drain_tagged()
        except trio.Cancelled:
            self._flush_lot.unpark_all()  # our frame may still be queued: the flusher's
            raise
        if self.closed:
            raise ChannelClosed(f"link to {self.peer_addr} broke")

    async def _drain_tagged(self) -> None:
        """Seal and write a tagged link's queue, each frame in its own relay message
        tagged as its sender's (the caller holds the tag lock)."""
        st = self.manager.stats
        while self._tag_out:
            data, tag, sealed = self._tag_out.popleft()
            if not sealed:
                data = self.cipher.seal(data)
                st["link_frames_out"] += 1
                st["link_bytes_out"] += len(data)
            token = RELAYED.set(tag)  # what ChannelStream tags the message with
            try:
                await self._write(data)
            finally:
                RELAYED.reset(token)

    async def _write(self, data: bytes) -> None:
        """Write `data` whole (ChannelClosed if the link broke). On TCP what the socket
        takes at once goes without trio's stream (rawio.py), yielding every
        rawio.YIELD_EVERY writes; the rest through it."""
        raw = self._raw
        try:
            if raw is not None:
                sent = raw.send_now(data)
                if sent == len(data):
                    raw.writes += 1
                    if raw.writes % YIELD_EVERY == 0:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return
                data = memoryview(data)[sent:]  # type: ignore[assignment]
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + SEND_STALL
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise trio.BrokenResourceError(f"no progress in {SEND_STALL:g} s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._mark_closed()
            raise ChannelClosed(f"link to {self.peer_addr} broke: {exc}") from None

    async def open_channel(self, name: str) -> Channel:
        if self.closed or self.draining:
            raise ChannelClosed(f"link to {self.peer_addr} is closing")
        cid = self._next_id
        self._next_id += 2
        ch = Channel(self, cid, name)
        self.channels[cid] = ch
        await self._send(OPEN, cid, name.encode())
        return ch

    def peer_node(self) -> str | None:
        """The member whose identity key this link proved (None: not a known member)."""
        lookup = self.manager.node_of_key
        return lookup(self.peer_public) if lookup is not None else None

    def protocol_fault(self, why: str) -> None:
        """The peer broke the protocol: count it and close the link (from any task)."""
        log.info("link %s closed: %s", self.peer_addr, why)
        self.manager.stats["links_dropped_bad_frames"] += 1
        self._mark_closed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _hold(self, n: int) -> None:
        """Received bytes no handler has read yet: bounded per link and per node. Over the
        link's budget the link is closed; over the node's, the link holding the most."""
        self.buffered += n
        manager = self.manager
        manager.buffered += n
        if self.buffered > manager.link_buffer:
            raise FrameError(f"peer left {self.buffered} bytes unread on its channels "
                             f"(link budget {manager.link_buffer})")
        if manager.buffered > manager.node_buffer:
            hog = max(manager.live, key=lambda link: link.buffered, default=self)
            if hog is self:
                raise FrameError("unread bytes over the node's budget: this link holds most")
            hog.protocol_fault("unread bytes over the node's budget: this link holds most")

    def _release(self, n: int) -> None:
        if self.closed:
            return  # a closed link released all it held at once (_mark_closed)
        self.buffered -= n
        self.manager.buffered -= n

    def _forget(self, ch: Channel) -> None:
        if ch._buffered > 0:  # what its handler never read is dropped with it
            self._release(ch._buffered)
            ch._buffered = 0
        self.channels.pop(ch.id, None)
        if self.draining:
            self._end_if_unused()

    def _end_if_unused(self) -> None:
        """End this (draining) link if no channel is open on it: its tasks are cancelled."""
        if not self.channels and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close_when_idle_after(self, grace: float) -> None:
        """Close this draining link once `grace` seconds passed with no channel open on it
        (one that opens meanwhile keeps it until the last channel ends, see _forget)."""
        self._drain_grace = grace
        nursery = self._nursery
        if nursery is None:  # not running yet: run() starts the watch
            return
        if grace <= 0:
            self._end_if_unused()
            return
        # RuntimeError: its tasks have all ended, the link is closing anyway
        with contextlib.suppress(RuntimeError):
            nursery.start_soon(self._close_if_idle, grace)

    async def _close_if_idle(self, grace: float) -> None:
        await trio.sleep(grace)
        self._end_if_unused()

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.can_queue = False
            for ch in list(self.channels.values()):
                ch._on_close()
            self.manager.buffered -= self.buffered  # the link's unread bytes go with it
            self.buffered = 0

    async def run(self) -> None:
        """Read frames until the link ends; closes everything on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # errors are handled inside the nursery: with strict exception groups an
                # exception leaving it would arrive wrapped in a group
                nursery.start_soon(self._keepalive)
                nursery.start_soon(self._flusher)
                if self._drain_grace is not None:  # it lost a simultaneous dial already
                    nursery.start_soon(self._close_if_idle, self._drain_grace)
                if not self.initiator and self.manager.node_of_key is not None:
                    nursery.start_soon(self._member_watch)
                try:
                    await self._read_loop(nursery)
                except (FrameError, LinkError, trio.BrokenResourceError, OSError) as exc:
                    if not isinstance(exc, LinkError):
                        self.manager.stats["links_dropped_bad_frames"] += 1
                    log.debug("link %s ended: %s", self.peer_addr, exc)
                nursery.cancel_scope.cancel()
        finally:
            self._mark_closed()
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            self.manager._unregister(self)

    async def _member_watch(self) -> None:
        """An accepted link must belong to a member: one that is not a live member
        NON_MEMBER_GRACE seconds after it came (or at any later check) is closed, so links
        from keys that never join cannot pile up (a joining node is a member in about a
        second; one that comes back later dials again)."""
        while True:
            await trio.sleep(NON_MEMBER_GRACE)
            if self.peer_node() is None:
                log.info("link %s: node %s is not a live member: closing it",
                         self.peer_addr, self.peer_id[:8])
                self.manager.stats["links_closed_not_member"] += 1
                await self.aclose()
                return

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE)
            if trio.current_time() - self.last_rx > DEAD_AFTER:
                log.info("link %s silent for %.0f s: closing it", self.peer_addr, DEAD_AFTER)
                await self.aclose()
                return
            with contextlib.suppress(ChannelClosed):
                await self._send(PING, 0, b"")

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        reader = self._reader = _Reader(self.stream, self._raw)
        if isinstance(self.stream, ChannelStream):  # relayed: frames taken in the outer
            self.stream.ch.hook = self._take_relayed  # link's reader when they can be
        frames = size = 0  # handled since the last yield (each an AEAD open, maybe a hook)
        while True:
            try:
                header = await reader.read(4)
            except (LinkError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            (n,) = LENGTH.unpack(header)
            self.cipher.check_length(n)
            self._in_frame = True  # its header is read: the hook must not go first
            body = await reader.read(n)
            self._in_frame = False
            self._on_frame(self.cipher.open(body), n, nursery)
            frames += 1
            size += 4 + n
            if frames >= YIELD_FRAMES or size >= YIELD_BYTES:  # a flood of small frames
                frames = size = 0  # cannot hold the loop (rawio's streak is a backstop)
                await trio.lowlevel.cancel_shielded_checkpoint()

    def _on_frame(self, plain: bytes, n: int, nursery: trio.Nursery) -> None:
        """Act on one opened frame (FrameError: the peer broke the protocol)."""
        self.last_rx = trio.current_time()
        st = self.manager.stats
        st["link_frames_in"] += 1
        st["link_bytes_in"] += 4 + n
        if len(plain) < HEADER.size:
            raise FrameError("frame without header")
        ftype, cid = HEADER.unpack_from(plain)
        if ftype == PING:
            return
        payload = plain[HEADER.size:]
        if ftype == OPEN:
            if cid in self.channels or (cid % 2 == 1) != (not self.initiator):
                raise FrameError(f"peer opened channel {cid} twice or with our parity")
            if not 0 < len(payload) <= MAX_CHANNEL_NAME:
                raise FrameError("channel name empty or too long")
            revoked = self.manager.is_revoked
            if revoked is not None and revoked(self.peer_public):
                raise FrameError("the peer's identity was revoked")  # ends the link
            name = payload.decode("utf-8", "replace")
            ch = Channel(self, cid, name)
            self.channels[cid] = ch
            handler = self.manager.handlers.get(name)
            if handler is None or len(self.channels) > self.manager.max_channels:
                if handler is not None:
                    self.manager.stats["channels_refused_cap"] += 1
                nursery.start_soon(ch.aclose)
            else:
                nursery.start_soon(self._serve_channel, handler, ch)
            return
        ch = self.channels.get(cid)
        if ftype in (DATA, END):
            if ch is not None:
                ch._on_data(ftype, payload)
        elif ftype == WINDOW:
            if len(payload) != 4:
                raise FrameError("bad window frame")
            if ch is not None:
                ch._on_window(int.from_bytes(payload, "big"))
        elif ftype == CLOSE:
            if ch is not None:
                ch._on_close()
        else:
            raise FrameError(f"unknown frame type {ftype}")

    def _take_relayed(self, message: bytes) -> bool:
        """The relay channel's hook of a relayed link: a message that holds whole frames,
        with nothing of the stream read before it, is opened and acted on here, in the
        outer link's reader (no task hop); else it stays for the read loop (False). Once a
        frame was opened the message is taken whatever happens (the nonces moved on): a
        bad frame closes this link, never the outer one."""
        stream = self.stream
        nursery = self._nursery
        if self.closed or nursery is None or self._reader is None or self._reader.buf or \
                self._in_frame or stream._buf or stream.ch._holding:  # type: ignore[attr-defined]
            return False  # something read before it is not acted on yet: order first
        if stream.tagged:  # type: ignore[attr-defined]
            message = message[1 + TAG_BYTES:] if message[:1] == b"\x01" else message[1:]
        bounds, pos, size = [], 0, len(message)
        while pos < size:
            if size - pos < 4:
                return False
            (n,) = LENGTH.unpack_from(message, pos)
            if size - pos - 4 < n:
                return False
            bounds.append((pos + 4, n))
            pos += 4 + n
        if not bounds:
            return False  # end of the stream: the read loop's to see
        try:
            for start, n in bounds:
                self.cipher.check_length(n)
                self._on_frame(self.cipher.open(message[start:start + n]), n, nursery)
        except FrameError as exc:
            self.protocol_fault(str(exc))
        return True

    async def _serve_channel(self, handler: Callable[[Channel], Awaitable[None]],
                             ch: Channel) -> None:
        try:
            await handler(ch)
        except (ChannelClosed, LinkError, wire.WireError, trio.BrokenResourceError,
                trio.ClosedResourceError):
            pass
        except BaseException as exc:  # a handler failure ends its channel only
            if serving.must_propagate(exc) is not None:
                raise
            self.manager.stats["channel_handler_errors"] += 1
            log.warning("handler for channel %r from %s failed", ch.name, self.peer_addr,
                        exc_info=exc)
        finally:
            await ch.aclose()

    async def aclose(self) -> None:
        self._mark_closed()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class LinkManager:
    """Owns every link of this node; runs them in its nursery."""

    def __init__(self, identity: Identity, keyring: Keyring, advertise: str,
                 max_frame: int = 1 << 20, handshake_timeout: float = 5.0,
                 max_channels: int = MAX_CHANNELS, max_message: int = MAX_MESSAGE,
                 link_buffer: int = LINK_BUFFER, node_buffer: int = NODE_BUFFER) -> None:
        self.identity = identity
        self.keyring = keyring
        self.advertise = advertise
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_channels = max_channels
        self.max_message = max_message
        self.link_buffer = link_buffer
        self.node_buffer = node_buffer
        self.buffered = 0  # unread bytes on every link
        self.handlers: dict[str, Callable[[Channel], Awaitable[None]]] = {}
        self.links: dict[str, Link] = {}
        self.live: set[Link] = set()  # every running link, filed or not (draining ones too)
        # dials under way: addr -> (done, through relays)
        self._dialing: dict[str, tuple[trio.Event, bool]] = {}
        self._nursery: trio.Nursery | None = None
        self.listeners: list[Any] = []
        self.stats: dict[str, int] = {
            "links_accepted": 0, "links_dialed": 0, "handshakes_failed": 0,
            "links_dropped_bad_frames": 0, "links_relayed": 0, "relay_sessions": 0,
            "links_refused_identity": 0, "links_refused_revoked": 0,
            "links_closed_not_member": 0,
            "channels_refused_cap": 0, "channel_handler_errors": 0,
            "link_frames_in": 0, "link_frames_out": 0, "link_bytes_in": 0,
            "link_bytes_out": 0}
        self.gate_tcp = serving.Gate("link_tcp", self.stats, pending_timeout=handshake_timeout)
        self.gate_ws = serving.Gate("link_ws", self.stats, pending_timeout=handshake_timeout)
        # route(addr) -> (next hop address, destination node name) when addr is reached
        # through relays; None when it is (or may be) reachable directly
        self.route: Callable[[str], tuple[str, str] | None] | None = None
        # name of a node -> its address, for relays to find their next hop
        self.next_hop_for: Callable[[str], str | None] | None = None
        # identity: the key of the live member at an address (None: no live member there),
        # the member holding a key, and whether a key is revoked (set by the node)
        self.expected_key: Callable[[str], bytes | None] | None = None
        self.node_of_key: Callable[[bytes], str | None] | None = None
        self.is_revoked: Callable[[bytes], bool] | None = None
        self.my_name = ""
        self.tracer: Any = None  # debug.traces.Tracer: relays record spans (set by the node)
        self.handlers[RELAY] = self._serve_relay

    async def run(self, listeners: list[trio.SocketListener],
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept links on `listeners` (from trio.open_tcp_listeners) until cancelled."""
        self.listeners = listeners
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serving.serve, listeners, self._accept_one, self.gate_tcp)
            task_status.started(listeners[0].socket.getsockname()[1])

    def _refusal(self, keys: LinkKeys, addr: str | None) -> str | None:
        """Why a link with these proven keys must not be used (None: fine). `addr` is the
        address we dialed (None for an accepted link)."""
        if self.is_revoked is not None and self.is_revoked(keys.peer_public):
            self.stats["links_refused_revoked"] += 1
            return f"node {keys.peer_id[:8]} is revoked"
        if addr is not None:
            want = self.expected_key(addr) if self.expected_key is not None else None
            if want is not None and want != keys.peer_public:
                self.stats["links_refused_identity"] += 1
                return (f"{addr} answered as node {keys.peer_id[:8]}, not the member known "
                        f"at that address ({node_id_from_public(want)[:8]})")
        return None

    async def _accept_one(self, stream: Any, ticket: serving.Ticket | None = None) -> None:
        responder = Responder(self.identity, self.keyring, self.advertise)
        keys: LinkKeys | None = None
        deadline = ticket.deadline if ticket is not None else \
            trio.current_time() + self.handshake_timeout
        with trio.move_on_at(deadline):
            try:
                hello = await _read_plain(stream)
                try:
                    welcome = responder.on_hello(hello)
                except HandshakeError as exc:
                    await stream.send_all(_plain(Responder.reject(str(exc))))
                    raise
                await stream.send_all(_plain(welcome))
                keys = responder.on_confirm(await _read_plain(stream))
            except (HandshakeError, LinkError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                self.stats["handshakes_failed"] += 1
                log.debug("refused link from %s: %s", _peer_name(stream), exc)
        if keys is not None:
            why = self._refusal(keys, None)
            if why is not None:
                log.info("refused link from %s: %s", _peer_name(stream), why)
                keys = None
        if keys is None:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        if ticket is not None:
            ticket.authenticated()
        self.stats["links_accepted"] += 1
        link = Link(self, stream, FrameCipher(keys.send_key, keys.recv_key, self.max_frame),
                    keys, initiator=False, initiator_id=keys.peer_id)
        link.relayed = isinstance(stream, ChannelStream)
        want = self.expected_key(link.peer_addr) if self.expected_key is not None else None
        if want is not None and want != link.peer_public:
            # the address it claims belongs to a live member with another key: serve the
            # channels it opens, under an address that reaches nothing else
            log.info("link from node %s claims %s, the address of another member: filed "
                     "as %s", keys.peer_id[:8], link.peer_addr, KEY_PREFIX + keys.peer_id)
            self.stats["links_refused_identity"] += 1
            link.peer_addr = KEY_PREFIX + keys.peer_id
        self._register(link)
        await link.run()

    def _register(self, link: Link) -> None:
        self.live.add(link)
        old = self.links.get(link.peer_addr)
        if old is not None and not old.closed and old is not link:
            if old.peer_public != link.peer_public:
                # another key already holds this address: keep the one expected there
                want = self.expected_key(link.peer_addr) if self.expected_key else None
                if want != link.peer_public:
                    link.peer_addr = KEY_PREFIX + link.peer_id
                    self.links[link.peer_addr] = link
                    return
                old.draining = True
                self._unregister(old)
                self.links[link.peer_addr] = link
                return
            # both sides dialed: keep the link dialed by the lower node id; the same side
            # dialing again (a redial, or through relays now) replaces its older link
            keep_new = link.initiator_id <= old.initiator_id
            loser = old if keep_new else link
            loser.draining = True
            # in a simultaneous dial the peer may have opened a channel on the loser before
            # it saw the winner (its OPEN is on the wire): an idle loser closes after a
            # grace then, not at once
            loser.close_when_idle_after(
                0 if link.initiator_id == old.initiator_id else DRAIN_GRACE)
            if not keep_new:
                return
        self.links[link.peer_addr] = link

    def _unregister(self, link: Link) -> None:
        for key in [k for k, v in self.links.items() if v is link]:
            del self.links[key]
        if link.closed:
            self.live.discard(link)

    async def close_key(self, key: bytes) -> int:
        """Close every link whose peer proved `key` (a revoked node); how many."""
        doomed = [link for link in self.live if link.peer_public == key]
        for link in doomed:
            await link.aclose()
            self.live.discard(link)
        return len(doomed)

    def _usable(self, link: Link, addr: str) -> bool:
        """A filed link may carry traffic meant for `addr` only while its key is the one
        expected there (a member's key can change only after it died and was reaped)."""
        if addr.startswith(KEY_PREFIX) or self.expected_key is None:
            return True
        want = self.expected_key(addr)
        return want is None or want == link.peer_public

    async def connect(self, addr: str) -> Link:
        """The link to addr, dialing it if needed (LinkError with the reason on failure)."""
        while True:
            link = self.links.get(addr)
            if link is not None and not link.closed and not link.draining:
                if not self._usable(link, addr):
                    self._unregister(link)
                    continue
                if link.relayed or self.route is None or self.route(addr) is None:
                    return link
                # the routes now go through relays: this direct link is a dead end (it
                # closes once its last channel ends, at once if it has none)
                link.draining = True
                self._unregister(link)
                link.close_when_idle_after(0)
                continue
            if addr.startswith(KEY_PREFIX):
                raise LinkError(f"no link to {addr}")
            pending = self._dialing.get(addr)
            if pending is None:
                break
            done, relayed = pending
            if not relayed and self.route is not None and self.route(addr) is not None:
                break  # a direct dial is under way, but routes now go around it: do not wait
            await done.wait()
        event = trio.Event()
        self._dialing[addr] = (event, self.route is not None and self.route(addr) is not None)
        try:
            link = await self._dial(addr)
        finally:
            if self._dialing.get(addr, (None, False))[0] is event:
                del self._dialing[addr]
            event.set()
        return link

    async def serve_ws(self, host: str, port: int,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept links over WebSocket on host:port (binary messages carry the link)."""
        listeners = await serving.open_tcp(host, port)

        async def on_ws(ws: Any, ticket: serving.Ticket) -> None:
            await self._accept_one(WsStream(ws), ticket)

        handler = serving.websocket_handler(on_ws, self.max_frame + 64)
        await serving.serve(listeners, handler, self.gate_ws, task_status=task_status)

    async def _open_stream(self, addr: str) -> Any:
        if addr.startswith(("ws://", "wss://")):
            import trio_websocket

            assert self._nursery is not None
            try:
                ws = await trio_websocket.connect_websocket_url(
                    self._nursery, addr, max_message_size=self.max_frame + 64)
            except (trio_websocket.HandshakeError, trio_websocket.ConnectionRejected) as exc:
                raise LinkError(f"websocket handshake with {addr} failed: {exc}") from None
            return WsStream(ws)
        try:
            host, port = addrs.parse(addr)
        except addrs.AddressError as exc:
            raise LinkError(str(exc)) from None
        return await trio.open_tcp_stream(host, port)

    async def _relay_stream(self, addr: str) -> Any:
        """A byte stream to addr through the relays of its route, or None if direct."""
        hop = self.route(addr) if self.route is not None else None
        if hop is None:
            return None
        next_addr, dest = hop
        ch = await self.open_channel(next_addr, RELAY)
        await ch.send(wire.dumps({"dest": dest, "hops": MAX_HOPS - 1, "tags": True}))
        self.stats["links_relayed"] += 1
        return ChannelStream(ch, tagged=True)

    async def _serve_relay(self, ch: Channel) -> None:
        """Carry a relayed link one hop further, or end it here if we are its destination.
        What passes through is the endpoints' ciphertext; a hop limit stops loops. A
        message goes on from the reader that brought it when it can (`forward`: no task
        hop); a pump per direction carries the rest, in order."""
        try:
            head = wire.loads(await ch.receive(), max_depth=4, max_bytes=1024)
            dest, hops, tagged = head["dest"], head["hops"], head.get("tags", False)
            if not isinstance(dest, str) or type(hops) is not int or type(tagged) is not bool:
                raise TypeError
            hops = min(hops, MAX_HOPS - 1)  # the budget is ours to bound, not the sender's
        except (wire.WireError, TypeError, KeyError):
            return
        if dest == self.my_name:
            await self._accept_one(ChannelStream(ch, tagged=tagged))
            return
        if hops <= 0:
            log.info("relay to %s dropped: hop limit reached", dest)
            return
        next_addr = self.next_hop_for(dest) if self.next_hop_for is not None else None
        if next_addr is None:
            log.info("relay to %s dropped: no route", dest)
            return
        try:
            onward = await self.open_channel(next_addr, RELAY)
        except (LinkError, ChannelClosed) as exc:
            log.info("relay to %s via %s failed: %s", dest, next_addr, exc)
            return
        self.stats["relay_sessions"] += 1
        await onward.send(wire.dumps({"dest": dest, "hops": hops - 1, "tags": tagged}))
        tracer = self.tracer if tagged else None
        # the traceparents this session recorded a span for lately (one span per call and
        # direction), and a budget of RELAY_SPAN_RATE spans a second: a member cannot flush
        # this node's spans through one session
        recent: dict[bytes, None] = {}
        budget = TokenBuckets(RELAY_SPAN_BURST, RELAY_SPAN_RATE, cap=1)

        def record(tag: bytes) -> bool:
            if tag in recent or budget.take("", trio.current_time()):
                return False
            recent[tag] = None
            if len(recent) > RELAY_RECENT:
                del recent[next(iter(recent))]
            return True

        busy = {ch: False, onward: False}  # a pump is sending a message from that side

        def forward(src: Channel, dst: Channel, message: bytes) -> bool:
            """In the reader: pass a message straight on when nothing of its direction is
            waiting (order kept) and it needs no span; else the pump takes it."""
            if busy[src] or (tracer is not None and message[:1] == b"\x01"):
                return False
            return dst.send_nowait(message)

        async def pump(src: Channel, dst: Channel, cancel: trio.CancelScope) -> None:
            try:
                while True:
                    message = await src.receive()
                    busy[src] = True
                    if tracer is not None and message[:1] == b"\x01" and \
                            record(message[1:1 + TAG_BYTES]):
                        await self._relay_traced(tracer, message, src, dst, dest)
                    else:
                        await dst.send(message)
                    busy[src] = False
            except ChannelClosed:
                cancel.cancel()  # one side is gone: the relayed link ends both ways

        async with onward, trio.open_nursery() as nursery:
            ch.hook = lambda message: forward(ch, onward, message)
            onward.hook = lambda message: forward(onward, ch, message)
            nursery.start_soon(pump, ch, onward, nursery.cancel_scope)
            nursery.start_soon(pump, onward, ch, nursery.cancel_scope)

    async def _relay_traced(self, tracer: Any, message: bytes, src: Channel, dst: Channel,
                            dest: str) -> None:
        """Carry a tagged message on, recording this relay's span of its call."""
        ctx = traces.parse(message[1:1 + TAG_BYTES].decode("ascii", "replace"))
        wall, t0 = time.time(), time.perf_counter()
        await dst.send(message)
        if ctx is not None and ctx.sampled:
            tracer.child_span(ctx, "relay", "relay", "", wall, time.perf_counter() - t0,
                              attrs={"from": src.peer_node or src.peer_addr,
                                     "to": dst.peer_node or dst.peer_addr,
                                     "destination": dest})

    async def _dial(self, addr: str) -> Link:
        initiator = Initiator(self.identity, self.keyring, self.advertise)
        stream: Any = None
        try:
            with trio.fail_after(self.handshake_timeout):
                stream = await self._relay_stream(addr) or await self._open_stream(addr)
                await stream.send_all(_plain(initiator.hello()))
                confirm, keys = initiator.on_welcome(await _read_plain(stream))
                why = self._refusal(keys, addr)
                if why is not None:
                    raise HandshakeError(why)
                await stream.send_all(_plain(confirm))
        except trio.TooSlowError:
            self.stats["handshakes_failed"] += 1
            if stream is not None:
                await stream.aclose()
            raise LinkError(f"{addr} did not answer within {self.handshake_timeout:.0f} s"
                            ) from None
        except (OSError, HandshakeError, LinkError, ChannelClosed,
                trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.stats["handshakes_failed"] += 1
            if stream is not None:
                await stream.aclose()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LinkError(reason) from None
        self.stats["links_dialed"] += 1
        link = Link(self, stream, FrameCipher(keys.send_key, keys.recv_key, self.max_frame),
                    keys, initiator=True, initiator_id=self.identity.node_id)
        link.relayed = isinstance(stream, ChannelStream)
        # the peer may advertise another address than the one we dialed: file it under both
        # (the second only if nobody else is expected there)
        keys_addr = link.peer_addr
        link.peer_addr = addr
        self._register(link)
        if keys_addr != addr and keys_addr not in self.links and self._usable(link, keys_addr):
            self.links[keys_addr] = link
        assert self._nursery is not None
        self._nursery.start_soon(link.run)
        return link

    async def open_channel(self, addr: str, name: str) -> Channel:
        link = await self.connect(addr)
        try:
            return await link.open_channel(name)
        except ChannelClosed:
            link = await self.connect(addr)  # one retry on a fresh link
            return await link.open_channel(name)

    async def aclose(self) -> None:
        for link in list(self.links.values()):
            await link.aclose()
        for listener in self.listeners:
            await listener.aclose()


def _peer_name(stream: Any) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return addrs.format(host, port)
    except (OSError, AttributeError):
        return "websocket peer" if isinstance(stream, WsStream) else "?"
