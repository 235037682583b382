"""Broker traffic between daemons: one ordered, flow-controlled pipe per destination node.

Rules:
- Everything a daemon sends another for the broker (copies of published messages, durable
  deliveries, acks, naks) goes through that node's `Outbox`, in the order it was put in,
  over one long-lived link channel "broker" (multi-hop routes as RPC's: the link manager
  relays). So copies from one publisher's daemon to one node arrive in publish order.
- An outbox holds at most `size` items; `put` waits when it is full. A receiver that stops
  reading (a subscriber with the "block" policy) fills the channel's window, then the
  outbox, then the publisher's `put`: back-pressure reaches the publisher, nothing is
  buffered without bound.
- Items are sent in batches (what waits when the pump runs, up to BATCH), one CBOR map
  `{"t": "batch", "items": [...]}` per channel message.
- Core delivery is at-most-once: when the link fails, the batch in hand is dropped and
  counted (`broker_copies_dropped`), and the next batch dials again. Durable deliveries
  do not rely on this pipe for safety: the origin redelivers whatever is not acked.
- `close()` ends the pump (the node left or died); what is still queued is dropped and
  counted.
- Whatever is dropped is handed to `on_drop(node, items)` if set: a durable delivery that
  never left this node was never attempted, so the origin offers it again without counting
  the attempt (durable.DurableTopics.dropped), and a subscriber cut off for longer than
  max_deliver ack waits does not send its messages to the dead letter topic.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import cbor2
import trio

from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

log = logging.getLogger("meshd.broker")
CHANNEL = "broker"
BATCH = 256
OUTBOX = 512  # items: with BATCH, what may wait for one node beside the channel window
IDLE_CLOSE = 60.0  # seconds without traffic before the channel is closed


class Outbox:
    def __init__(self, node: str, links: LinkManager, addr_of: Callable[[str], str | None],
                 stats: dict[str, int], size: int = OUTBOX) -> None:
        self.node = node
        self.links = links
        self.addr_of = addr_of
        self.stats = stats
        self.size = size
        self._items: deque[Any] = deque()
        self._closed = False
        self._more = trio.Event()  # set when an item is queued or the outbox closes
        self._room = trio.Event()  # set when the pump takes items (a full outbox waits)
        self._ch: Channel | None = None
        self.on_drop: Callable[[str, list[Any]], None] | None = None

    async def put(self, item: Any) -> None:
        """Queue one item for the node (waits only while the outbox is full: a publisher
        that does not have to wait goes on at once, so items leave in large batches)."""
        while len(self._items) >= self.size and not self._closed:
            await self._room.wait()
        self._queue(item)

    def put_nowait(self, item: Any) -> bool:
        """Queue an item if there is room (acks and naks: small, never worth blocking)."""
        if len(self._items) >= self.size:
            self._dropped([item])
            return False
        return self._queue(item)

    def _dropped(self, items: list[Any]) -> None:
        self.stats["broker_copies_dropped"] += len(items)
        if self.on_drop is not None and items:
            self.on_drop(self.node, items)

    def _queue(self, item: Any) -> bool:
        if self._closed:
            self._dropped([item])
            return False
        self._items.append(item)
        self._more.set()
        return True

    def close(self) -> None:
        self._closed = True
        self._more.set()
        self._room.set()

    async def run(self) -> None:
        try:
            while True:
                if not self._items:
                    if self._closed:
                        return
                    self._more = trio.Event()
                    with trio.move_on_after(IDLE_CLOSE) as idle:
                        await self._more.wait()
                    if idle.cancelled_caught:
                        await self._close_channel()
                    continue
                n = min(BATCH, len(self._items))
                batch = [self._items.popleft() for _ in range(n)]
                self._room.set()
                self._room = trio.Event()
                await self._ship(batch)
        finally:
            self._closed = True
            self._room.set()
            left = list(self._items)
            self._items.clear()
            self._dropped(left)
            with trio.CancelScope(shield=True):
                await self._close_channel()

    async def _ship(self, batch: list[Any]) -> None:
        payload = cbor2.dumps({"t": "batch", "items": batch})
        for attempt in range(2):  # a channel that died while idle: dial once more
            try:
                if self._ch is None:
                    addr = self.addr_of(self.node)
                    if addr is None:
                        break
                    with trio.fail_after(10):
                        self._ch = await self.links.open_channel(addr, CHANNEL)
                await self._ch.send(payload)
                self.stats["broker_batches_out"] += 1
                return
            except (LinkError, ChannelClosed, trio.TooSlowError,
                    trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("broker batch to %s failed (attempt %d): %s", self.node,
                          attempt + 1, exc)
                await self._close_channel()
        self._dropped(batch)

    async def _close_channel(self) -> None:
        ch, self._ch = self._ch, None
        if ch is not None:
            with trio.move_on_after(1):
                with contextlib.suppress(LinkError, ChannelClosed, trio.BrokenResourceError,
                                         trio.ClosedResourceError):
                    await ch.aclose()
