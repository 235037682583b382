"""A core subscriber's inbox: a bounded buffer with the subscriber's policy for when it is full.

Rules:
- Holds at most `size` messages (broker.subscriber_buffer unless the subscription says).
- When full, the policy the subscriber chose decides:
  - "drop-oldest": the oldest waiting message makes room (the subscriber sees the newest);
  - "drop-newest": the arriving message is dropped (the subscriber sees an unbroken prefix);
  - "block": the deliverer waits until there is room, which holds up the copy's link
    channel and so, through flow control, the publisher (NATS calls this a slow consumer;
    block is for subscribers that must not lose a message and can keep up on average).
  Drops are counted (`dropped`) and shown by `meshd topics`; nothing is dropped silently.
- `close()` ends the inbox: waiting deliverers return at once, the reader gets what is left
  then EndOfInbox. Delivering to a closed inbox drops the message (counted as well).
- One reader; any number of deliverers. Order is delivery order.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import trio

Policy = Literal["drop-oldest", "drop-newest", "block"]
POLICIES: tuple[Policy, ...] = ("drop-oldest", "drop-newest", "block")


class EndOfInbox(Exception):
    """The inbox was closed and everything in it was read."""


class Inbox:
    def __init__(self, size: int, policy: Policy = "drop-oldest") -> None:
        if size < 1 or policy not in POLICIES:
            raise ValueError(f"an inbox holds at least 1 message; policy one of "
                             f"{', '.join(POLICIES)}")
        self.size = size
        self.policy = policy
        self.dropped = 0
        self.delivered = 0
        self._items: deque[Any] = deque()
        self._closed = False
        self._changed = trio.Event()  # set when an item arrives, is taken, or on close
        self._waiting = 0  # tasks waiting on _changed (no one waiting: nothing to set)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def deliver(self, item: Any) -> bool:
        """Put `item` in, as the policy says; whether it went in."""
        while len(self._items) >= self.size and not self._closed:
            if self.policy == "drop-newest":
                self.dropped += 1
                return False
            if self.policy == "drop-oldest":
                self._items.popleft()
                self.dropped += 1
                break
            await self._wait()
        if self._closed:
            self.dropped += 1
            return False
        self._items.append(item)
        self.delivered += 1
        self._notify()
        return True

    async def get(self) -> Any:
        """The next item, waiting for one; EndOfInbox once closed and empty."""
        while not self._items:
            if self._closed:
                raise EndOfInbox
            await self._wait()
        item = self._items.popleft()
        self._notify()
        return item

    async def take(self, most: int) -> list[Any]:
        """What is waiting, at most `most` items, waiting for at least one; EndOfInbox once
        closed and empty."""
        while not self._items:
            if self._closed:
                raise EndOfInbox
            await self._wait()
        n = min(most, len(self._items))
        out = [self._items.popleft() for _ in range(n)]
        self._notify()
        return out

    def close(self) -> None:
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = trio.Event()

    async def _wait(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1
