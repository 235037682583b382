"""Broker in the SDK: publish events, subscribe to topics, typed subscribers of a service.

    await client.publish("orders.created", Order(id=7), headers={"k": "v"})
    async with client.subscribe("orders.*", queue="billing") as sub:
        async for msg in sub:
            print(msg.topic, msg.body)
            await msg.ack()          # durable subscribers only; a no-op otherwise

    @service.subscriber("orders.created", queue="billing", durable="billing")
    async def on_order(event: Order) -> None: ...   # returning acks, raising naks

Rules:
- A subscription is one session with the local daemon (or an environment's proxy); leaving
  the `async with` ends it, and the daemon forgets the interest at once.
- `sub.dropped` counts the messages the daemon dropped for this subscriber because it fell
  behind (its buffer full, policy drop-oldest or drop-newest).
- Messages of a durable subscription carry a tag; `ack()` confirms one, `nak(delay=)` asks
  for it again (after `delay` seconds, else the topic's backoff). An unacked message comes
  again after the topic's ack wait. Acking a core message does nothing.
- Events are typed like RPC requests: a dataclass or TypedDict is checked and built from the
  body; a body that does not fit is nak'ed (a durable topic dead-letters it after
  max-deliver attempts) and logged.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from meshd.control import Conn
from meshd.errors import MeshError

from .schema import dump

log = logging.getLogger("sdk.broker")
WRITE_BATCH = 256  # a publisher's messages sent in one frame at most
WRITE_EVERY = 0.002  # seconds a published message may wait to be written with others
CHECKPOINT_EVERY = 32  # publishes between yields to other tasks (besides writes)


@dataclass
class Msg:
    topic: str
    id: str
    body: Any
    headers: dict[str, str]
    published_at: float
    publisher: str
    attempt: int = 1
    durable: str | None = None
    tag: int | None = None
    origin: str | None = None  # durable: the node whose log holds it, and its number there
    seq: int | None = None
    node: str | None = None  # core: the daemon that published it (as its link proved)
    _sub: Subscription | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_frame(cls, raw: dict[str, Any], sub: Subscription) -> Msg:
        return cls(str(raw.get("topic", "")), str(raw.get("id", "")), raw.get("body"),
                   dict(raw.get("headers") or {}), float(raw.get("published_at") or 0.0),
                   str(raw.get("publisher", "")), int(raw.get("attempt") or 1),
                   raw.get("durable"), raw.get("tag"), raw.get("origin"), raw.get("seq"),
                   raw.get("node"), sub)

    def to_json(self) -> dict[str, Any]:
        """The CLI's line for this message (`meshd subscribe --json`)."""
        out = {"topic": self.topic, "id": self.id, "headers": self.headers,
               "body": self.body, "published_at": self.published_at,
               "publisher": self.publisher}
        if self.node:
            out["node"] = self.node
        if self.durable:
            out.update(durable=self.durable, attempt=self.attempt, origin=self.origin,
                       seq=self.seq)
        return out

    async def ack(self) -> None:
        if self.tag is not None and self._sub is not None:
            await self._sub._settle("ack", self.tag)

    async def nak(self, delay: float | None = None) -> None:
        if self.tag is not None and self._sub is not None:
            await self._sub._settle("nak", self.tag, delay)


class Subscription:
    """A live subscription: iterate for messages."""

    def __init__(self, conn: Conn, info: dict[str, Any]) -> None:
        self._conn = conn
        self.info = info
        self.id: str = info.get("id", "")
        self._queue: deque[dict[str, Any]] = deque()
        self._window = max(1, int(info.get("credit") or 1))  # what the daemon may send ahead
        self._consumed = 0
        self.dropped = 0  # messages the daemon dropped for this subscriber (its policy)

    async def _settle(self, kind: str, tag: int, delay: float | None = None) -> None:
        frame: dict[str, Any] = {kind: [tag]}
        if delay is not None:
            frame["delay"] = delay
        await self._conn.send(frame)

    async def receive(self) -> Msg:
        if self._consumed >= self._window // 2 or (self._consumed and not self._queue):
            consumed, self._consumed = self._consumed, 0
            await self._conn.send({"credit": consumed})  # room for more
        while not self._queue:
            try:
                frame = await self._conn.receive()
            except EOFError:
                raise MeshError(503, "the daemon ended the subscription", id="sdk") from None
            if isinstance(frame, dict) and isinstance(frame.get("msgs"), list):
                self._queue.extend(m for m in frame["msgs"] if isinstance(m, dict))
                if isinstance(frame.get("dropped"), int):
                    self.dropped = frame["dropped"]
            elif isinstance(frame, dict) and frame.get("ok") is False:
                raise MeshError.from_dict(frame.get("error"))
        self._consumed += 1
        return Msg.from_frame(self._queue.popleft(), self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Msg:
        try:
            return await self.receive()
        except MeshError as exc:
            if exc.status == 503:
                raise StopAsyncIteration from None
            raise


class Publisher:
    """Publishes without waiting for each message (as a NATS client does): `publish` queues
    the message (sent in one frame with others within WRITE_EVERY seconds, or at
    WRITE_BATCH messages),
    `flush()` writes what waits and waits until the daemon handled everything sent so far,
    raising the first failure it reported (MeshError), if any."""

    def __init__(self, conn: Conn, namespace: str) -> None:
        self._conn = conn
        self._ns = namespace
        self._flushes = 0
        self._failure: MeshError | None = None
        self._pending: list[dict[str, Any]] = []  # messages not sent yet
        self._stopping = False
        self._stop = trio.Event()

    async def _write_out(self, flush: int | None = None) -> None:
        if self._pending or flush is not None:
            pubs, self._pending = self._pending, []
            frame: dict[str, Any] = {"pubs": pubs}
            if flush is not None:
                frame["flush"] = flush
            await self._conn.send(frame)

    async def run_writer(self) -> None:
        """Write what waits every WRITE_EVERY seconds (the context manager runs this), so a
        slow publisher's message leaves at once and a fast one's leave in large writes;
        ends after `stop_writer()` at its next turn, never in the middle of a write (a
        half-written frame would break the connection for the flush that follows)."""
        while not self._stopping:
            with trio.move_on_after(WRITE_EVERY):
                await self._stop.wait()
            try:
                await self._write_out()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the daemon went away: flush() says so

    def stop_writer(self) -> None:
        self._stopping = True
        self._stop.set()

    async def publish(self, topic: str, event: Any = None, *,
                      headers: dict[str, str] | None = None, id: str | None = None) -> None:
        """Queue a message; writes (and so yields to other tasks) at WRITE_BATCH messages,
        and otherwise yields every CHECKPOINT_EVERY publishes, not on each: a loop of
        publishes costs what a NATS client's does, and the writer still gets its turn."""
        pub: dict[str, Any] = {"topic": topic, "body": dump(event), "headers": headers or {},
                               "namespace": self._ns}
        if id is not None:
            pub["id"] = id
        self._pending.append(pub)
        if len(self._pending) >= WRITE_BATCH:
            await self._write_out()
        elif len(self._pending) % CHECKPOINT_EVERY == 0:
            await trio.lowlevel.checkpoint()

    async def flush(self) -> int:
        """How many messages the daemon has handled; MeshError for the first that failed."""
        self._flushes += 1
        await self._write_out(self._flushes)
        while True:
            try:
                frame = await self._conn.receive()
            except EOFError:
                raise MeshError(503, "the daemon closed the publisher", id="sdk") from None
            if not isinstance(frame, dict):
                continue
            if "error" in frame and self._failure is None:
                self._failure = MeshError.from_dict(frame["error"])
            if frame.get("flushed") == self._flushes:
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                return int(frame.get("published") or 0)
