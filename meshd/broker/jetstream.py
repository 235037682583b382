"""Durable topics on NATS JetStream (trio side): a topic created with `--backend nats` keeps
its messages in a JetStream stream instead of each node's embedded log; publishing,
durable subscribers, acks, redelivery, dead letters, delays, dedupe and retention keep
their meaning (docs/broker.md "Durable topics on NATS JetStream").

Theory of operation:
- The definition (replicated store, durable.py) says `backend: nats` and holds the URL, so
  every node can reach the server. Each node keeps one connection per server (natsio.Link,
  on the asyncio bridge owned by this component) and makes the topic's stream and
  consumers on it as needed; a server that lost them gets them again after a reconnect.
- Mapping (all names derived from the namespace, so two namespaces never share a stream):
  topic -> stream `MESHD_<ns>_<topic>_<hash>` with the subjects `meshd.<ns>.m.<topic>`
  (messages) and `meshd.<ns>.d.<topic>` (delayed messages not yet due); --max-age and
  --max-msgs -> the stream's limits (discard old, as the embedded log's hard limits);
  --replicas -> the stream's replicas; message ids -> Nats-Msg-Id within the stream's
  duplicate window (broker.dedup_window; only ids publishers give, as the embedded log);
  durable subscriber NAME -> a durable push consumer of the messages subject with a
  deliver group: every node with a member of NAME subscribes to it in the group, so
  JetStream gives each message to one node and the node to one local member (the queue
  group of the mesh); --ack-wait -> the consumer's ack wait; max_in_flight -> its
  max_ack_pending.
- Publishing is acknowledged once JetStream acknowledged (PubAck): its stream sequence is
  the answer's `seq`. A server down answers 503 with the cause at once (or after at most
  natsio.CONNECT_WAIT while a first connection is being made), one that does not answer
  within broker.engine_timeout a 503 too; never a hang. Core subscribers of the topic get
  their copy over the mesh after the PubAck, as for an embedded topic.
- Attempts and dead letters are counted here, not by JetStream (its consumers have
  max_deliver -1): attempt = JetStream's delivery count minus the deliveries this node
  handed back because no member was left. A message that comes again after max_deliver
  attempts is published to TOPIC.dead (its own stream) with the header meshd-dead-reason
  (Nats-Msg-Id `meshd-dead-STREAM-SEQ`: a retry makes no second copy) and then
  terminated. A nak without a delay waits the backoff of its attempt (1 s, 5 s, 30 s),
  as for an embedded topic.
- Delays (nats-server 2.9 has no delayed delivery): a delayed message goes to the delay
  subject with the header Meshd-Not-Before; a consumer of that subject ("meshd-delay", run
  by the nodes that serve durable subscribers of the topic) naks it with the time left
  until due, then publishes it to the messages subject and deletes the delayed copy. So
  nothing counts as a delivery or holds a slot of max_ack_pending before it is due, and a
  delayed message never holds back those after it.

Rules:
- J1 The URL is a credential: it lives in the definition only. Views show `backend: nats`
  and `server: host:port` (`public`), logs and errors name host:port, and every error text
  from the client library is passed through `Server.redact`.
- J2 A node subscribes to a topic's consumer for NAME while it has a local member of NAME
  whose pattern matches the topic, and to its delay consumer while it serves any NAME of
  the topic; it unsubscribes when the last one goes. Messages it received and could not
  hand to a member go back (a nak after RETURN_DELAY) without counting as an attempt here.
- J3 A message that is not a meshd message (another client published to the subject) is
  terminated and counted (broker_nats_bad), never delivered.
- J4 Every task is in this component's nursery; the asyncio loop's thread is started by the
  bridge on first use and stopped with the component.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import cbor2
import trio

from meshd import wire
from meshd.bridge import AsyncioBridge, BridgeClosed
from meshd.debug.traces import TRACEPARENT
from meshd.errors import MeshError, bad_request
from meshd.ops import Finish

from . import messages
from .origin import DURABLE
from .service import BrokerService, LocalSub
from .subjects import matches

log = logging.getLogger("meshd.broker")

BACKENDS = ("embedded", "nats")
NOT_BEFORE = "Meshd-Not-Before"  # header of a delayed message: when it is due (unix seconds)
MSG_ID = "Nats-Msg-Id"
REASON = "meshd-dead-reason"
DEAD_SUFFIX = ".dead"
ORIGIN = "nats"  # a delivery's `origin`: the messages are in JetStream, not a node's log
DELAY_CONSUMER = "meshd-delay"
BACKOFF = (1.0, 5.0, 30.0)  # a nak without a delay waits this (by attempt; as consumer.py)
DISCOVER_EVERY = 0.25  # seconds between looks at which consumers this node should serve
RETURN_DELAY = 0.2  # a message no local member could take comes again this much later
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between tries to set a consumer up
CONNECT_WAIT = 2.0  # a publish waits this long for a first connection before a 503
DESCRIBE_WAIT = 2.0  # `meshd topics` waits this long for NATS's counts
MAX_RETURNED = 100_000  # messages whose handed-back deliveries this node remembers

Key = tuple[str, str, str]  # (namespace, topic, durable name)


class EngineError(Exception):
    """A failure of the engine (NATS) for a caller: an HTTP-like status and a detail that
    holds no credential."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def mesh(self) -> MeshError:
        return MeshError(self.status, self.detail, id="meshd.broker")


# --- the URL (J1) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    """A NATS server as a URL names it; `password` never shows in repr()."""
    scheme: str
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """host:port ([v6]:port): what views, logs and errors name."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def connect_url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def redact(self, text: str) -> str:
        """`text` with the user's password (raw and as written in a URL) replaced."""
        if self.password:
            for secret in (self.password, quote(self.password, safe="")):
                text = text.replace(secret, "***")
        return text


URL_HELP = "a NATS URL: nats://[user:password@]host[:port] (or tls://...)"


def parse_url(text: Any) -> Server:
    """The server a NATS URL names; a 400 saying what is wrong (never quoting the URL, which
    may hold a password)."""
    if not isinstance(text, str) or not text.strip():
        raise bad_request(f"url must be {URL_HELP}", id="meshd.broker")
    text = text.strip()
    if len(text) > 2048 or any(c.isspace() or ord(c) < 32 for c in text):
        raise bad_request(f"the url is not {URL_HELP} (whitespace, control characters or "
                          "over 2048 characters)", id="meshd.broker")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise bad_request(f"the url is not {URL_HELP} (its port is not a number from 0 to "
                          "65535)", id="meshd.broker") from None
    if parts.scheme not in ("nats", "tls"):
        raise bad_request(f"the url is not {URL_HELP} (the scheme must be nats or tls)",
                          id="meshd.broker")
    host = parts.hostname
    if not host:
        raise bad_request(f"the url is not {URL_HELP} (no host)", id="meshd.broker")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad_request(f"the url is not {URL_HELP} (no path, query or fragment)",
                          id="meshd.broker")
    if ":" in host:
        with contextlib.suppress(ValueError):
            host = str(ipaddress.IPv6Address(host))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return Server(parts.scheme, host, port or 4222, user, password)


def public(definition: dict[str, Any]) -> dict[str, Any]:
    """A definition's settings as views show them: `backend`, and for NATS the server's
    host:port instead of the URL (J1)."""
    out = {k: v for k, v in definition.items() if k not in ("durable", "url")}
    out["backend"] = definition.get("backend", "embedded")
    if out["backend"] == "nats":
        try:
            out["server"] = parse_url(definition.get("url")).address
        except MeshError:
            out["server"] = "(invalid url)"
    return out


def is_nats(definition: dict[str, Any] | None) -> bool:
    return bool(definition) and definition.get("backend") == "nats"  # type: ignore[union-attr]


# --- names (derived, stable, safe as NATS names; the namespace in each) ---------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=4096)  # (every publish asks)
def stream_name(ns: str, topic: str) -> str:
    return f"MESHD_{ns}_{_UNSAFE.sub('_', topic)[:48]}_{_hash(ns + '/' + topic)}"


@functools.lru_cache(maxsize=4096)  # (every publish asks)
def subject(ns: str, topic: str) -> str:
    return f"meshd.{ns}.m.{topic}"


@functools.lru_cache(maxsize=4096)  # (every publish asks)
def delay_subject(ns: str, topic: str) -> str:
    return f"meshd.{ns}.d.{topic}"


@functools.lru_cache(maxsize=4096)  # (every publish asks)
def consumer_name(name: str) -> str:
    return f"{_UNSAFE.sub('_', name)[:48]}_{_hash(name)}"


def stream_spec(ns: str, topic: str, definition: dict[str, Any], settings: Any
                ) -> dict[str, Any]:
    max_age = definition.get("max_age")
    return {"name": stream_name(ns, topic),
            "subjects": [subject(ns, topic), delay_subject(ns, topic)],
            "replicas": int(definition.get("replicas", 1)),
            "max_msgs": int(definition.get("max_msgs") or -1),
            "max_age": float(max_age) if max_age else None,
            # the message's CBOR plus its id and topic again (headers, subject)
            "max_msg_size": int(settings.max_message_bytes) + 8192,
            "duplicate_window": float(settings.dedup_window)}


def consumer_spec(ns: str, topic: str, name: str, definition: dict[str, Any],
                  settings: Any) -> dict[str, Any]:
    stream, consumer = stream_name(ns, topic), consumer_name(name)
    return {"name": consumer, "description": name, "deliver_group": consumer,
            "deliver_subject": f"_meshd.deliver.{stream}.{consumer}",
            "filter_subject": subject(ns, topic),
            "ack_wait": float(definition.get("ack_wait", settings.ack_wait)),
            "max_ack_pending": int(settings.max_in_flight)}


def delay_spec(ns: str, topic: str) -> dict[str, Any]:
    stream = stream_name(ns, topic)
    return {"name": DELAY_CONSUMER, "description": DELAY_CONSUMER,
            "deliver_group": DELAY_CONSUMER, "deliver_subject": f"_meshd.delay.{stream}",
            "filter_subject": delay_subject(ns, topic), "ack_wait": 30.0,
            "max_ack_pending": -1}


def not_before(headers: dict[str, str] | None) -> float | None:
    """When a delayed message is due (its Meshd-Not-Before header); None if it has none
    that is a time."""
    try:
        due = float((headers or {})[NOT_BEFORE])
    except (KeyError, ValueError, TypeError):
        return None
    return due if math.isfinite(due) else None


def attempt_of(delivered: int, returned: int) -> int:
    """Which attempt a delivery is: JetStream's count less the deliveries handed back."""
    return max(1, delivered - returned)


def nak_delay(attempt: int, delay: float | None) -> float:
    """How long a nak waits: the subscriber's delay, else the backoff of its attempt."""
    if delay is not None:
        return max(0.0, delay)
    return BACKOFF[min(max(attempt, 1), len(BACKOFF)) - 1]


# --- the component --------------------------------------------------------------------------

@dataclass
class _Link:
    """Trio's view of one natsio.Link (its state comes by the bridge)."""
    link: Any
    connected: bool = False
    generation: int = 0
    cause: str = "not connected yet"
    changed: trio.Event = field(default_factory=trio.Event)
    ensured: dict[str, int] = field(default_factory=dict)  # stream -> generation


@dataclass
class _Serving:
    """A consumer this node serves (J2): messages arrived and not yet handed over."""
    key: Key
    definition: dict[str, Any]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    queue: collections.deque[Any] = field(default_factory=collections.deque)
    wake: trio.Event = field(default_factory=trio.Event)
    stopped: bool = False


@dataclass
class _Held:
    """A message handed to a local member, until it acks, naks or goes away."""
    msg: Any
    sub: LocalSub
    link: _Link
    attempt: int
    where: tuple[str, int]  # (stream, stream sequence)


class JetStreamTopics:
    def __init__(self, broker: BrokerService, settings: Any, stats: dict[str, int],
                 definition: Callable[[str, str], dict[str, Any] | None],
                 definitions: Callable[[str | None], dict[tuple[str, str], dict[str, Any]]]
                 ) -> None:
        self.broker = broker
        self.s = settings
        self.node = broker.node
        self.definition = definition
        self.definitions = definitions
        self.bridge = AsyncioBridge("meshd-nats")
        self.stats = stats
        stats.update({"broker_nats_published": 0, "broker_nats_delivered": 0,
                      "broker_nats_redelivered": 0, "broker_nats_dead": 0,
                      "broker_nats_bad": 0, "broker_nats_moved": 0,
                      "broker_nats_returned": 0, "broker_nats_fast": 0,
                      "broker_nats_failed": 0, "broker_nats_bad_definitions": 0})
        self._links: dict[Server, _Link] = {}
        self._servers: dict[str, Server] = {}  # url -> parsed (the URL is never a dict key
        # anywhere shown: this cache lives in memory only)
        self._serving: dict[Key, _Serving] = {}
        self._moving: dict[tuple[str, str], _Serving] = {}
        self._tags: dict[int, _Held] = {}
        self._returned: collections.OrderedDict[tuple[str, int], int] = \
            collections.OrderedDict()
        self.dead: dict[Key, int] = {}
        self._core: collections.deque[tuple[str, messages.Message]] = collections.deque()
        self._core_wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.bridge.run)
            nursery.start_soon(self._discoverer)
            nursery.start_soon(self._core_sender)
            task_status.started()

    # --- links ------------------------------------------------------------------------------

    def server(self, definition: dict[str, Any]) -> Server:
        url = definition.get("url")
        found = self._servers.get(url) if isinstance(url, str) else None
        if found is None:
            found = parse_url(url)
            if len(self._servers) > 1024:
                self._servers.clear()
            self._servers[url] = found  # type: ignore[index]
        return found

    def usable(self, ns: str, topic: str, definition: dict[str, Any]) -> bool:
        """Whether a definition (replicated: a member may have sent it) can be served: its
        URL parses and its limits are numbers. Unusable ones are skipped and counted."""
        try:
            self.server(definition)
            stream_spec(ns, topic, definition, self.s)
            float(definition.get("ack_wait", self.s.ack_wait))
            return True
        except Exception:
            self.stats["broker_nats_bad_definitions"] += 1
            return False

    def _link(self, definition: dict[str, Any]) -> _Link:
        server = self.server(definition)
        state = self._links.get(server)
        if state is None:
            from . import natsio  # nats-py is imported only once a topic is on NATS

            def on_state(connected: bool, generation: int, cause: str) -> None:
                self._on_state(server, connected, generation, cause)

            link = natsio.Link(server, self.bridge, f"meshd {self.node}",
                               self.s.engine_timeout, on_state)
            state = self._links[server] = _Link(link)
            self.bridge.post(link.start)
        return state

    def _on_state(self, server: Server, connected: bool, generation: int, cause: str) -> None:
        state = self._links.get(server)
        if state is None:
            return
        state.connected, state.generation, state.cause = connected, generation, cause
        state.changed.set()
        state.changed = trio.Event()

    async def _ready(self, st: _Link) -> None:
        """A connected link, or a 503 with the cause: at once if it was connected before
        (the server went away), else after at most CONNECT_WAIT (the first connection)."""
        if st.connected:
            return
        if st.generation == 0:
            with trio.move_on_after(CONNECT_WAIT):
                while not st.connected:
                    await st.changed.wait()
        if not st.connected:
            raise MeshError(503, f"NATS at {st.link.server.address} is unreachable: "
                                 f"{st.cause} (meshd keeps reconnecting)", id="meshd.broker")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A natsio coroutine on the bridge; its EngineError as a MeshError."""
        try:
            return await self.bridge.call(fn, *args)
        except EngineError as exc:
            raise exc.mesh() from None
        except BridgeClosed as exc:
            raise MeshError(503, f"the NATS connection is stopping: {exc}",
                            id="meshd.broker") from None

    async def _ensure(self, st: _Link, ns: str, topic: str, definition: dict[str, Any],
                      force: bool = False) -> None:
        """The topic's stream exists on the server (once per connection)."""
        name = stream_name(ns, topic)
        generation = st.generation
        if not force and generation and st.ensured.get(name) == generation:
            return
        await self._call(st.link.ensure_stream, stream_spec(ns, topic, definition, self.s))
        st.ensured[name] = generation or st.generation

    # --- definitions: create and delete -------------------------------------------------------

    async def prepare(self, ns: str, topics: list[str], definition: dict[str, Any]) -> None:
        """Make the streams of a topic being created (and of its .dead): the server must be
        reachable and accept the settings, or creating is refused with its reason."""
        new = self.server(definition) not in self._links
        st = self._link(definition)
        try:
            await self._ready(st)
            for topic in topics:
                await self._ensure(st, ns, topic, definition, force=True)
        except MeshError:
            if new:  # a server no topic uses (a typo?): no connection kept trying it
                self._forget(st)
            raise

    def _forget(self, st: _Link) -> None:
        server = st.link.server
        if self._links.get(server) is st:
            del self._links[server]
            with contextlib.suppress(BridgeClosed):
                self.bridge.post(st.link.shutdown)

    async def drop(self, ns: str, topics: list[str], definition: dict[str, Any]) -> list[str]:
        """Delete the streams of a deleted topic; what could not be deleted (the server
        keeps them until deleted there)."""
        left = []
        st = self._link(definition)
        for topic in topics:
            name = stream_name(ns, topic)
            st.ensured.pop(name, None)
            try:
                await self._ready(st)
                await self._call(st.link.delete_stream, name)
            except MeshError as exc:
                log.warning("stream %s on NATS at %s not deleted: %s", name,
                            st.link.server.address, exc.detail)
                left.append(name)
        return left

    # --- publishing -------------------------------------------------------------------------

    async def publish(self, ns: str, msg: messages.Message, definition: dict[str, Any],
                      delay: float | None, minted: bool) -> dict[str, Any]:
        """Publish to the topic's stream; the answer once JetStream acknowledged it."""
        st = self._link(definition)
        msg_id = None if minted else msg.id
        try:
            return await self._publish_once(st, ns, msg, definition, delay, msg_id, False)
        except MeshError as exc:
            if "has no stream" not in exc.detail:
                raise
        # the server lost the stream (restarted without its store?): made again, once
        return await self._publish_once(st, ns, msg, definition, delay, msg_id, True)

    async def _publish_once(self, st: _Link, ns: str, msg: messages.Message,
                            definition: dict[str, Any], delay: float | None,
                            msg_id: str | None, force: bool) -> dict[str, Any]:
        await self._ready(st)
        await self._ensure(st, ns, msg.topic, definition, force=force)
        done = trio.Event()
        box: list[tuple[Any, MeshError | None]] = []

        def finish(result: Any, error: MeshError | None) -> None:
            box.append((result, error))
            done.set()

        self._send(st, ns, msg, delay, msg_id, finish)
        await done.wait()
        result, error = box[0]
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def publish_fast(self, ns: str, msg: messages.Message, definition: dict[str, Any],
                     delay: float | None, minted: bool, finish: Finish) -> bool:
        """The same answered from a callback (no task), once the link is up and the stream
        made on it; otherwise False (the ordinary path waits for those)."""
        st = self._links.get(self.server(definition))
        if st is None or not st.connected \
                or st.ensured.get(stream_name(ns, msg.topic)) != st.generation:
            return False
        self.stats["broker_nats_fast"] += 1
        self._send(st, ns, msg, delay, None if minted else msg.id, finish)
        return True

    def _send(self, st: _Link, ns: str, msg: messages.Message, delay: float | None,
              msg_id: str | None, finish: Finish) -> None:
        headers: dict[str, str] = {}
        if msg_id is not None:
            headers[MSG_ID] = msg_id
        if delay:
            headers[NOT_BEFORE] = repr(time.time() + delay)
        payload = cbor2.dumps(msg.to_wire())
        to = delay_subject(ns, msg.topic) if delay else subject(ns, msg.topic)
        stream = stream_name(ns, msg.topic)

        def done(seq: int, duplicate: bool, error: BaseException | None) -> None:
            if error is not None:
                if isinstance(error, EngineError):
                    if "has no stream" in error.detail:
                        st.ensured.pop(stream, None)  # made again by the next publish
                    finish(None, error.mesh())
                else:
                    finish(None, MeshError(503, f"NATS publish failed: "
                                                f"{st.link.server.redact(str(error))}",
                                           id="meshd.broker"))
                return
            self.stats["broker_nats_published"] += 1
            if not duplicate and not delay:
                self._core.append((ns, msg))  # core subscribers get it live
                self._core_wake.set()
            finish({"id": msg.id, "seq": seq, "duplicate": duplicate, "node": self.node,
                    "backend": "nats"}, None)

        try:
            self.bridge.post(st.link.publish, to, payload, headers or None,
                             self.s.engine_timeout, done)
        except BridgeClosed:
            finish(None, MeshError(503, "the NATS connection is stopping", id="meshd.broker"))

    async def _core_sender(self) -> None:
        while True:
            await self._core_wake.wait()
            self._core_wake = trio.Event()
            while self._core:
                ns, msg = self._core.popleft()
                await self.broker.publish(ns, msg)

    # --- durable subscribers (J2) -------------------------------------------------------------

    def _wanted(self) -> dict[Key, dict[str, Any]]:
        subs = [s for s in self.broker.subs.values() if s.durable]
        if not subs:
            return {}
        out: dict[Key, dict[str, Any]] = {}
        defined: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        for sub in subs:
            if sub.ns not in defined:
                defined[sub.ns] = {k: d for k, d in self.definitions(sub.ns).items()
                                   if is_nats(d)}
            for (_, topic), d in defined[sub.ns].items():
                if not self.usable(sub.ns, topic, d):
                    continue
                if matches(sub.pattern, topic):
                    out[(sub.ns, topic, sub.durable)] = d  # type: ignore[index]
        return out

    async def _discoverer(self) -> None:
        while True:
            wanted = self._wanted()
            topics = {(k[0], k[1]): d for k, d in wanted.items()}
            for table, want, work in ((self._serving, wanted, self._serve),
                                      (self._moving, topics, self._move)):
                for key, serving in list(table.items()):
                    if want.get(key) != serving.definition:
                        serving.stopped = True
                        serving.scope.cancel()
                        del table[key]
                for key, d in want.items():
                    if key not in table:
                        table[key] = serving = _Serving(key, d)  # type: ignore[arg-type]
                        assert self._nursery is not None
                        self._nursery.start_soon(self._guarded, work, serving)
            await trio.sleep(DISCOVER_EVERY)

    async def _guarded(self, work: Callable[[_Serving], Any], serving: _Serving) -> None:
        """Serve one consumer; whatever fails in it (a definition a member sent, an odd
        answer of the server) ends that consumer, logged, never the node. The discoverer
        starts it again on its next pass."""
        try:
            await work(serving)
        except Exception:
            self.stats["broker_nats_failed"] += 1
            log.exception("NATS consumer of %s failed", serving.key[1])
            await trio.sleep(RETRY_MAX)  # before the discoverer may start it again
        finally:
            for table in (self._serving, self._moving):
                if table.get(serving.key) is serving:  # type: ignore[call-overload]
                    del table[serving.key]  # type: ignore[arg-type]

    async def _keep_bound(self, serving: _Serving, st: _Link, spec: dict[str, Any],
                          bind: Callable[[], Any], bound: list[Any]) -> None:
        """Keep the consumer `spec` of the topic made and this node subscribed to it: again
        after every reconnection (the server may have lost them); retried with backoff while
        NATS cannot be reached."""
        ns, topic = serving.key[0], serving.key[1]
        stream = stream_name(ns, topic)
        wait, said = RETRY_MIN, False
        generation = -1
        while True:
            if st.generation != generation or not bound:
                try:
                    generation = st.generation
                    await self._ready(st)
                    await self._ensure(st, ns, topic, serving.definition)
                    await self._call(st.link.ensure_consumer, stream, spec)
                    if not bound:
                        bound.append(await bind())
                    if said:
                        log.info("consumer %s of %s on NATS at %s is set up again",
                                 spec["description"], topic, st.link.server.address)
                    wait, said = RETRY_MIN, False
                except MeshError as exc:
                    generation = -1
                    (log.debug if said else log.warning)(
                        "consumer %s of %s on NATS at %s not set up yet: %s (retrying)",
                        spec["description"], topic, st.link.server.address, exc.detail)
                    said = True
                    await trio.sleep(wait)
                    wait = min(wait * 2, RETRY_MAX)
                    continue
            await st.changed.wait()

    async def _serve(self, serving: _Serving) -> None:
        ns, topic, name = serving.key
        st = self._link(serving.definition)
        spec = consumer_spec(ns, topic, name, serving.definition, self.s)
        bound: list[Any] = []

        def arrived(msg: Any) -> None:  # in trio, from the loop
            if serving.stopped:
                self._return(st, msg)
                return
            serving.queue.append(msg)
            serving.wake.set()

        def bind() -> Any:
            return self._call(st.link.bind, spec["deliver_subject"], spec["deliver_group"],
                              arrived)

        try:
            with serving.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_bound, serving, st, spec, bind, bound)
                    while True:
                        await serving.wake.wait()
                        serving.wake = trio.Event()
                        while serving.queue:
                            await self._deliver(serving, st, serving.queue.popleft())
        finally:
            serving.stopped = True
            self._unbind(st, bound)
            while serving.queue:  # arrived, never handed to a member: back without a count
                self._return(st, serving.queue.popleft())

    async def _move(self, serving: _Serving) -> None:
        ns, topic = serving.key[0], serving.key[1]
        st = self._link(serving.definition)
        spec = delay_spec(ns, topic)
        bound: list[Any] = []

        def moved(n: int) -> None:
            self.stats["broker_nats_moved" if n else "broker_nats_bad"] += 1

        def bind() -> Any:
            return self._call(st.link.bind_delays, spec["deliver_subject"],
                              spec["deliver_group"], subject(ns, topic), moved)

        try:
            with serving.scope:
                await self._keep_bound(serving, st, spec, bind, bound)
        finally:
            self._unbind(st, bound)

    def _unbind(self, st: _Link, bound: list[Any]) -> None:
        if bound:
            with contextlib.suppress(BridgeClosed):
                self.bridge.post(st.link.unbind, bound[0])

    async def _deliver(self, serving: _Serving, st: _Link, msg: Any) -> None:
        """Hand one message to a local member of NAME, or dead-letter it (J3: or drop a
        malformed one)."""
        ns, topic, name = serving.key
        try:
            meta = msg.metadata
            m = messages.decode_message(wire.loads(msg.data, max_depth=64),
                                        self.broker.s.max_message_bytes)
            if m.topic != topic:
                raise messages.WireError("a message of another topic")
        except Exception as exc:
            self.stats["broker_nats_bad"] += 1
            if self.stats["broker_nats_bad"] & (self.stats["broker_nats_bad"] - 1) == 0:
                log.warning("a message on the stream of %s is not a meshd message (%s): "  # 1,
                            "terminated (%d so far)", topic,  # 2, 4, 8...: never a flood
                            type(exc).__name__, self.stats["broker_nats_bad"])
            self._settle(st, [(msg, "term", None)])
            return
        where = (meta.stream, int(meta.sequence.stream))
        attempt = attempt_of(int(meta.num_delivered), self._returned.get(where, 0))
        max_deliver = int(serving.definition.get("max_deliver", self.s.max_deliver))
        if attempt > max_deliver:
            await self._dead_letter(serving, st, msg, m, attempt - 1, where)
            return
        group = DURABLE + name
        targets = self.broker.interest.local_targets(ns, topic, [group])
        sub = self.broker._one_of(ns, group, targets.groups.get(group, ()))
        if sub is None:
            self._return(st, msg)
            return
        tag = self.broker.next_tag()
        sub.unacked.add(tag)
        self._tags[tag] = _Held(msg, sub, st, attempt, where)
        if attempt > 1:
            self.stats["broker_nats_redelivered"] += 1
        await sub.inbox.deliver({**m.to_wire(), "tag": tag, "attempt": attempt,
                                 "durable": name, "origin": ORIGIN, "seq": where[1]})
        self.stats["broker_nats_delivered"] += 1
        self.broker.stats["broker_delivered"] += 1
        if m.headers and TRACEPARENT in m.headers and self.broker.tracer is not None:
            self.broker.trace_delivery(m.headers[TRACEPARENT], topic, 1, durable=name)

    async def _dead_letter(self, serving: _Serving, st: _Link, msg: Any,
                           m: messages.Message, delivered: int, where: tuple[str, int]
                           ) -> None:
        ns, topic, name = serving.key
        headers = dict(m.headers)
        headers[REASON] = f"not acked after {delivered} deliveries (durable subscriber " \
                          f"{name!r})"[:1024]
        headers["meshd-dead-topic"] = topic
        dead_topic = topic if topic.endswith(DEAD_SUFFIX) else topic + DEAD_SUFFIX
        dead = messages.Message(messages.new_id(), dead_topic, m.body, time.time(),
                                f"node:{self.node}", headers)
        definition = self.definition(ns, dead_topic)
        try:
            if dead_topic != topic and is_nats(definition):
                assert definition is not None
                await self._publish_once(self._link(definition), ns, dead, definition, None,
                                         f"meshd-dead-{where[0]}-{where[1]}", False)
            else:
                await self.broker.publish(ns, dead)
        except MeshError as exc:  # the message stays; it comes again and is tried again
            log.warning("dead letter of %s not kept yet: %s", topic, exc.detail)
            self._settle(st, [(msg, "nak", BACKOFF[-1])])
            return
        self._settle(st, [(msg, "term", None)])
        self._returned.pop(where, None)
        self.stats["broker_nats_dead"] += 1
        self.dead[serving.key] = self.dead.get(serving.key, 0) + 1

    def _return(self, st: _Link, msg: Any) -> None:
        """A delivery no member took: it comes again soon, and this node does not count it
        as an attempt (J2)."""
        with contextlib.suppress(Exception):
            meta = msg.metadata
            where = (meta.stream, int(meta.sequence.stream))
            self._returned[where] = self._returned.get(where, 0) + 1
            self._returned.move_to_end(where)
            while len(self._returned) > MAX_RETURNED:
                self._returned.popitem(last=False)
        self.stats["broker_nats_returned"] += 1
        self._settle(st, [(msg, "nak", RETURN_DELAY)])

    def _settle(self, st: _Link, items: list[tuple[Any, str, float | None]]) -> None:
        with contextlib.suppress(BridgeClosed):
            self.bridge.post(st.link.settle, items)

    def settle_tags(self, sub: LocalSub, kind: str, tags: list[Any],
                    delay: float | None = None) -> int:
        """A subscriber's acks or naks of messages of NATS topics (tags it got); how many
        were known."""
        by_link: dict[int, tuple[_Link, list[tuple[Any, str, float | None]]]] = {}
        for tag in tags:
            held = self._tags.get(tag) if type(tag) is int else None
            if held is None or held.sub is not sub:
                continue
            del self._tags[tag]
            sub.unacked.discard(tag)
            if kind == "ack":
                item = (held.msg, "ack", None)
                self._returned.pop(held.where, None)
            else:
                item = (held.msg, "nak", nak_delay(held.attempt, delay))
            by_link.setdefault(id(held.link), (held.link, []))[1].append(item)
        for st, items in by_link.values():
            self._settle(st, items)
        return sum(len(items) for _, items in by_link.values())

    def release(self, sub: LocalSub) -> None:
        """A member went away: what it held comes again at once, not counted as an
        attempt."""
        for tag in list(sub.unacked):
            held = self._tags.get(tag)
            if held is not None and held.sub is sub:
                del self._tags[tag]
                sub.unacked.discard(tag)
                self._return(held.link, held.msg)

    # --- views ------------------------------------------------------------------------------

    def row(self, ns: str, topic: str, definition: dict[str, Any]) -> dict[str, Any]:
        """This node's row of a NATS topic for `meshd topics`: its settings (J1) and the
        dead letters it made; counts held by NATS are added by `describe`."""
        subs = {k[2]: {"pending": 0, "waiting": 0, "scheduled": 0, "dead": n, "lost": 0}
                for k, n in self.dead.items() if k[:2] == (ns, topic)}
        return {"namespace": ns, "topic": topic, "durable": True,
                "settings": public(definition), "messages": 0, "last_seq": 0,
                "copies": {}, "subscribers": subs}

    async def describe(self, ns: str, rows: list[dict[str, Any]]) -> None:
        """Fill in the merged rows of NATS topics with what the server counts: messages,
        and per durable subscriber those waiting and in flight (pending); delayed messages
        not yet due under `nats.scheduled`. At most DESCRIBE_WAIT in all; a server that
        does not answer is said under `nats.error`."""
        answered: set[str] = set()

        async def one(row: dict[str, Any]) -> None:
            definition = self.definition(ns, row["topic"])
            if not is_nats(definition):
                return
            assert definition is not None
            if not self.usable(ns, row["topic"], definition):
                row["nats"] = {"error": "the topic's definition cannot be used"}
                return
            stream = stream_name(ns, row["topic"])
            info: dict[str, Any] = {"stream": stream}
            row["nats"] = info
            st = self._link(definition)
            try:
                await self._ready(st)
                got = await self._call(st.link.describe, stream)
            except MeshError as exc:
                info["error"] = exc.detail
                return
            answered.add(stream)
            row["messages"] = got["messages"]
            delayed = got["consumers"].pop(DELAY_CONSUMER, None) or {}
            info["scheduled"] = delayed.get("waiting", 0) + delayed.get("pending", 0)
            for n, counts in got["consumers"].items():  # by NAME (their description)
                sub = row["subscribers"].setdefault(
                    n, {"pending": 0, "waiting": 0, "scheduled": 0, "dead": 0, "lost": 0})
                sub["pending"], sub["waiting"] = counts["pending"], counts["waiting"]
                sub["redelivered"] = counts["redelivered"]

        with trio.move_on_after(DESCRIBE_WAIT) as scope:
            async with trio.open_nursery() as nursery:
                for row in rows:
                    if row.get("settings", {}).get("backend") == "nats":
                        nursery.start_soon(one, row)
        if scope.cancelled_caught:
            for row in rows:
                if "nats" in row and row["nats"]["stream"] not in answered and \
                        "error" not in row["nats"]:
                    row["nats"]["error"] = f"no answer from NATS within {DESCRIBE_WAIT:g} s"
