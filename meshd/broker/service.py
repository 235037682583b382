"""Broker shell (trio): local subscribers, interest replication, routing of published copies.

Theory of operation (docs/broker.md): the sans-IO parts decide, this shell does the I/O.
- A local subscriber is a control session (`broker.subscribe`): the daemon counts its
  interest in the `InterestTable`, gives it an `Inbox` (its buffer and policy) and a pump
  task that writes what arrives to the session in batches. When the session ends (the
  process exits, is killed, hangs up), the interest goes and the pump ends.
- Interest replication: every change of our record is pushed to `fanout` random live
  peers; a peer that learns something new pushes it on to `fanout` others (never back);
  every `sync_interval` a random live peer gets our digest and the two exchange the records
  that differ (anti-entropy, as the registry). A dead or left member's record is
  forgotten; a member that joins gets our record at once.
- Publishing asks `InterestTable.route` for the nodes that get one copy each; our own copy
  is delivered here, others go through that node's `Outbox` (links.py). A received copy
  is fanned out to the local subscribers `local_targets` names: every plain one, one
  member (round robin) of each queue group the copy is for.
- Durable topics (durable.py) hook in at publish, at receipt of durable deliveries and
  acks, and at member changes.
- Peers' messages are decoded strictly; a malformed one is counted and dropped (the link
  and the node stay up); a peer's interest record can only be about that peer (the record
  names its writer and we take it only from that writer or a relay of gossip, whose HLC
  rules decide).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio

from meshd import wire
from meshd.debug.traces import TRACEPARENT
from meshd.debug.traces import parse as parse_traceparent
from meshd.errors import MeshError, bad_request
from meshd.hlc import HLC
from meshd.membership.core import Membership
from meshd.membership.messages import ALIVE, LEFT, SUSPECT
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from . import messages
from .inbox import EndOfInbox, Inbox, Policy
from .interest import InterestTable
from .interest import WireError as InterestWireError
from .links import CHANNEL, Outbox
from .origin import DURABLE

log = logging.getLogger("meshd.broker")
PUMP_BATCH = 256
MAX_PEER_MESSAGE = 64 << 20


@dataclass
class LocalSub:
    id: str
    ns: str
    pattern: str
    queue: str | None  # the interest group: a queue group, DURABLE+name, or None
    inbox: Inbox
    who: str
    durable: str | None = None
    created: float = field(default_factory=time.time)
    # tags of the durable deliveries in flight to this subscriber (durable.py knows each)
    unacked: set[int] = field(default_factory=set)

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.ns, "pattern": self.pattern,
                "queue": None if self.durable else self.queue, "durable": self.durable,
                "who": self.who, "buffered": len(self.inbox), "policy": self.inbox.policy,
                "buffer": self.inbox.size, "delivered": self.inbox.delivered,
                "dropped": self.inbox.dropped, "unacked": len(self.unacked)}


class Credit:
    """Messages a subscriber's client is ready for: it grants more as it consumes."""

    def __init__(self, left: int) -> None:
        self.left = left
        self._more = trio.Event()

    def grant(self, n: int) -> None:
        self.left += n
        self._more.set()
        self._more = trio.Event()

    async def wait(self) -> None:
        while self.left <= 0:
            await self._more.wait()


_ROUTE, _TARGETS = object(), object()  # keys of the per-batch caches (never names)


def _not_durable(queue: str) -> bool:
    return not queue.startswith(DURABLE)


class BrokerService:
    def __init__(self, core: Membership, links: LinkManager, settings: Any,
                 cost: Callable[[str], float | None], sync_interval: float = 5.0,
                 fanout: int = 3) -> None:
        self.core = core
        self.links = links
        self.s = settings
        self.node = core.me.name
        self.cost = cost
        self.sync_interval = sync_interval
        self.fanout = fanout
        self.hlc = HLC(self.node, lambda: int(time.time() * 1000))
        self.interest = InterestTable(self.node, self.hlc)
        self.rng = random.Random()
        self.subs: dict[str, LocalSub] = {}
        self._by_key: dict[tuple[str, str, str | None], list[LocalSub]] = {}
        self._turn = itertools.count()
        self._ids = itertools.count(1)
        self._tags = itertools.count(1)
        self._outboxes: dict[str, Outbox] = {}
        self._sent: dict[str, int] = {}  # copies sent per node: the "load" of routing
        self._nursery: trio.Nursery | None = None
        self.durable: Any = None  # durable.DurableTopics, set by the node
        # answers another daemon's question about what this node holds (overview.py)
        self.on_query: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.tracer: Any = None  # debug.traces.Tracer (set by the node): traced messages
        self.stats = {"broker_delivered": 0, "broker_published": 0, "broker_copies_out": 0,
                      "broker_copies_in": 0,
                      "broker_copies_dropped": 0, "broker_batches_out": 0,
                      "broker_bad_messages": 0, "broker_unserved": 0,
                      "broker_interest_out": 0, "broker_interest_in": 0}
        links.handlers[CHANNEL] = self._serve_channel

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sync_loop)
            self._push(self.interest.record())  # L3: replaces what an earlier life published
            task_status.started()

    # --- members ---------------------------------------------------------------------------

    def _live(self, name: str) -> bool:
        m = self.core.members.get(name)
        return m is not None and m.state in (ALIVE, SUSPECT)

    def addr_of(self, name: str) -> str | None:
        """Where to send a node's outbox: any member that has not left. Copies and
        deliveries only go to nodes routing found reachable; acks, naks and replica
        answers go to whoever asked, also a node our membership still thinks dead (after
        a partition the other side may see us first): if it is gone the dial fails."""
        m = self.core.members.get(name)
        return m.addr if m is not None and m.state != LEFT else None

    def route_cost(self, name: str) -> float | None:
        """Cost of reaching `name` in whole milliseconds (near enough is equal, then load
        decides); None when it cannot be reached."""
        if not self._live(name):
            return None
        c = self.cost(name)
        return float(round((c or 0.0) * 1000))

    def load(self, name: str) -> float:
        return float(self._sent.get(name, 0))

    def on_member(self, ev: Any) -> None:
        """Membership listener: forget the interest of members that are gone; tell a member
        that (re)joined what we want."""
        if ev.node == self.node:
            return
        if ev.kind in ("dead", "left", "reap"):
            self.interest.forget(ev.node)
            box = self._outboxes.pop(ev.node, None)
            if box is not None:
                box.close()
            if self.durable is not None:
                self.durable.on_gone(ev.node)
        elif ev.kind in ("join", "alive") and self._nursery is not None:
            if ev.kind == "join":
                self._spawn_send(ev.addr, InterestTable.message(
                    {self.node: self.interest.record()}, self.interest.digest()))
            if self.durable is not None:
                self.durable.on_back(ev.node)

    # --- local subscribers -------------------------------------------------------------------

    def add_sub(self, ns: str, pattern: str, queue: str | None, who: str, size: int,
                policy: Policy, durable: str | None = None) -> LocalSub:
        group = DURABLE + durable if durable else queue
        record = self.interest.subscribe(ns, pattern, group)  # checks every name (400)
        sub = LocalSub(f"{self.node}-{next(self._ids)}", ns, pattern, group,
                       Inbox(size, policy), who, durable)
        self.subs[sub.id] = sub
        self._by_key.setdefault((ns, pattern, group), []).append(sub)
        self._push(record)
        return sub

    def drop_sub(self, sub: LocalSub) -> None:
        if self.subs.pop(sub.id, None) is None:
            return
        sub.inbox.close()
        key = (sub.ns, sub.pattern, sub.queue)
        subs = self._by_key.get(key, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._by_key.pop(key, None)
        record = self.interest.unsubscribe(sub.ns, sub.pattern, sub.queue)
        if record is not None:
            self._push(record)
        if sub.unacked and self.durable is not None:
            self.durable.release(sub)

    async def pump(self, sub: LocalSub, send: Callable[[Any], Any], credit: Credit) -> None:
        """Write what reaches `sub`'s inbox to its session, in batches, as far as the
        client's credit goes (what it has not consumed yet is bounded, so a subscriber that
        stops reading fills its inbox and its policy applies), until the inbox closes."""
        while True:
            await credit.wait()
            try:
                batch = await sub.inbox.take(min(PUMP_BATCH, credit.left))
            except EndOfInbox:
                return
            credit.left -= len(batch)
            frame: dict[str, Any] = {"msgs": batch}
            if sub.inbox.dropped:  # the subscriber learns it missed messages, and how many
                frame["dropped"] = sub.inbox.dropped
            await send(frame)

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, ns: str, msg: messages.Message, skip_plain: bool = False,
                      routes: dict[Any, Any] | None = None) -> dict[str, Any]:
        """Core delivery of `msg` to every interested node (durable groups excluded: the
        durable side delivers those from its log). `routes` (kept by the caller for a
        batch of messages) reuses a delivery that went to plain subscribers only: one
        with queue groups is chosen again for every message (load decides)."""
        self.stats["broker_published"] += 1
        rkey = (_ROUTE, ns, msg.topic)
        delivery = routes.get(rkey) if routes is not None else None
        if delivery is None:
            delivery = self.interest.route(ns, msg.topic, self.route_cost, self.load,
                                           queues=_not_durable)
            if routes is not None and delivery.reusable:
                routes[rkey] = delivery
        self.stats["broker_copies_dropped"] += len(delivery.unreachable)
        self.stats["broker_unserved"] += len(delivery.unserved)
        wired = msg.to_wire()
        here = {**wired, "node": self.node}
        for node, c in delivery.copies.items():
            plain = bool(c.plain) and not skip_plain
            if not plain and not c.groups:
                continue
            if node == self.node:
                await self.deliver_local(ns, msg.topic, here, plain, list(c.groups), routes)
                continue
            self._sent[node] = self._sent.get(node, 0) + 1
            self.stats["broker_copies_out"] += 1
            await self.outbox(node).put(messages.copy(ns, wired, plain, list(c.groups)))
        return {"id": msg.id, "nodes": len(delivery.copies)}

    def outbox(self, node: str) -> Outbox:
        box = self._outboxes.get(node)
        if box is None:
            box = self._outboxes[node] = Outbox(node, self.links, self.addr_of, self.stats)
            if self.durable is not None:
                box.on_drop = self.durable.dropped
            assert self._nursery is not None
            self._nursery.start_soon(box.run)
        return box

    async def deliver_local(self, ns: str, topic: str, wired: dict[str, Any], plain: bool,
                            groups: list[str], seen: dict[Any, Any] | None = None) -> int:
        """Fan one copy out to the local subscribers it is for; how many got it. `seen`
        (kept for one batch of copies) keeps the matching patterns per topic; the
        subscribers themselves are looked up for every copy."""
        key = (_TARGETS, ns, topic, *groups)
        targets = seen.get(key) if seen is not None else None
        if targets is None:
            targets = self.interest.local_targets(ns, topic, groups)
            if seen is not None:
                seen[key] = targets
        got = 0
        if plain:
            for pattern in targets.plain:
                for sub in list(self._by_key.get((ns, pattern, None), ())):
                    got += await sub.inbox.deliver(wired)
        for group, patterns in targets.groups.items():
            sub = self._one_of(ns, group, patterns)
            if sub is not None:
                got += await sub.inbox.deliver(wired)
        self.stats["broker_delivered"] += got
        headers = wired.get("headers")
        if headers and TRACEPARENT in headers and self.tracer is not None:
            self.trace_delivery(headers[TRACEPARENT], topic, got)
        return got

    def trace_delivery(self, traceparent: Any, topic: str, got: int,
                       durable: str = "") -> None:
        """A traced message reached this node's subscribers: its consumer span."""
        ctx = parse_traceparent(traceparent)
        if ctx is not None and ctx.sampled:
            attrs = {"subscribers": str(got), **({"durable": durable} if durable else {})}
            self.tracer.child_span(ctx, f"deliver {topic}", "consumer", "", time.time(), 0.0,
                                   attrs=attrs)

    def _one_of(self, ns: str, group: str, patterns: tuple[str, ...]) -> LocalSub | None:
        members = [s for p in patterns for s in self._by_key.get((ns, p, group), ())]
        if not members:
            return None
        return members[next(self._turn) % len(members)]

    # --- from peers ----------------------------------------------------------------------------

    async def _serve_channel(self, ch: Channel) -> None:
        peer = ch.peer_node
        try:
            while True:
                try:
                    data = await ch.receive()
                except ChannelClosed:
                    return
                try:
                    msg = wire.loads(data, max_depth=64)
                    if not isinstance(msg, dict):
                        raise wire.WireError("not a map")
                    if msg.get("t") == "batch" and isinstance(msg.get("items"), list):
                        seen: dict[Any, Any] = {}
                        for item in msg["items"]:  # a bad item is dropped alone
                            await self._receive_one(peer, item, seen)
                    elif msg.get("t") == "interest":
                        self._receive_interest(ch.peer_addr, msg)
                        return
                    elif msg.get("t") == "query" and self.on_query is not None:
                        await ch.send(cbor2.dumps(self.on_query(msg)))
                        return
                    else:
                        raise wire.WireError("unknown broker message")
                except (wire.WireError, messages.WireError, InterestWireError, ValueError,
                        TypeError, KeyError, MeshError) as exc:
                    self.stats["broker_bad_messages"] += 1
                    log.debug("bad broker message from %s: %s", peer, exc)
        except (LinkError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _receive_one(self, peer: str | None, item: Any,
                           seen: dict[Any, Any] | None = None) -> None:
        try:
            await self._receive_item(peer, item, seen)
        except (wire.WireError, messages.WireError, ValueError, TypeError, KeyError,
                MeshError) as exc:
            self.stats["broker_bad_messages"] += 1
            log.debug("bad broker item from %s: %s", peer, exc)

    async def _receive_item(self, peer: str | None, item: Any,
                            seen: dict[Any, Any] | None = None) -> None:
        if not isinstance(item, dict):
            raise wire.WireError("a batch item is a map")
        kind = item.get("t")
        if kind == "copy":
            ns, msg, plain, groups = messages.decode_copy(item, self.s.max_message_bytes)
            self.stats["broker_copies_in"] += 1
            # `node`: the publishing daemon, as the link proved it (the publisher field is
            # that daemon's word)
            await self.deliver_local(ns, msg.topic, {**msg.to_wire(), "node": peer}, plain,
                                     groups, seen)
        elif self.durable is not None and peer is not None:
            await self.durable.receive(peer, item)
        else:
            raise wire.WireError(f"unknown broker item {kind!r}")

    # --- interest replication -------------------------------------------------------------------

    def _peers(self) -> list[str]:
        return self.core.alive_peers()

    def _push(self, record: dict[str, Any], records: dict[str, Any] | None = None,
              exclude: str | None = None) -> None:
        """Push records (ours by default) to `fanout` random live peers."""
        if self._nursery is None:
            return
        peers = [p for p in self._peers() if p != exclude]
        payload = InterestTable.message(records or {self.node: record})
        for addr in self.rng.sample(peers, min(self.fanout, len(peers))):
            self._spawn_send(addr, payload)

    def _spawn_send(self, addr: str, payload: dict[str, Any]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_one, addr, cbor2.dumps(payload))

    def send_once(self, node: str, items: list[dict[str, Any]]) -> None:
        """Items on a channel of their own, not behind the node's outbox (a handover
        retried until confirmed must not wait behind a pipe that is still redialing)."""
        addr = self.addr_of(node)
        if addr is not None:
            self._spawn_send(addr, {"t": "batch", "items": items})

    async def _send_one(self, addr: str, payload: bytes) -> None:
        try:
            with trio.fail_after(5):
                async with await self.links.open_channel(addr, CHANNEL) as ch:
                    await ch.send(payload)
            self.stats["broker_interest_out"] += 1
        except (LinkError, ChannelClosed, trio.TooSlowError) as exc:
            log.debug("broker message to %s failed: %s", addr, exc)

    def _receive_interest(self, sender: str, msg: dict[str, Any]) -> None:
        """One interest message: the table decides (interest.py R6), this sends."""
        self.stats["broker_interest_in"] += 1
        out = self.interest.receive(msg)
        if out.push_ours:
            self._push(self.interest.record())
        if out.forward:  # rumor: pass what was new to us on
            self._push({}, out.forward, exclude=sender)
        answer = out.answer()
        if answer is not None:
            self._spawn_send(sender, answer)

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep(self.sync_interval * self.rng.uniform(0.5, 1.5))
            peers = self._peers()
            if peers:
                self._spawn_send(self.rng.choice(peers), InterestTable.message(
                    {}, self.interest.digest()))

    # --- views ---------------------------------------------------------------------------------

    def sub_rows(self, ns: str | None = None) -> list[dict[str, Any]]:
        return [s.row() for s in self.subs.values() if ns is None or s.ns == ns]

    def check_size(self, size: Any, policy: Any) -> tuple[int, Policy]:
        from .inbox import POLICIES

        size = self.s.subscriber_buffer if size is None else size
        if type(size) is not int or not 1 <= size <= 1_000_000:
            raise bad_request("buffer must be 1 to 1000000 messages", id="meshd.broker")
        policy = policy or "drop-oldest"
        if policy not in POLICIES:
            raise bad_request(f"policy must be one of {', '.join(POLICIES)}",
                              id="meshd.broker")
        return size, policy

    def next_tag(self) -> int:
        return next(self._tags)
