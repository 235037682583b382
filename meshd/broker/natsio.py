"""The asyncio side of durable topics on NATS JetStream: connections, streams, consumers,
publishes and acks, run on the broker's asyncio bridge (meshd/bridge.py). Imported only when a
topic is bound to NATS (nats-py is imported here and nowhere else).

Theory of operation: this module does I/O only; meshd/broker/jetstream.py (trio) decides.
- One `Link` per NATS server (host, port, user) a node's topics name, shared by them all.
  It connects in the background and never gives up: nats-py reconnects (every
  RECONNECT_WAIT seconds, forever) and subscriptions come back by themselves. Each
  (re)connection bumps `generation`, and every change of state is reported to trio
  (`on_state(connected, generation, cause)`), so streams and consumers are made again on a
  server that lost them.
- Publishing: `publish` queues; one pump task hands the queue to `js.publish_async` (one
  PubAck future each, no task or timer per publish); a sweeper fails publishes without a
  PubAck after their deadline; a lost connection fails those in flight at once. Each
  outcome goes back to trio by the bridge as `done(seq, duplicate, error)`.
- Delivery: `bind` subscribes the node to a durable push consumer's deliver subject in the
  consumer's deliver group (each message to one subscribed node of the mesh, as a queue
  group); every message is handed to trio as it comes. `settle` acks, naks (with a delay)
  or terminates messages trio is done with.
- Delays (`bind_delays`): a consumer of the topic's delay subject holds each delayed message
  until due (a nak with the time left, which the server keeps) and then publishes it to the
  topic's subject (Nats-Msg-Id `meshd-delay-SEQ`: a node that dies between the publish and
  the ack does not make a second copy) and acks it.

Rules:
- N1 Credentials never leave this module in text: the URL is split before connecting (the
  user and password are given to nats-py apart from the server address) and every error
  text is passed through `redact` before it is raised, logged or reported.
- N2 Every wait is bounded: connecting (CONNECT_WAIT), stream and consumer calls and
  publishes (the caller's timeout); nothing here waits for a server forever on a caller's
  behalf.
- N3 Errors come out as `EngineError(status, detail)`: 503 for an unreachable or silent
  server, 400 for a configuration NATS refuses (with its description).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from meshd.bridge import AsyncioBridge

from .jetstream import NOT_BEFORE, EngineError, Server, not_before

log = logging.getLogger("meshd.broker")
CONNECT_TIMEOUT = 2.0  # one TCP connect attempt
RECONNECT_WAIT = 0.5  # between attempts, forever
CONNECT_WAIT = 2.0  # how long a call waits for a connection being made before it is a 503
PING_INTERVAL = 10.0  # a silent server is noticed after PING_INTERVAL * MAX_PINGS seconds
MAX_PINGS = 3
SWEEP_EVERY = 0.1  # seconds between checks for publishes past their deadline
PENDING_MSGS = 65536  # messages received and not yet handed to trio, per subscription
PENDING_BYTES = 64 * 1024 * 1024  # and their bytes
PENDING_PUBLISHES = 16384  # PubAcks awaited at once per connection


class Link:
    """One connection to one NATS server, on the bridge's loop."""

    def __init__(self, server: Server, bridge: AsyncioBridge, client_name: str,
                 timeout: float, on_state: Callable[[bool, int, str], None]) -> None:
        self.server = server
        self.timeout = timeout  # seconds for each call to the JetStream API
        self.bridge = bridge
        self.client_name = client_name
        self.on_state = on_state  # called in trio's thread: (connected, generation, cause)
        self.generation = 0
        self.cause = "not connected yet"
        self.nc: NATS | None = None
        self.js: Any = None
        self._connected: asyncio.Event | None = None
        self._queue: collections.deque[tuple[str, bytes, dict[str, str] | None, float,
                                             Callable[..., None]]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._inflight: dict[asyncio.Future[Any], tuple[float, Callable[..., None]]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()  # acks and unsubscribes being sent

    # --- connection -------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting (on the loop); the bridge's stop closes the connection."""
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self.nc = NATS()
        loop = asyncio.get_running_loop()
        for coro in (self._connect(), self._pump(), self._sweep()):
            self._tasks.append(loop.create_task(coro))
        self.bridge.on_stop.append(self.close)

    async def _connect(self) -> None:
        assert self.nc is not None and self._connected is not None
        tls = ssl.create_default_context() if self.server.scheme == "tls" else None
        await self.nc.connect(
            servers=[self.server.connect_url], user=self.server.user,
            password=self.server.password, name=self.client_name, tls=tls,
            allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT, connect_timeout=CONNECT_TIMEOUT,
            ping_interval=PING_INTERVAL, max_outstanding_pings=MAX_PINGS,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_connected, closed_cb=self._on_closed)
        self.js = self.nc.jetstream(timeout=self.timeout,
                                   publish_async_max_pending=PENDING_PUBLISHES)
        await self._on_connected()

    async def _on_error(self, exc: Exception) -> None:
        cause = self.server.redact(_text(exc))
        log.debug("NATS at %s: %s", self.server.address, cause)
        changed, self.cause = cause != self.cause, cause
        if changed and not (self._connected and self._connected.is_set()):
            # (trio says why in its 503s while there is no connection)
            self.bridge.to_trio(self.on_state, False, self.generation, cause)

    async def _on_disconnected(self) -> None:
        if self._connected is not None and self._connected.is_set():
            self._connected.clear()
            log.warning("lost the connection to NATS at %s (%s): reconnecting",
                        self.server.address, self.cause)
            self._fail_inflight(f"the connection to NATS at {self.server.address} was lost "
                                "before its acknowledgement")
            self.bridge.to_trio(self.on_state, False, self.generation, self.cause)

    async def _on_connected(self) -> None:
        assert self._connected is not None
        if self._connected.is_set():
            return
        self.generation += 1
        self._connected.set()
        log.info("connected to NATS at %s", self.server.address)
        self.bridge.to_trio(self.on_state, True, self.generation, "")

    async def _on_closed(self) -> None:
        if self._connected is not None:
            self._connected.clear()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._fail_inflight("meshd is stopping")
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()

    def shutdown(self) -> None:
        """Close this link now (a server no topic uses any more)."""
        with contextlib.suppress(ValueError):
            self.bridge.on_stop.remove(self.close)
        self._spawn(self.close())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _up(self) -> bool:
        return self.nc is not None and self.nc.is_connected and self.js is not None

    def unreachable(self) -> EngineError:
        return EngineError(503, f"NATS at {self.server.address} is unreachable: "
                                f"{self.cause} (meshd keeps reconnecting)")

    async def ready(self) -> None:
        """Wait for the connection (at most CONNECT_WAIT seconds; then a 503 with the
        cause)."""
        if self._up():
            return
        assert self._connected is not None
        try:
            await asyncio.wait_for(self._connected.wait(), CONNECT_WAIT)
        except TimeoutError:
            raise self.unreachable() from None
        if not self._up():
            raise self.unreachable()

    # --- publishing -------------------------------------------------------------------------

    def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                timeout: float, done: Callable[..., None]) -> None:
        """Queue a publish; `done(seq, duplicate, error)` is called in trio once JetStream
        acknowledged it, refused it, or `timeout` seconds passed."""
        if not self._up():
            self.bridge.to_trio(done, 0, False, self.unreachable())
            return
        assert self._wake is not None
        self._queue.append((subject, payload, headers, time.monotonic() + timeout, done))
        self._wake.set()

    async def _pump(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                subject, payload, headers, deadline, done = self._queue.popleft()
                if not self._up():
                    self.bridge.to_trio(done, 0, False, self.unreachable())
                    continue
                try:
                    fut = await self.js.publish_async(subject, payload, headers=headers)
                except Exception as exc:
                    self.bridge.to_trio(done, 0, False, self.error(exc, "publish"))
                    continue
                self._inflight[fut] = (deadline, done)
                fut.add_done_callback(self._acked)

    def _acked(self, fut: asyncio.Future[Any]) -> None:
        entry = self._inflight.pop(fut, None)
        if entry is None:
            return
        done = entry[1]
        if fut.cancelled():
            self.bridge.to_trio(done, 0, False, self.unreachable())
            return
        exc = fut.exception()
        if exc is not None:
            self.bridge.to_trio(done, 0, False, self.error(exc, "publish"))
            return
        ack = fut.result()
        self.bridge.to_trio(done, int(ack.seq), bool(ack.duplicate), None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            for fut, (deadline, _) in list(self._inflight.items()):
                if deadline <= now and not fut.done():
                    fut.set_exception(EngineError(
                        503, f"no acknowledgement from NATS JetStream at "
                             f"{self.server.address} in time"))

    def _fail_inflight(self, why: str) -> None:
        for fut in list(self._inflight):
            if not fut.done():
                fut.set_exception(EngineError(503, why))
        while self._queue:
            done = self._queue.popleft()[4]
            self.bridge.to_trio(done, 0, False, EngineError(503, why))

    # --- streams and consumers --------------------------------------------------------------

    async def ensure_stream(self, spec: dict[str, Any]) -> None:
        """Make the stream as `spec` says (jetstream.stream_spec), or bring an existing one
        to it."""
        await self.ready()
        config = StreamConfig(
            name=spec["name"], subjects=list(spec["subjects"]),
            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
            storage=StorageType.FILE, num_replicas=spec["replicas"],
            max_msgs=spec["max_msgs"], max_age=spec["max_age"],
            max_msg_size=spec["max_msg_size"], duplicate_window=spec["duplicate_window"])
        try:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # in use with another configuration: update it
                    raise
                await self.js.update_stream(config)
        except Exception as exc:
            raise self.error(exc, f"stream {spec['name']}") from None

    async def ensure_consumer(self, stream: str, spec: dict[str, Any]) -> None:
        await self.ready()
        config = ConsumerConfig(
            durable_name=spec["name"], description=spec["description"],
            deliver_subject=spec["deliver_subject"],
            deliver_group=spec["deliver_group"], filter_subject=spec["filter_subject"],
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=spec["ack_wait"], max_deliver=-1,
            max_ack_pending=spec["max_ack_pending"])
        try:
            await self.js.add_consumer(stream, config)
        except Exception as exc:
            raise self.error(exc, f"consumer {spec['name']} of stream {stream}") from None

    async def delete_stream(self, name: str) -> bool:
        await self.ready()
        try:
            return bool(await self.js.delete_stream(name))
        except nats.js.errors.NotFoundError:
            return False
        except Exception as exc:
            raise self.error(exc, f"stream {name}") from None

    async def describe(self, stream: str) -> dict[str, Any]:
        """A stream's message count and each of its consumers' counts, by the consumer's
        description (meshd writes the durable subscriber's NAME there)."""
        await self.ready()
        try:
            info = await self.js.stream_info(stream)
            consumers, offset = [], 0
            while True:  # (the server lists 256 at a time)
                page = await self.js.consumers_info(stream, offset=offset or None)
                consumers += page
                offset += len(page)
                if len(page) < 256 or offset >= 100_000:
                    break
        except Exception as exc:
            raise self.error(exc, f"stream {stream}") from None
        out: dict[str, Any] = {"messages": int(info.state.messages), "consumers": {}}
        for ci in consumers:
            name = (ci.config.description if ci.config else None) or ci.name
            out["consumers"][str(name)] = {"waiting": int(ci.num_pending or 0),
                                           "pending": int(ci.num_ack_pending or 0),
                                           "redelivered": int(ci.num_redelivered or 0)}
        return out

    # --- delivery ---------------------------------------------------------------------------

    async def bind(self, deliver_subject: str, group: str,
                   arrived: Callable[[Msg], None]) -> Any:
        """Subscribe to a push consumer's deliver subject in its group; `arrived(msg)` is
        called in trio for each message. Returns the subscription (for `unbind`)."""
        await self.ready()

        async def cb(msg: Msg) -> None:
            self.bridge.to_trio(arrived, msg)

        return await self._subscribe(deliver_subject, group, cb)

    def unbind(self, sub: Any) -> None:
        async def go() -> None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._spawn(go())

    def settle(self, items: list[tuple[Msg, str, float | None]]) -> None:
        """Ack ("ack"), nak ("nak", with a delay in seconds or none) or terminate ("term")
        each message. Sent as soon as the connection allows (nats-py buffers them while it
        reconnects); a message already settled is passed over."""
        async def go() -> None:
            for msg, kind, delay in items:
                try:
                    if kind == "ack":
                        await msg.ack()
                    elif kind == "nak":
                        await msg.nak(delay=delay if delay and delay > 0 else None)
                    else:
                        await msg.term()
                except Exception as exc:
                    log.debug("NATS %s not sent: %s", kind, self.server.redact(_text(exc)))
        self._spawn(go())

    async def bind_delays(self, deliver_subject: str, group: str, subject: str,
                          moved: Callable[[int], None]) -> Any:
        """Move the topic's delayed messages to `subject` as they come due (see the module
        docstring); `moved(n)` is called in trio for each message moved (n=1) or dropped as
        malformed (n=0)."""
        await self.ready()

        async def cb(msg: Msg) -> None:
            due = not_before(msg.headers)
            try:
                if due is None:  # not one of ours: nothing to schedule it by
                    await msg.term()
                    self.bridge.to_trio(moved, 0)
                    return
                left = due - time.time()
                if left > 0:
                    await msg.nak(delay=left)
                    return
                meta = msg.metadata
                seq = meta.sequence.stream
                await self.js.publish(subject, msg.data, timeout=self.timeout,
                                      headers={"Nats-Msg-Id": f"meshd-delay-{seq}"})
                await msg.ack()
                with contextlib.suppress(Exception):  # the copy is moved: one message held
                    await self.js.delete_msg(meta.stream, seq)
                self.bridge.to_trio(moved, 1)
            except Exception as exc:
                log.debug("a delayed message was not moved yet: %s",
                          self.server.redact(_text(exc)))
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1.0)

        return await self._subscribe(deliver_subject, group, cb)

    async def _subscribe(self, subject: str, group: str, cb: Any) -> Any:
        assert self.nc is not None
        try:
            # bounded: anyone who may publish on the server can send to a deliver subject;
            # what is dropped past the bounds JetStream delivers again after ack_wait
            return await self.nc.subscribe(subject, queue=group, cb=cb,
                                           pending_msgs_limit=PENDING_MSGS,
                                           pending_bytes_limit=PENDING_BYTES)
        except Exception as exc:
            raise self.error(exc, "subscribe") from None

    # --- errors -----------------------------------------------------------------------------

    def error(self, exc: BaseException, what: str) -> EngineError:
        """N3: an exception of nats-py (or ours) as an EngineError, its text redacted."""
        if isinstance(exc, EngineError):
            return exc
        where = f"NATS JetStream at {self.server.address}"
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            return EngineError(503, f"{where} has no stream for this topic ({what}): it is "
                                    "made again; publish again")
        if isinstance(exc, nats.js.errors.APIError):
            description = self.server.redact(str(exc.description or exc))
            status = 400 if exc.code == 400 or exc.err_code == 10074 else 503
            return EngineError(status, f"{where} refused ({what}): {description}")
        if isinstance(exc, nats.errors.TimeoutError | asyncio.TimeoutError):
            return EngineError(503, f"no answer from {where} in time ({what})")
        if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.NoServersError
                      | nats.errors.StaleConnectionError | OSError):
            return self.unreachable()
        return EngineError(503, f"{where}: {what} failed: "
                                f"{self.server.redact(_text(exc))}")


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


__all__ = ["NOT_BEFORE", "Link"]
