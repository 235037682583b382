"""Membership shell: drives the sans-IO core with trio, sealed UDP and secure links.

Rules:
- The core is only touched from this component's tasks; every call's Output goes through
  `_dispatch`, which sends, publishes events and wakes the timer task.
- UDP packets that do not decode are dropped and counted; stream messages that do not decode
  close that channel. Neither reaches the core.
- Reliable sends (push-pull, the TCP fallback ping) each run in their own task on a channel
  named "membership"; a request's reply comes back on the same channel.
- At most MAX_PUSH_PULLS push-pull requests (full or digest) are served at once, as
  memberlist caps them (memberlist#158: push-pull storms at scale); more are refused by
  closing their channel, and counted. Digests go only to members that advertise membership
  protocol 3 (meshd/versions.py); others get the full table.
- Event subscribers get a bounded queue; one that falls behind is dropped, never waited for,
  and one whose block ends (`subscription`) is gone at once (member_watchers counts them).
- Leaving is confirmed, not hoped for: besides the core's gossip of Dead(self), every live
  member gets a farewell over a stream (a Ping with Dead(self) piggybacked, as any probe
  carries broadcasts) and answers with an Ack once its core has applied it. `leave` returns
  when all have answered or its time is up (bounded: SIGTERM must end well under 2 s); a
  member that did not answer learns it from the others' gossip.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import trio

from meshd import versions
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager
from meshd.transport.udp import UdpTransport

from .core import MemberEvent, Membership, Output, Send
from .messages import (
    ALIVE,
    DIGEST_VERSION,
    SUSPECT,
    Ack,
    Dead,
    DecodeError,
    Digest,
    Ping,
    PushPull,
    decode_packet,
    encode_packet,
)

log = logging.getLogger("meshd.membership")
CHANNEL = "membership"
DGRAM_CHANNEL = "membership-dgram"  # datagrams for peers reached over WebSocket links
STREAM_TIMEOUT = 10.0
# Farewells in flight at once when leaving: a small cluster hears from us directly, a large
# one from as many members as the leave budget allows, and from their gossip.
FAREWELL_FANOUT = 32
# push-pull requests served at once (memberlist's maxPushPullRequests)
MAX_PUSH_PULLS = 128
_LOG_KINDS = {"join": logging.INFO, "left": logging.INFO, "dead": logging.WARNING,
              "suspect": logging.INFO, "alive": logging.INFO, "conflict": logging.ERROR,
              "update": logging.DEBUG, "reap": logging.DEBUG}


def _push_pull_request(msg: Any) -> bool:
    """A push-pull that asks for an answer on its stream (full or digest)."""
    return isinstance(msg, Digest) or (isinstance(msg, PushPull) and not msg.reply)


class MembershipService:
    def __init__(self, core: Membership, udp: UdpTransport, links: LinkManager,
                 join_timeout: float = 5.0) -> None:
        self.core = core
        self.udp = udp
        self.links = links
        self.join_timeout = join_timeout
        self.stats = {"decode_errors": 0, "stream_errors": 0, "core_faults": 0,
                      "refused_senders": 0, "member_watchers": 0,  # subscribed now
                      "push_pulls_serving": 0, "push_pulls_refused": 0}
        core.takes_digests = self._takes_digests
        # whether datagrams from an address are taken at all (not from revoked members)
        self.accept_sender: Callable[[str], bool] | None = None
        self._kick = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._subscribers: list[trio.MemorySendChannel[MemberEvent]] = []
        self._join_waiters: dict[str, tuple[trio.Event, list[MemberEvent]]] = {}
        self._udp_warned: set[str] = set()
        self._conflict_logged: dict[str, float] = {}
        self.on_change: Callable[[], None] | None = None
        # called synchronously for every event (must not block)
        self.listeners: list[Callable[[MemberEvent], None]] = []
        links.handlers[CHANNEL] = self._serve_channel
        links.handlers[DGRAM_CHANNEL] = self._serve_dgrams
        self._dgram: dict[str, Channel] = {}
        self._dgram_locks: dict[str, trio.Lock] = {}

    # --- running -------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.udp.serve, self._on_udp)
            nursery.start_soon(self._timer_loop)
            task_status.started()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            if deadline > trio.current_time():
                with trio.move_on_at(deadline if math.isfinite(deadline) else math.inf):
                    await self._kick.wait()
                self._kick = trio.Event()
            now = trio.current_time()
            if now >= self.core.next_deadline():
                self._dispatch(self.core.tick(now))

    def _dispatch(self, out: Output) -> None:
        for send in out.sends:
            if send.reliable:
                assert self._nursery is not None
                self._nursery.start_soon(self._stream_send, send)
            elif _over_link(send.addr) or _over_link(self.core.me.addr):
                # a WebSocket node neither receives nor sends UDP: datagrams ride its links
                self._nursery.start_soon(self._send_dgram, send.addr,  # type: ignore[union-attr]
                                         encode_packet(send.msgs))
            else:
                self._nursery.start_soon(self.udp.send, send.addr,  # type: ignore[union-attr]
                                         encode_packet(send.msgs))
        for ev in out.events:
            self._publish(ev)
        self._kick.set()
        if out.events and self.on_change is not None:
            self.on_change()

    def _publish(self, ev: MemberEvent) -> None:
        if ev.kind in ("join-ok", "join-failed"):
            waiter = self._join_waiters.get(ev.addr)
            if waiter is not None:
                waiter[1].append(ev)
                waiter[0].set()
        if ev.kind == "udp-unreachable":
            if ev.node not in self._udp_warned:
                self._udp_warned.add(ev.node)
                log.warning("member %s at %s %s", ev.node, ev.addr, ev.detail)
        elif ev.kind == "conflict" and not self._conflict_log_due(ev.node):
            pass  # a hostile or confused peer can repeat this endlessly: log it sparingly
        else:
            level = _LOG_KINDS.get(ev.kind, logging.DEBUG)
            log.log(level, "member %s %s addr=%s incarnation=%s %s", ev.node, ev.kind,
                    ev.addr, ev.incarnation, ev.detail)
        for listener in self.listeners:
            listener(ev)
        for sub in list(self._subscribers):
            try:
                sub.send_nowait(ev)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(sub)
                self.stats["member_watchers"] = len(self._subscribers)
                sub.close()

    def _conflict_log_due(self, name: str) -> bool:
        now = trio.current_time()
        if now - self._conflict_logged.get(name, -math.inf) < 60.0:
            return False
        if len(self._conflict_logged) > 1000:
            self._conflict_logged.clear()
        self._conflict_logged[name] = now
        return True

    @contextlib.contextmanager
    def subscription(self, size: int = 1000
                     ) -> Iterator[trio.MemoryReceiveChannel[MemberEvent]]:
        """Member events as they happen, until the block ends: then the subscriber is gone
        at once (a watcher that hung up must not wait for the next event to be dropped)."""
        send, recv = trio.open_memory_channel[MemberEvent](size)
        self._subscribers.append(send)
        self.stats["member_watchers"] = len(self._subscribers)
        try:
            yield recv
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(send)
            self.stats["member_watchers"] = len(self._subscribers)
            send.close()

    # --- packets in ------------------------------------------------------------------------

    def _on_udp(self, sender: str, plaintext: bytes) -> None:
        if self.accept_sender is not None and not self.accept_sender(sender):
            self.stats["refused_senders"] += 1
            return
        try:
            msgs = decode_packet(plaintext)
        except DecodeError:
            self.stats["decode_errors"] += 1
            return
        self._deliver(sender, msgs, False)

    def apply(self, out: Output) -> None:
        """Send and publish what a call on the core (made by another component) returned."""
        self._dispatch(out)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Change this node's tags and spread them (a new incarnation)."""
        self._dispatch(self.core.update_tags(tags, trio.current_time()))

    def _receive(self, sender: str, msgs: list[Any], reliable: bool) -> Output | None:
        """Hand a packet to the core. A core fault on hostile input is logged and the packet
        dropped: one peer's bytes must never stop the node."""
        try:
            return self.core.receive(sender, msgs, trio.current_time(), reliable)
        except Exception:
            self.stats["core_faults"] += 1
            log.exception("membership core failed on a packet from %s; dropped it", sender)
            return None

    def _deliver(self, sender: str, msgs: list[Any], reliable: bool) -> None:
        out = self._receive(sender, msgs, reliable)
        if out is not None:
            self._dispatch(out)

    async def _send_dgram(self, addr: str, packet: bytes) -> None:
        """Best effort, like UDP: one long-lived channel per peer; failures drop the packet."""
        try:
            ch = self._dgram.get(addr)
            if ch is None or ch.link.closed:
                lock = self._dgram_locks.setdefault(addr, trio.Lock())
                async with lock:
                    ch = self._dgram.get(addr)
                    if ch is None or ch.link.closed:
                        with trio.fail_after(STREAM_TIMEOUT):
                            ch = await self.links.open_channel(addr, DGRAM_CHANNEL)
                        self._dgram[addr] = ch
            await ch.send(packet)
        except (LinkError, ChannelClosed, trio.TooSlowError):
            self._dgram.pop(addr, None)

    async def _serve_dgrams(self, ch: Channel) -> None:
        while True:
            data = await ch.receive()
            try:
                msgs = decode_packet(data)
            except DecodeError:
                self.stats["decode_errors"] += 1
                continue
            self._deliver(ch.peer_addr, msgs, False)

    def _takes_digests(self, name: str) -> bool:
        """Whether we and a member both speak membership protocol 3 (digest push-pull)."""
        m = self.core.members.get(name)
        if m is None:
            return False
        try:
            return versions.use("membership", versions.parse(m.tags.get(versions.TAG)),
                                name) >= DIGEST_VERSION
        except versions.VersionError:
            return False

    async def _serve_channel(self, ch: Channel) -> None:
        with trio.move_on_after(STREAM_TIMEOUT):
            data = await ch.receive()
            try:
                msgs = decode_packet(data)
            except DecodeError:
                self.stats["decode_errors"] += 1
                return
            request = _push_pull_request(msgs[0])
            if request and self.stats["push_pulls_serving"] >= MAX_PUSH_PULLS:
                self.stats["push_pulls_refused"] += 1
                return
            if request:
                self.stats["push_pulls_serving"] += 1
            try:
                await self._answer(ch, msgs)
            finally:
                if request:
                    self.stats["push_pulls_serving"] -= 1

    async def _answer(self, ch: Channel, msgs: list[Any]) -> None:
        sender = ch.peer_addr
        out = self._receive(sender, msgs, True)
        if out is None:
            return
        replies = [s for s in out.sends if s.reliable and s.addr == sender]
        out.sends = [s for s in out.sends if not (s.reliable and s.addr == sender)]
        self._dispatch(out)
        for reply in replies:
            await ch.send(encode_packet(reply.msgs))

    async def _stream_send(self, send: Send) -> None:
        msg = send.msgs[0]
        wants_reply = isinstance(msg, Ping) or _push_pull_request(msg)
        reason = ""
        try:
            with trio.fail_after(STREAM_TIMEOUT):
                ch = await self.links.open_channel(send.addr, CHANNEL)
                async with ch:
                    await ch.send(encode_packet(send.msgs))
                    if wants_reply:
                        msgs = decode_packet(await ch.receive())
                        self._deliver(send.addr, msgs, True)
            return
        except LinkError as exc:
            reason = str(exc)
        except ChannelClosed:
            reason = f"{send.addr} closed the stream"
        except trio.TooSlowError:
            reason = f"{send.addr} did not answer within {STREAM_TIMEOUT:.0f} s"
        except DecodeError:
            self.stats["decode_errors"] += 1
            reason = f"{send.addr} sent an invalid reply"
        self.stats["stream_errors"] += 1
        log.debug("stream to %s failed: %s", send.addr, reason)
        self._dispatch(self.core.stream_failed(send.addr, trio.current_time(), reason))

    # --- operations ------------------------------------------------------------------------

    async def join(self, addrs: list[str]) -> tuple[int, list[str]]:
        """Join through each address; returns (successes, error lines)."""
        addrs = [a for a in dict.fromkeys(addrs) if a != self.core.me.addr]
        waiters = {}
        for addr in addrs:
            waiters[addr] = self._join_waiters[addr] = (trio.Event(), [])
        try:
            self._dispatch(self.core.join(addrs, trio.current_time(), timeout=self.join_timeout))
            with trio.move_on_after(self.join_timeout + 1):
                for event, _ in waiters.values():
                    await event.wait()
        finally:
            for addr in addrs:
                self._join_waiters.pop(addr, None)
        ok, errors = 0, []
        for addr, (_, evs) in waiters.items():
            if evs and evs[0].kind == "join-ok":
                ok += 1
            else:
                detail = evs[0].detail if evs else "no reply"
                errors.append(f"{addr}: {detail}")
        return ok, errors

    def measure(self, names: list[str]) -> None:
        """One-off pings that measure direct RTTs (core rule P6)."""
        self._dispatch(self.core.measure(names, trio.current_time()))

    async def leave(self, timeout: float = 1.0) -> tuple[int, int]:
        """Tell the cluster we are leaving and make sure the live members heard it: gossip
        Dead(self) as usual, and send it to every live member over a stream, waiting for
        each one's Ack, for at most `timeout` seconds. If some did not answer, the rest of
        the time lets the gossip go out. Returns (members that confirmed, live members)."""
        deadline = trio.current_time() + timeout
        self._dispatch(self.core.leave(trio.current_time()))
        me = self.core.me
        peers = [m for m in self.core.member_list()
                 if m.name != me.name and m.state in (ALIVE, SUSPECT)]
        confirmed: set[str] = set()
        limiter = trio.CapacityLimiter(FAREWELL_FANOUT)
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for seq, m in enumerate(peers):
                    packet = encode_packet([Ping(seq, m.name, me.name, me.addr, True),
                                            Dead(me.incarnation, me.name, me.name)])
                    nursery.start_soon(self._farewell, m.name, m.addr, seq, packet, limiter,
                                       confirmed)
        if len(confirmed) < len(peers):
            missing = sorted({m.name for m in peers} - confirmed)
            log.info("leaving: %d of %d live members confirmed; not: %s", len(confirmed),
                     len(peers), ", ".join(missing[:10]))
            with trio.move_on_at(deadline):
                while self.core.pending_broadcasts():
                    await trio.sleep(0.05)
        elif peers:
            log.info("leaving: all %d live members confirmed", len(peers))
        return len(confirmed), len(peers)

    async def _farewell(self, name: str, addr: str, seq: int, packet: bytes,
                        limiter: trio.CapacityLimiter, confirmed: set[str]) -> None:
        """Send one member our leave over a stream; it is confirmed by the Ack to the Ping
        in the same packet (the member's core handles the whole packet before it answers)."""
        try:
            async with limiter:
                ch = await self.links.open_channel(addr, CHANNEL)
                async with ch:
                    await ch.send(packet)
                    reply = decode_packet(await ch.receive())
        except (LinkError, ChannelClosed, DecodeError) as exc:
            log.debug("farewell to %s at %s failed: %s", name, addr, exc)
            return
        if any(isinstance(msg, Ack) and msg.seq == seq for msg in reply):
            confirmed.add(name)


def _over_link(addr: str) -> bool:
    return addr.startswith(("ws://", "wss://"))
