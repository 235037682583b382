"""Control operations of the broker (served locally and through the proxy, meshd/ops.py).

Rules:
- Every op acts in one namespace (`namespace`, default "default"); topics of two
  namespaces never meet.
- Auth resources, checked in the op's namespace with the caller's token (none: the local
  operator acts as this node): `topic:TOPIC:publish` to publish, `topic:PATTERN:subscribe`
  to subscribe (the pattern as written: a rule for `orders.*` is what lets `orders.*` be
  subscribed), `topic:TOPIC:admin` to create or delete a durable topic. Listing topics
  reads the mesh (`mesh:topics:`).
- `broker.topics.create` takes `backend` ("embedded", the default, or "nats": admins only)
  and for NATS a `url` (nats://[user:password@]host[:port]); the URL is kept in the
  definition and never answered back: views show `backend` and `server` (host:port) only.
- `broker.publisher` is a session for publishing fast: frames go one way, failures come
  back numbered, `flush` confirms (meshd/broker/ops.py `publisher`).
- `broker.subscribe` is a session: the reply names the subscription, then the daemon sends
  `{"msgs": [message, ...]}` frames; the client may send `{"ack": [tag, ...]}` and
  `{"nak": [tag, ...], "delay": seconds}` for durable messages (each carries its `tag`).
  Closing the connection ends the subscription; unacked durable messages go back to their
  origin at once. Flow: the daemon sends at most `credit` messages (subscribe argument;
  default the buffer size, at most 256) beyond what the client confirmed consuming with
  `{"credit": n}` frames; the rest waits in the subscription's inbox, whose policy applies.
- Bad input is a 400 (invalid topic, pattern, queue, buffer, policy, oversized message), a
  missing durable topic a 404, a refusal 401/403; nothing else is disturbed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import trio

from meshd import namespaces
from meshd.debug import traces
from meshd.errors import MeshError, bad_request, not_found
from meshd.ops import REQUEST_TOKEN, Conn, Finish, Op, acting_node, mesh_resource

from . import messages, overview
from .durable import DEAD_SUFFIX, DurableTopics, parse_settings
from .interest import check_queue
from .service import DURABLE, BrokerService, Credit
from .subjects import check_pattern, check_topic, matches

MAX_DELAY = 365 * 86400.0
MAX_PUBS = 4096  # messages in one publisher frame (more are ignored)
MAX_CREDIT = 4096  # messages a client may hold unconsumed (the default: its buffer, up to 256)


class BrokerOps:
    def __init__(self, broker: BrokerService, durable: DurableTopics, auth: Any,
                 node: str, require_admin: Callable[[str], Any] | None = None) -> None:
        self.require_admin = require_admin
        self.broker = broker
        self.durable = durable
        self.auth = auth
        self.node = node
        self._ids = messages.Ids()
        broker.on_query = self.answer

    def ops(self) -> list[Op]:
        return [
            Op("broker.publish", self.publish, "checked", fast=self.publish_fast),
            Op("broker.subscribe", self.subscribe, "checked", "session"),
            Op("broker.publisher", self.publisher, "checked", "session"),
            Op("broker.topics", self.topics, mesh_resource("topics", per_namespace=True)),
            Op("broker.topics.create", self.create, "checked"),
            Op("broker.topics.delete", self.delete, "checked"),
        ]

    def _check(self, ns: str, name: str, action: str) -> Any:
        return self.auth.check(REQUEST_TOKEN.get(), acting_node(self.node),
                               ("topic", name, action), namespace=ns)

    async def publish(self, args: dict[str, Any]) -> Any:
        return await self._publish(args, None)

    def _checked(self, args: dict[str, Any], seen: dict[Any, Any] | None
                 ) -> tuple[str, str, Any, dict[str, Any] | None]:
        """(namespace, topic, who publishes, durable definition or None) of a publish; a
        MeshError for a bad name or a refusal. `seen` (a publisher session's, for one
        frame) keeps them per namespace and topic: a frame of many messages on one topic
        is checked once, as of the moment the frame is handled."""
        key = (args.get("namespace"), args.get("topic"))
        hit = seen.get(key) if seen is not None and isinstance(key[1], str) \
            and isinstance(key[0], str | None) else None
        if hit is None:
            ns = namespaces.check(key[0])
            topic = check_topic(key[1])
            who = self._check(ns, topic, "publish")
            hit = (ns, topic, who, self.durable.definition(ns, topic))
            if seen is not None and isinstance(key[1], str):
                seen[key] = hit
        return hit  # type: ignore[no-any-return]

    def _message(self, args: dict[str, Any], ns: str, topic: str, who: Any,
                 definition: dict[str, Any] | None) -> tuple[messages.Message, float | None]:
        """The message of a checked publish and its delay; a MeshError saying what is
        wrong."""
        delay = args.get("delay")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float)
                                  or not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY):
            raise bad_request("delay must be 0 to 365 days in seconds", id="meshd.broker")
        if delay and definition is None:
            raise not_found(f"a delayed message needs a durable topic: {topic!r} is not one "
                            f"in namespace {ns!r} (create it with `meshd topics create "
                            f"{topic} --durable`)", id="meshd.broker")
        msg = messages.build(topic, args.get("body"), args.get("headers"), who.id,
                             self.broker.s.max_message_bytes, args.get("id"), ids=self._ids)
        return msg, delay or None

    async def _publish(self, args: dict[str, Any], seen: dict[Any, Any] | None) -> Any:
        """One publish (`seen`: see _checked; it also keeps where plain copies went)."""
        ns, topic, who, definition = self._checked(args, seen)
        msg, delay = self._message(args, ns, topic, who, definition)
        traced = self._traced(msg)
        if definition is not None:
            result = await self.durable.publish(ns, msg, definition, delay,
                                                minted=args.get("id") is None)
        else:
            result = await self.broker.publish(ns, msg, routes=seen)
        if traced is not None:
            self._producer_span(traced, msg)
        return result

    def _traced(self, msg: messages.Message) -> Any:
        """A message whose publisher sent a sampled traceparent: it carries this daemon's
        producer span instead (its consumers' spans are children of it); the span's
        (context, parent, start). None for the others (nothing is added to them)."""
        tp = msg.headers.get(traces.TRACEPARENT) if msg.headers else None
        if tp is None or self.broker.tracer is None:
            return None
        parent = traces.parse(tp)
        if parent is None or not parent.sampled:
            return None
        ctx = traces.Context(parent.trace_id, self.broker.tracer.sampler.span_id(), True)
        msg.headers[traces.TRACEPARENT] = ctx.header()
        return ctx, parent.span_id, time.time(), time.perf_counter()

    def _producer_span(self, traced: Any, msg: messages.Message) -> None:
        ctx, parent, wall, t0 = traced
        self.broker.tracer.end(ctx, parent, f"publish {msg.topic}", "producer", "", wall,
                               time.perf_counter() - t0, attrs={"message": msg.id})

    def publish_fast(self, args: dict[str, Any], token: str | None, finish: Finish,
                     size: int) -> bool:
        """broker.publish on a multiplexed control connection: a publish to a durable topic
        (without --replicas) is answered by the group commit, without a task; anything
        else (a core topic, bad input, a refusal) goes the ordinary way."""
        try:
            ns, topic, who, definition = self._checked(args, None)
            if definition is None:
                return False
            msg, delay = self._message(args, ns, topic, who, definition)
        except MeshError:
            return False
        traced = self._traced(msg)
        if traced is not None:
            self._producer_span(traced, msg)
        return self.durable.publish_fast(ns, msg, definition, delay, args.get("id") is None,
                                         finish)

    async def publisher(self, args: dict[str, Any], conn: Conn) -> None:
        """A pipelined publisher: frames of `{"pubs": [{publish args}, ...]}` (or one
        `{"pub": {...}}`), each message published in order without an answer (as a NATS
        client's publish); a failure is sent back as `{"error": {...}, "n": N}` (N counts
        the messages from 1); `{"flush": K}` (alone or in the same frame, after its pubs) is
        answered `{"flushed": K, "published": N}` once every message before it was
        handled. A frame's messages are checked (permission, durable or not) and routed
        once per topic, as of when the frame is handled."""
        await conn.reply({"node": self.node})
        n = 0
        try:
            while True:
                frame = await conn.receive()
                if not isinstance(frame, dict):
                    continue
                pubs = frame.get("pubs")
                if "pub" in frame:
                    pubs = [frame["pub"]]
                if isinstance(pubs, list):
                    seen: dict[Any, Any] = {}
                    for pub in pubs[:MAX_PUBS]:
                        n += 1
                        try:
                            if not isinstance(pub, dict):
                                raise bad_request("pub must be a map of publish arguments",
                                                  id="meshd.broker")
                            await self._publish(pub, seen)
                        except MeshError as exc:
                            await conn.send({"error": exc.to_dict(), "n": n})
                if "flush" in frame:
                    await conn.send({"flushed": frame["flush"], "published": n})
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def subscribe(self, args: dict[str, Any], conn: Conn) -> None:
        ns = namespaces.check(args.get("namespace"))
        pattern = check_pattern(args.get("pattern"))
        queue = check_queue(args.get("queue"))
        durable = check_queue(args.get("durable"))
        if queue is not None and queue.startswith(DURABLE):
            raise bad_request(f"queue group names may not start with {DURABLE!r}",
                              id="meshd.broker")
        who = self._check(ns, pattern, "subscribe")
        if durable is not None:
            if queue is not None and queue != durable:
                raise bad_request("a durable subscriber shared by a queue group is named "
                                  "once: give --durable NAME (every member uses the same "
                                  "name), not a different --queue", id="meshd.broker")
            topics = [t for (t_ns, t) in self.durable.definitions(ns)
                      if t_ns == ns and matches(pattern, t)]
            if not topics:
                raise not_found(f"no durable topic matches {pattern!r} in namespace {ns!r}: "
                                f"a durable subscriber reads a durable topic (`meshd topics "
                                f"create TOPIC --durable`)", id="meshd.broker")
            size, policy = self.broker.s.max_in_flight, "block"
        else:
            size, policy = self.broker.check_size(args.get("buffer"), args.get("policy"))
        credit = args.get("credit")
        if credit is None:
            credit = min(size, 256)
        if type(credit) is not int or not 1 <= credit <= MAX_CREDIT:
            raise bad_request(f"credit must be 1 to {MAX_CREDIT} messages", id="meshd.broker")
        window = Credit(credit)
        sub = self.broker.add_sub(ns, pattern, None if durable else queue, who.id, size,
                                  policy, durable)
        try:
            await conn.reply({"id": sub.id, "node": self.node, "namespace": ns,
                              "pattern": pattern, "queue": queue, "durable": durable,
                              "buffer": size, "policy": policy, "credit": credit})
            # (each side ends the session quietly: no error crosses the nursery, so none
            # arrives wrapped in an exception group, whatever trio's strictness)
            async with trio.open_nursery() as nursery:
                async def pump() -> None:
                    with contextlib.suppress(trio.BrokenResourceError,
                                             trio.ClosedResourceError):
                        await self.broker.pump(sub, conn.send, window)
                    nursery.cancel_scope.cancel()
                nursery.start_soon(pump)
                with contextlib.suppress(EOFError, trio.BrokenResourceError,
                                         trio.ClosedResourceError):
                    while True:
                        frame = await conn.receive()
                        if isinstance(frame, dict):
                            self._client_frame(sub, frame, window)
                nursery.cancel_scope.cancel()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # (the reply could not be written: the client is gone)
        finally:
            self.broker.drop_sub(sub)

    def _client_frame(self, sub: Any, frame: dict[str, Any], window: Credit) -> None:
        more = frame.get("credit")
        if type(more) is int and 0 < more <= MAX_CREDIT and window.left < MAX_CREDIT:
            window.grant(more)
        for kind in ("ack", "nak"):
            tags = frame.get(kind)
            if isinstance(tags, list) and tags:
                delay = frame.get("delay")
                if not isinstance(delay, int | float) or isinstance(delay, bool) \
                        or not 0 <= delay <= MAX_DELAY:
                    delay = None
                self.durable.settle_tags(sub, kind, tags[:100_000], delay)

    async def topics(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        interest = self.broker.interest.rows(ns)
        for row in interest:
            queue = row["queue"]
            row["durable"] = queue[len(DURABLE):] if queue and queue.startswith(DURABLE) \
                else None
            if row["durable"]:
                row["queue"] = None
        members = [(m.name, m.addr) for m in self.broker.core.member_list()
                   if self.broker._live(m.name)]
        cluster = await overview.gather(self.node, ns, self.view(ns), members,
                                        self.broker.links)
        await self.durable.jetstream.describe(ns, cluster["durable"])  # NATS's own counts
        return {"namespace": ns, "node": self.node, "durable": cluster["durable"],
                "subscriptions": cluster["subscriptions"],
                "unanswered": cluster["unanswered"], "interest": interest,
                "local": self.broker.sub_rows(ns),
                "stats": {**self.broker.stats, **self.durable.stats,
                          **self.durable.origin.stats}}

    def view(self, ns: str) -> dict[str, Any]:
        """What this node holds of namespace `ns` (overview.py)."""
        return overview.local_view(self.durable.rows(ns), self.broker.sub_rows(ns))

    def answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        return overview.answer(msg, self.view)

    async def create(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        topic = check_topic(args.get("topic"))
        if args.get("durable") is False:
            raise bad_request("only durable topics are created: core topics need no "
                              "creating (publish and subscribe)", id="meshd.broker")
        self._check(ns, topic, "admin")
        if not topic.endswith(DEAD_SUFFIX):
            self._check(ns, topic + DEAD_SUFFIX, "admin")
        if args.get("backend") not in (None, "embedded") and self.require_admin is not None:
            # a topic on an outside server sends its messages there: for admins only, as
            # databases on engines (topic:NAME:admin is granted to services by default)
            self.require_admin(ns)
        settings = parse_settings(args, self.broker.s)
        return await self.durable.create(ns, topic, settings)

    async def delete(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        topic = check_topic(args.get("topic"))
        self._check(ns, topic, "admin")
        return await self.durable.delete(ns, topic)
