"""Durable topics (trio shell): definitions, the local log, durable subscribers' delivery.

Theory of operation (docs/broker.md "Durable topics"):
- A durable topic's definition (its settings) is a record in the replicated store (system
  database "broker", table "topics", key "NS/NAME"), so every node knows it; creating or
  deleting one is an admin act of the namespace.
- Every node is the origin of its own log: a message published through this daemon to a
  durable topic is appended to this node's `broker.db` (log.py) and acknowledged once the
  transaction holding it is committed (group commit: concurrent publishes share one
  transaction per topic). So publishing never waits for another node and both sides of a
  partition keep accepting publishes; each side's messages reach the other's subscribers
  after the heal.
- A durable subscriber NAME is interest in the queue group "durable:NAME" (service.py); each
  origin keeps one `Consumer` (consumer.py) per (namespace, topic, NAME) it has seen such
  interest for, or has state for on disk. The consumer's state is saved in broker.db as it
  changes (at most SAVE_EVERY seconds later), so a restart of the origin resumes after the
  last saved ack and repeats only what was not acked (or acked within that last moment).
- Delivery (decided by the sans-IO origin core, origin.py O1-O4; this shell reads the log
  and sends): while some node holds a member of NAME (nearest first, then least loaded, as
  a queue group), the origin polls the consumer and sends each offer to one such node as a
  "deliver" item; that node hands it to one local member, tagged; the member's ack or nak
  travels back to the origin by tag. A member that goes away (its session closes) naks what
  it held, so it is offered again at once; a node that dies leaves its deliveries to the
  ack timeout, or to `on_gone`, which naks them at once.
- A message delivered `max_deliver` times and not acked is dead: it is published to
  TOPIC.dead (durable too: `create` defines both) with the reason in the header
  `meshd-dead-reason`, and counted.
- Delays (`delay` seconds at publish) are for durable topics only: the message is in the log
  at once and offered to durable subscribers no earlier than due; core subscribers never
  see a delayed message (it would arrive early).
- Retention (max-age, max-msgs) trims the log every TRIM_EVERY seconds; a message trimmed
  before a subscriber acked it is counted as lost for that subscriber.
- Backends: a definition without `backend` (or `embedded`) is this module's log; one with
  `backend: nats` keeps its messages in NATS JetStream (jetstream.py, which this class
  hands publishes, subscribers' acks and views of such topics to). The URL in such a
  definition is a credential: `public` settings are what any view shows.
- Items from peers are checked strictly; a malformed one is counted by the caller and
  dropped. A peer acks or naks only by (namespace, topic, name, sequence): it acts as a
  node, and nodes are trusted to deliver (the rules were checked where the subscriber
  subscribed).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from meshd import namespaces
from meshd.debug.traces import TRACEPARENT
from meshd.errors import MeshError, bad_request, not_found
from meshd.ops import Finish
from meshd.store import crdt

from . import messages
from .consumer import Consumer
from .jetstream import BACKENDS, JetStreamTopics, is_nats, parse_url, public
from .log import BrokerLog, TopicSettings
from .mirrors import ReplicaWaits, check_item, choose, taker
from .origin import DURABLE, Dead, Key, Origin, log_of, mirror_ns
from .service import BrokerService, LocalSub
from .subjects import check_topic

log = logging.getLogger("meshd.broker")
DB, TABLE = "broker", "topics"
DEAD_SUFFIX = ".dead"
REASON = "meshd-dead-reason"
SAVE_EVERY = 0.05
TRIM_EVERY = 10.0
DISCOVER_EVERY = 0.5
READ_AHEAD = 256
MAX_REPLICAS = 7
RETURN_DELAY = 0.2
# an undeliverable delivery (its outbox could not send it) comes again this much later: the
# member's link is down, so each try costs a dial; not counted as an attempt (`dropped`)
UNSENT_DELAY = 5.0
ABSORB_EVERY = 1.0  # seconds between sends of an absorb not yet confirmed
ABSORB_TRIES = 60  # a delivery that found no member is offered again this much later


def topic_key(ns: str, topic: str) -> str:
    return f"{ns}/{topic}"


def parse_settings(args: dict[str, Any], defaults: Any) -> dict[str, Any]:
    """A topic definition from `topics create` arguments; a 400 saying what is wrong."""
    out: dict[str, Any] = {"durable": True}
    for name, kind, low in (("max_age", float, 0.001), ("max_msgs", int, 1),
                            ("replicas", int, 1), ("max_deliver", int, 1),
                            ("ack_wait", float, 0.01)):
        value = args.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or (kind is int and not isinstance(value, int)) or not value >= low \
                or not math.isfinite(value):
            raise bad_request(f"{name} must be a number of at least {low}", id="meshd.broker")
        out[name] = kind(value)
    backend = args.get("backend") or "embedded"
    if backend not in BACKENDS:
        raise bad_request(f"backend must be one of {', '.join(BACKENDS)}", id="meshd.broker")
    url = args.get("url")
    if backend == "nats":
        parse_url(url)  # a 400 saying what is wrong (never quoting the URL)
        out["backend"], out["url"] = "nats", url.strip()
    elif url is not None:
        raise bad_request("a url is for --backend nats (the embedded log needs none)",
                          id="meshd.broker")
    out.setdefault("replicas", 1)
    out.setdefault("max_deliver", defaults.max_deliver)
    out.setdefault("ack_wait", defaults.ack_wait)
    if out["replicas"] > MAX_REPLICAS:
        raise bad_request(f"replicas must be 1 to {MAX_REPLICAS}", id="meshd.broker")
    return out


CORE_BACKLOG = 4096  # committed messages waiting for their core copies to be sent


@dataclass(slots=True)
class _Append:
    """A publish waiting for the group commit."""
    item: tuple[str, float, float | None, Any]  # (id, published_at, not_before, message)
    msg: messages.Message
    minted: bool  # the id was made here: no duplicate can exist
    finish: Finish
    after: bool  # the committer does what follows the commit and answers the result
    not_before: float | None


class DurableTopics:
    def __init__(self, broker: BrokerService, store: Any, data_dir: Path, settings: Any
                 ) -> None:
        self.broker = broker
        self.store = store
        self.s = settings
        self.log = BrokerLog(data_dir, fsync=settings.fsync)
        # the origin side's decisions (sans-IO, shared with the simulator)
        self.origin = Origin(broker.node, broker.interest, broker.route_cost, broker.load)
        self.consumers = self.origin.consumers
        self._pending: dict[tuple[str, str], list[_Append]] = {}
        self._commit_wanted = trio.Event()
        # core copies of committed messages, sent on in commit order by _core_sender
        self._to_core_send, self._to_core = trio.open_memory_channel[Any](CORE_BACKLOG)
        self._kick = trio.Event()
        self._tags: dict[int, tuple[str, Key, int, LocalSub, str | None]] = {}
        self.stats = {"broker_durable_fast": 0, "broker_durable_published": 0,
                      "broker_dead": 0, "broker_lost": 0, "broker_commits": 0,
                      "broker_deliveries_unsent": 0,
                      "broker_commit_us": 0}
        self._lost: dict[Key, int] = {}
        self._saved: dict[Key, int] = {}  # the ack floor as last saved
        self._deadc: dict[Key, int] = {}
        self._waits = ReplicaWaits()
        # caches of the publish path: decoded definitions by stored value, logs made
        self._definitions: dict[tuple[str, str], tuple[bytes, dict[str, Any]]] = {}
        self._logged: dict[tuple[str, str], dict[str, Any]] = {}
        self._sets: dict[tuple[str, str], list[str]] = {}  # our topic -> its replica set
        self._mirror_sets: dict[tuple[str, str, str], list[str]] = {}  # (origin, ns, topic)
        # copies of logs we deliver while their origin is down: (log namespace, topic)
        self._taking: set[tuple[str, str]] = set()
        # absorbs sent and not yet confirmed: (node, ns, topic, name) -> (item, tries left)
        self._absorbs: dict[tuple[str, str, str, str], tuple[dict[str, Any], int]] = {}
        # topics on NATS JetStream (their own component; its tasks in our nursery)
        self.jetstream = JetStreamTopics(broker, settings, self.stats, self.definition,
                                         self.definitions)
        broker.durable = self

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._restore()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._committer)
                nursery.start_soon(self._core_sender)
                nursery.start_soon(self._deliverer)
                nursery.start_soon(self._saver)
                nursery.start_soon(self._trimmer)
                nursery.start_soon(self._absorber)
                await nursery.start(self.jetstream.run)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                self._save_now()
            self.log.close()

    # --- definitions ------------------------------------------------------------------------

    def definition(self, ns: str, topic: str) -> dict[str, Any] | None:
        state = self.store.rep.state.get(DB, TABLE, topic_key(ns, topic))
        if state is None or not self.store._live(state):
            return None
        reg = state.get("lww")
        if reg is None or reg[1] is None:
            return None
        cached = self._definitions.get((ns, topic))
        if cached is not None and cached[0] is reg[1]:
            return cached[1]  # the same stored value: decoded already (every publish asks)
        try:
            value = json.loads(reg[1])
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(value, dict):
            return None
        if len(self._definitions) > 4096:
            self._definitions.clear()
        self._definitions[(ns, topic)] = (reg[1], value)
        return value

    def definitions(self, ns: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        out = {}
        for key, value in self.store.json_records(DB, TABLE).items():
            t_ns, _, topic = key.partition("/")
            if isinstance(value, dict) and (ns is None or t_ns == ns):
                out[(t_ns, topic)] = value
        return out

    async def create(self, ns: str, topic: str, settings: dict[str, Any]) -> dict[str, Any]:
        topic = check_topic(topic)
        names = [topic] if topic.endswith(DEAD_SUFFIX) else [topic, topic + DEAD_SUFFIX]
        for name in names:
            held = self.definition(ns, name)
            if held is not None and is_nats(held) != is_nats(settings):
                raise MeshError(409, f"durable topic {name!r} exists with backend "
                                     f"{public(held)['backend']}: delete it first (`meshd "
                                     f"topics delete {name}`)", id="meshd.broker")
        if is_nats(settings):  # the server makes the streams, or says why not (503, 400)
            await self.jetstream.prepare(ns, names, settings)
        for name in names:
            raw = json.dumps(settings, sort_keys=True).encode()
            await self.store._commit_local(DB, TABLE, topic_key(ns, name),
                                           {"lww": crdt.lww(self.store.hlc.now(), raw)}, 1)
        return {"topic": topic, "namespace": ns, **public(settings)}

    async def delete(self, ns: str, topic: str) -> dict[str, Any]:
        topic = check_topic(topic)
        if self.definition(ns, topic) is None:
            raise not_found(f"no durable topic {topic!r} in namespace {ns!r}",
                            id="meshd.broker")
        names = [topic] if topic.endswith(DEAD_SUFFIX) else [topic, topic + DEAD_SUFFIX]
        definition = self.definition(ns, topic)
        left: list[str] = []
        if is_nats(definition):
            assert definition is not None
            left = await self.jetstream.drop(
                ns, [n for n in names if is_nats(self.definition(ns, n))], definition)
        for name in names:
            if self.definition(ns, name) is not None:
                await self.store._commit_local(
                    DB, TABLE, topic_key(ns, name),
                    {"lww": crdt.lww(self.store.hlc.now(), None)}, 1)
            for (log_ns, held) in list(self.log.topics()):
                if held == name and log_of(log_ns)[1] == ns:
                    self._drop_local(log_ns, name)  # ours and copies of others'
        out: dict[str, Any] = {"deleted": topic, "namespace": ns}
        if left:
            out["streams_left"] = left  # NATS could not be reached: delete them there
        return out

    def _drop_local(self, ns: str, topic: str) -> None:
        self._logged.pop((ns, topic), None)
        for key in [k for k in self.consumers if k[:2] == (ns, topic)]:
            self.origin.remove(key)
        self.log.delete(ns, topic)

    def _ensure_log(self, ns: str, topic: str, definition: dict[str, Any]) -> None:
        if self._logged.get((ns, topic)) is definition:
            return  # made from this very definition already
        wanted = TopicSettings(max_age=definition.get("max_age"),
                               max_msgs=definition.get("max_msgs"),
                               replicas=int(definition.get("replicas", 1)),
                               dedup_window=self.s.dedup_window)
        if self.log.topics().get((ns, topic)) != wanted:
            self.log.create(ns, topic, wanted)
        self._logged[(ns, topic)] = definition

    # --- publishing -------------------------------------------------------------------------

    async def publish(self, ns: str, msg: messages.Message, definition: dict[str, Any],
                      delay: float | None, minted: bool = False) -> dict[str, Any]:
        """Append to our log (acknowledged once committed, and with `--replicas N` once
        N-1 other nodes hold it), then deliver. `minted`: the id was made here just now
        (no duplicate can exist: the log does not look for one). A topic on NATS is
        published to its stream instead (jetstream.py)."""
        if is_nats(definition):
            return await self.jetstream.publish(ns, msg, definition, delay, minted)
        done = trio.Event()
        box: list[Any] = []

        def finish(result: Any, error: MeshError | None) -> None:
            box.append((result, error))
            done.set()

        replicas = int(definition.get("replicas", 1))
        not_before = self._not_before(delay)
        self._enqueue(ns, msg, definition, not_before, minted, finish, after=replicas == 1)
        await done.wait()
        result, error = box[0]
        if error is not None:
            raise error
        if replicas == 1:
            return result  # type: ignore[no-any-return]
        seq, duplicate = result
        if not duplicate:
            await self._replicate(ns, msg, seq, not_before, replicas)
            self._committed(ns, msg, seq, not_before)
            if not_before is None:
                await self.broker.publish(ns, msg)  # core subscribers get it live
        return self._answer(msg, seq, duplicate)

    def _answer(self, msg: messages.Message, seq: int, duplicate: bool) -> dict[str, Any]:
        """What a durable publish answers."""
        return {"id": msg.id, "seq": seq, "duplicate": duplicate, "node": self.broker.node}

    def publish_fast(self, ns: str, msg: messages.Message, definition: dict[str, Any],
                     delay: float | None, minted: bool, finish: Finish) -> bool:
        """The same without a task (a publish on a multiplexed control connection):
        `finish` gets the answer once committed. Not with --replicas (False: use
        publish)."""
        if is_nats(definition):
            return self.jetstream.publish_fast(ns, msg, definition, delay, minted, finish)
        if int(definition.get("replicas", 1)) != 1:
            return False
        self.stats["broker_durable_fast"] += 1
        self._enqueue(ns, msg, definition, self._not_before(delay), minted, finish,
                      after=True)
        return True

    @staticmethod
    def _not_before(delay: float | None) -> float | None:
        return time.time() + delay if delay else None

    def _enqueue(self, ns: str, msg: messages.Message, definition: dict[str, Any],
                 not_before: float | None, minted: bool, finish: Finish, after: bool) -> None:
        """Queue for the next group commit. `after`: the committer also does what follows
        a commit (consumers, core copies) and answers with the publish's result; else it
        answers (seq, duplicate) and the caller goes on."""
        self._ensure_log(ns, msg.topic, definition)
        self._pending.setdefault((ns, msg.topic), []).append(_Append(
            (msg.id, msg.published_at, not_before, msg.to_wire()), msg, minted, finish,
            after, not_before))
        self._commit_wanted.set()

    def _committed(self, ns: str, msg: messages.Message, seq: int,
                   not_before: float | None) -> None:
        """A new message is in the log (and on its replicas): its durable subscribers'
        consumers learn of it."""
        self.stats["broker_durable_published"] += 1
        for key, c in self.consumers.items():
            if key[:2] == (ns, msg.topic):
                c.append(seq, not_before)
        self._kick.set()

    async def _replicate(self, ns: str, msg: messages.Message, seq: int,
                         not_before: float | None, replicas: int) -> None:
        """Copies on replicas-1 other nodes; a 408 if they do not all confirm in time."""
        live = [m.name for m in self.broker.core.member_list() if self.broker._live(m.name)]
        nodes = choose(self.broker.node, replicas - 1, live, self.broker.route_cost)
        self._sets[(ns, msg.topic)] = nodes
        item = {"t": "replicate", "ns": ns, "topic": msg.topic, "seq": seq, "id": msg.id,
                "published_at": msg.published_at, "not_before": not_before,
                "msg": msg.to_wire(), "set": nodes}
        for node in nodes:
            await self.broker.outbox(node).put(item)
        got = await self._waits.wait((ns, msg.topic, seq), nodes,
                                     self.s.replica_timeout) if nodes else 0
        if got < replicas - 1:
            raise MeshError(408, f"only {got + 1} of {replicas} nodes hold message #{seq} "
                                 f"after {self.s.replica_timeout:g} s ({msg.id} is on disk "
                                 f"on {self.broker.node} and will be delivered)",
                            id="meshd.broker")

    async def _committer(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted = trio.Event()
            pending, self._pending = self._pending, {}
            for (ns, topic), items in pending.items():
                batch = [a.item for a in items]
                minted = {a.item[0] for a in items if a.minted}
                started = time.perf_counter()
                try:
                    out = await trio.to_thread.run_sync(self.log.append, ns, topic, batch,
                                                        minted)
                    self.stats["broker_commits"] += 1
                    self.stats["broker_commit_us"] += int((time.perf_counter() - started)
                                                          * 1e6)
                except Exception as exc:  # a failed write fails its publishes, not the node
                    log.error("durable append to %s/%s failed: %s", ns, topic, exc)
                    out = [exc] * len(items)
                for a, res in zip(items, out, strict=True):
                    if isinstance(res, BaseException):
                        a.finish(None, MeshError(503, f"the durable log could not be "
                                                      f"written: {res}", id="meshd.broker"))
                        continue
                    if not a.after:
                        a.finish(res, None)
                        continue
                    seq, duplicate = res
                    if not duplicate:
                        self._committed(ns, a.msg, seq, a.not_before)
                        if a.not_before is None:
                            await self._to_core_send.send((ns, a.msg))
                    a.finish(self._answer(a.msg, seq, duplicate), None)

    async def _core_sender(self) -> None:
        """Core copies of committed messages, in commit order (live subscribers of a
        durable topic): after the publisher's answer, so a slow core subscriber holds
        back this queue, not the log."""
        async for ns, msg in self._to_core:
            await self.broker.publish(ns, msg)

    # --- consumers --------------------------------------------------------------------------

    def _consumer(self, key: Key, state: dict[str, Any] | None = None) -> Consumer:
        c = self.consumers.get(key)
        if c is not None:
            return c
        definition = self.definition(log_of(key[0])[1], key[1]) or {}
        settings = {"ack_wait": float(definition.get("ack_wait", self.s.ack_wait)),
                    "max_deliver": int(definition.get("max_deliver", self.s.max_deliver)),
                    "max_in_flight": self.s.max_in_flight}
        now = time.time()
        c = Consumer.restore(state, now, **settings) if state else Consumer(**settings)
        last = self.log.last_seq(key[0], key[1])
        if not state:  # a new durable subscriber starts at the oldest message held
            first = self.log.read(key[0], key[1], 0, 1)
            c.floor = c.walked = c.last = (first[0].seq - 1) if first else last
        after = c.last
        while after < last:
            rows = self.log.read(key[0], key[1], after, 1000)
            if not rows:
                break
            for row in rows:
                c.append(row.seq, row.not_before)
            after = rows[-1].seq
        c.caught_up(last)
        self.origin.add(key, c)
        return c

    def _restore(self) -> None:
        for (ns, topic) in self.log.topics():
            if log_of(ns)[0] is None:  # copies of other nodes' logs wait for a takeover
                for name, state in self.log.subscribers(ns, topic).items():
                    self._consumer((ns, topic, name), state)

    def _discover(self) -> None:
        """Consumers for the durable subscribers the origin core wants (O1), over our own
        logs and the copies we took over."""
        delivered = [(log_ns, topic) for (log_ns, topic) in self.log.topics()
                     if log_of(log_ns)[0] is None or (log_ns, topic) in self._taking]
        for key in self.origin.wanted(delivered):
            self._consumer(key)

    async def _deliverer(self) -> None:
        while True:
            deadline = time.time() + DISCOVER_EVERY
            due = self.origin.next_deadline()  # (consumers with nobody to serve left out)
            if due is not None:
                deadline = min(deadline, due)
            with trio.move_on_after(max(0.0, deadline - time.time())):
                await self._kick.wait()
            self._kick = trio.Event()
            self._discover()
            for key in list(self.consumers):
                await self._offer(key)

    async def _offer(self, key: Key) -> None:
        """Carry out what the origin core decides for `key` now (O2)."""
        actions = self.origin.offer(key, time.time())
        if not actions:
            return
        log_ns, topic, name = key
        origin, ns = log_of(log_ns)
        lo, hi = min(a.seq for a in actions), max(a.seq for a in actions)
        rows = {r.seq: r for r in self.log.read(log_ns, topic, lo - 1, hi - lo + 1)} \
            if hi - lo < READ_AHEAD * 4 else {}
        for action in actions:
            row = rows.get(action.seq) or self.log.get(log_ns, topic, action.seq)
            if row is None:  # trimmed by retention before it was acked
                self.origin.lost(key, action.seq)
                self._lost[key] = self._lost.get(key, 0) + 1
                self.stats["broker_lost"] += 1
                continue
            if isinstance(action, Dead):
                self._deadc[key] = self._deadc.get(key, 0) + 1
                self.stats["broker_dead"] += 1
                await self._dead_letter(ns, topic, row.message, action.reason, name)
                continue
            item = {"t": "deliver", "ns": ns, "topic": topic, "durable": name,
                    "seq": action.seq, "attempt": action.attempt, "msg": row.message}
            if origin is not None:
                item["log"] = origin  # a copy we deliver for its origin
            if action.node == self.broker.node:
                await self._deliver_here(self.broker.node, item)
            else:
                await self.broker.outbox(action.node).put(item)

    async def _dead_letter(self, ns: str, topic: str, raw: dict[str, Any], reason: str,
                           name: str) -> None:
        headers = dict(raw.get("headers") or {})
        headers[REASON] = f"{reason} (durable subscriber {name!r})"[:1024]
        headers["meshd-dead-topic"] = topic
        dead_topic = topic + DEAD_SUFFIX if not topic.endswith(DEAD_SUFFIX) else topic
        msg = messages.Message(messages.new_id(), dead_topic, raw.get("body"), time.time(),
                               f"node:{self.broker.node}", headers)
        try:
            definition = self.definition(ns, dead_topic)
            if definition is not None and dead_topic != topic:
                await self.publish(ns, msg, definition, None)
            else:
                await self.broker.publish(ns, msg)
        except MeshError as exc:
            log.warning("dead letter of %s/%s not kept: %s", ns, topic, exc.detail)

    # --- the subscriber's side --------------------------------------------------------------

    async def receive(self, peer: str, item: dict[str, Any]) -> None:
        """A durable item from another daemon (service.py hands over what is not a copy)."""
        kind = item.get("t")
        ns, topic, name = item.get("ns"), item.get("topic"), item.get("durable", "")
        if not isinstance(ns, str) or not isinstance(topic, str) or not isinstance(name, str):
            raise messages.WireError("durable item without namespace, topic or name")
        namespaces.check(ns)
        check_topic(topic)
        log_origin = item.get("log")
        if log_origin is not None and (not isinstance(log_origin, str)
                                       or not 0 < len(log_origin) <= 256):
            raise messages.WireError("a durable item's log names a node")
        if kind in ("replicate", "replicated", "mirror-state", "absorb", "absorbed"):
            await self._replica_item(peer, kind, ns, topic, name, check_item(item, kind))
        elif kind == "deliver":
            msg = item.get("msg")
            seq, attempt = item.get("seq"), item.get("attempt")
            if type(seq) is not int or type(attempt) is not int or seq < 1:
                raise messages.WireError("durable delivery without a sequence")
            messages.decode_message(msg, self.broker.s.max_message_bytes)
            await self._deliver_here(peer, item)
        elif kind in ("ack", "nak", "return"):
            seqs = item.get("seqs")
            if not isinstance(seqs, list) or len(seqs) > 100_000 \
                    or not all(type(s) is int for s in seqs):
                raise messages.WireError("acks are a list of sequence numbers")
            delay = item.get("delay")
            if delay is not None and (not isinstance(delay, int | float)
                                      or isinstance(delay, bool) or not 0 <= delay < 1e9):
                raise messages.WireError("a nak's delay is a number of seconds")
            self._settle(self._key(ns, topic, name, log_origin), kind, seqs, delay, peer)
        else:
            raise messages.WireError(f"unknown durable item {kind!r}")

    async def _deliver_here(self, origin: str, item: dict[str, Any]) -> None:
        ns, topic, name = item["ns"], item["topic"], item["durable"]
        group = DURABLE + name
        targets = self.broker.interest.local_targets(ns, topic, [group])
        sub = self.broker._one_of(ns, group, targets.groups.get(group, ()))
        if sub is None:  # the member left meanwhile: offer it again at once
            self._send_settle(origin, (ns, topic, name), "return", [item["seq"]], RETURN_DELAY,
                              item.get("log"))
            return
        tag = self.broker.next_tag()
        log_origin = item.get("log")
        sub.unacked.add(tag)
        self._tags[tag] = (origin, (ns, topic, name), item["seq"], sub, log_origin)
        await sub.inbox.deliver({**item["msg"], "tag": tag, "attempt": item["attempt"],
                                 "durable": name, "origin": log_origin or origin,
                                 "seq": item["seq"]})
        self.broker.stats["broker_delivered"] += 1
        headers = item["msg"].get("headers")
        if headers and TRACEPARENT in headers and self.broker.tracer is not None:
            self.broker.trace_delivery(headers[TRACEPARENT], topic, 1, durable=name)

    def settle_tags(self, sub: LocalSub, kind: str, tags: list[Any],
                    delay: float | None = None) -> int:
        """A subscriber's acks or naks (by the tags it got); how many were known."""
        by_origin: dict[tuple[str, Key, str | None], list[int]] = {}
        known = 0
        for tag in tags:
            found = self._tags.get(tag) if type(tag) is int else None
            if found is None or found[3] is not sub:
                continue
            del self._tags[tag]
            sub.unacked.discard(tag)
            origin, key, seq, log_origin = found[0], found[1], found[2], found[4]
            by_origin.setdefault((origin, key, log_origin), []).append(seq)
            known += 1
        for (origin, key, log_origin), seqs in by_origin.items():
            self._send_settle(origin, key, kind, seqs, delay, log_origin)
        return known + self.jetstream.settle_tags(sub, kind, tags, delay)

    def release(self, sub: LocalSub) -> None:
        """A durable member went away: nak what it held, so it is offered again now."""
        self.jetstream.release(sub)  # (messages of NATS topics: not counted as attempts)
        self.settle_tags(sub, "nak", list(sub.unacked), 0.0)

    def _key(self, ns: str, topic: str, name: str, log_origin: str | None) -> Key:
        """Our consumer key of a durable item: our own log's, or a copy we deliver."""
        if log_origin is None or log_origin == self.broker.node:
            return (ns, topic, name)
        return (mirror_ns(log_origin, ns), topic, name)

    def _send_settle(self, origin: str, key: Key, kind: str, seqs: list[int],
                     delay: float | None, log_origin: str | None = None) -> None:
        if origin == self.broker.node:
            self._settle(self._key(*key, log_origin), kind, seqs, delay)
            return
        item: dict[str, Any] = {"t": kind, "ns": key[0], "topic": key[1], "durable": key[2],
                                "seqs": seqs}
        if log_origin is not None:
            item["log"] = log_origin
        if delay is not None:
            item["delay"] = delay
        self.broker.outbox(origin).put_nowait(item)

    def _settle(self, key: Key, kind: str, seqs: list[int], delay: float | None,
                peer: str | None = None) -> None:
        """Acks, naks or returns of `key`'s messages (O3: from another node only for what
        was delivered to it)."""
        self.origin.settle(key, kind, seqs, delay, time.time(), peer)
        self._kick.set()

    def dropped(self, node: str, items: list[Any]) -> None:
        """Items for `node` that never left this node (links.Outbox.on_drop): a delivery
        among them was not attempted, so it is offered again after UNSENT_DELAY without
        counting the attempt, as a return (O3). Acks and naks lost so are redelivered by
        their consumers' ack timeout, as any lost in the network."""
        unsent = [item for item in items
                  if isinstance(item, dict) and item.get("t") == "deliver"]
        for item in unsent:
            key = self._key(item["ns"], item["topic"], item["durable"], item.get("log"))
            self.origin.settle(key, "return", [item["seq"]], UNSENT_DELAY, time.time(), node)
        if unsent:
            self.stats["broker_deliveries_unsent"] += len(unsent)
            self._kick.set()

    def on_gone(self, node: str) -> None:
        """A member died or left: what we delivered to it is offered again now; copies of
        its logs we hold are delivered by us if we are the first live replica."""
        self.origin.gone(node, time.time())
        for log_ns, topic in list(self.log.topics()):
            if log_of(log_ns)[0] != node or (log_ns, topic) in self._taking \
                    or not taker(self._mirror_sets.get((node, log_of(log_ns)[1], topic)),
                                 self.broker.node, self.broker._live):
                continue
            log.info("delivering the copy of %s's durable topic %s while it is down",
                     node, topic)
            self._taking.add((log_ns, topic))
            for name, state in self.log.subscribers(log_ns, topic).items():
                self.origin.remove((log_ns, topic, name))
                self._consumer((log_ns, topic, name), state)
        self._kick.set()

    def on_back(self, node: str) -> None:
        """A member (re)joined: if we delivered its copies, stop, and tell it what was
        acked meanwhile so it does not deliver that again."""
        mine = {t for t in self._taking if log_of(t[0])[0] == node}
        if not mine:
            return
        self._taking -= mine
        log.info("%s is back: it delivers its durable topics again", node)
        self._save_now()
        for key in [k for k in self.consumers if log_of(k[0])[0] == node]:
            c = self.origin.remove(key)
            assert c is not None
            log.info("handing %s's acks on %s back to %s (up to %d)", key[2], key[1],
                     node, c.floor)
            item = {"t": "absorb", "ns": log_of(key[0])[1], "topic": key[1],
                    "durable": key[2], "state": {"floor": c.floor, "acked": sorted(c.acked)}}
            self._absorbs[(node, item["ns"], key[1], key[2])] = (item, ABSORB_TRIES)
            self.broker.send_once(node, [item])

    async def _replica_item(self, peer: str, kind: str, ns: str, topic: str, name: str,
                            item: dict[str, Any]) -> None:
        """replicate / replicated / mirror-state / absorb from `peer` (mirrors.py)."""
        if kind == "replicated":
            self._waits.answered((ns, topic, item["seq"]), peer)
            return
        if kind == "absorbed":
            self._absorbs.pop((peer, ns, topic, name), None)
            return
        if kind == "absorb":  # a replica delivered our log while we were down
            state = item["state"]
            floor, acked = state.get("floor"), state.get("acked")
            if type(floor) is not int or not isinstance(acked, list) \
                    or not all(type(a) is int for a in acked[:100_000]):
                raise messages.WireError("absorb state is a floor and a list of acks")
            if (ns, topic) in self.log.topics() and name:
                c = self._consumer((ns, topic, name))
                c.absorb(floor, acked[:100_000])
                log.info("%s delivered %s for us while we were down: acks of %s up to %d "
                         "absorbed", peer, topic, name, c.floor)
                self.origin.dirty.add((ns, topic, name))
                self._kick.set()
            self.broker.send_once(peer, [{"t": "absorbed", "ns": ns, "topic": topic,
                                          "durable": name}])
            return
        definition = self.definition(ns, topic)
        if definition is None:
            return  # not (yet) a durable topic here: nothing to keep it under
        log_ns = mirror_ns(peer, ns)
        self._ensure_log(log_ns, topic, definition)
        if kind == "mirror-state":
            if name and (log_ns, topic) not in self._taking:
                self.log.save(log_ns, topic, name, item["state"])
            return
        msg = item.get("msg")
        messages.decode_message(msg, self.broker.s.max_message_bytes)
        self._mirror_sets[(peer, ns, topic)] = list(item["set"])
        batch = [(item["seq"], str(msg["id"]), float(item["published_at"]),
                  item["not_before"], msg)]
        await trio.to_thread.run_sync(self.log.put, log_ns, topic, batch)
        self.broker.outbox(peer).put_nowait({"t": "replicated", "ns": ns, "topic": topic,
                                             "seq": item["seq"]})

    # --- upkeep -----------------------------------------------------------------------------

    def _to_save(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """The states changed since the last save (and sent on to the topic's replicas)."""
        dirty, self.origin.dirty = self.origin.dirty, set()
        rows = []
        held = self.log.topics()
        for key in dirty:
            c = self.consumers.get(key)
            if c is not None and (key[0], key[1]) in held:
                state = c.state()
                rows.append((key[0], key[1], key[2], state))
                for node in self._sets.get((key[0], key[1]), ()):
                    self.broker.outbox(node).put_nowait({
                        "t": "mirror-state", "ns": key[0], "topic": key[1],
                        "durable": key[2], "state": state})
        return rows

    def _saved_now(self, rows: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        for ns, topic, name, state in rows:
            self._saved[(ns, topic, name)] = int(state["floor"])

    def _save_now(self) -> None:
        rows = self._to_save()
        if rows:
            self.log.save_many(rows)
            self._saved_now(rows)

    async def _saver(self) -> None:
        while True:
            await trio.sleep(SAVE_EVERY)
            if self.origin.dirty:
                rows = self._to_save()
                if rows:  # one transaction, off the event loop
                    await trio.to_thread.run_sync(self.log.save_many, rows)
                    self._saved_now(rows)

    async def _absorber(self) -> None:
        """Send again the absorbs not confirmed yet (the origin may still be starting)."""
        while True:
            await trio.sleep(ABSORB_EVERY)
            for key, (item, tries) in list(self._absorbs.items()):
                if tries <= 1:
                    del self._absorbs[key]
                    log.warning("%s never confirmed the acks of %s made while it was "
                                "down: it may deliver them again", key[0], key[3])
                    continue
                self._absorbs[key] = (item, tries - 1)
                if self.broker._live(key[0]):
                    self.broker.send_once(key[0], [item])

    async def _trimmer(self) -> None:
        while True:
            await trio.sleep(TRIM_EVERY)
            defined = self.definitions()
            for (log_ns, topic) in list(self.log.topics()):
                if (log_of(log_ns)[1], topic) not in defined:
                    self._drop_local(log_ns, topic)  # deleted elsewhere
                    continue
                await trio.to_thread.run_sync(self.log.trim, log_ns, topic, time.time())

    # --- views ------------------------------------------------------------------------------

    def rows(self, ns: str | None = None) -> list[dict[str, Any]]:
        """Durable topics (of `ns`) with their settings, what this node holds of each (its
        own log, and `copies` of other nodes' logs by origin), and each durable
        subscriber's counts here."""
        out = []
        held = self.log.topics()
        for (t_ns, topic), definition in sorted(self.definitions(ns).items()):
            if is_nats(definition):
                out.append(self.jetstream.row(t_ns, topic, definition))
                continue
            subs = {}
            for key, c in self.consumers.items():
                if key[:2] == (t_ns, topic):
                    subs[key[2]] = {**c.counts(), "acked_floor": c.floor,
                                    "saved_floor": self._saved.get(key, 0),
                                    "dead": self._deadc.get(key, 0),
                                    "lost": self._lost.get(key, 0)}
            out.append({"namespace": t_ns, "topic": topic, "durable": True,
                        "settings": public(definition),
                        "messages": self.log.count(t_ns, topic) if (t_ns, topic) in held
                        else 0,
                        "last_seq": self.log.last_seq(t_ns, topic) if (t_ns, topic) in held
                        else 0,
                        "copies": {log_of(log_ns)[0]: self.log.count(log_ns, topic)
                                   for (log_ns, held_topic) in held if held_topic == topic
                                   and log_of(log_ns)[0] is not None
                                   and log_of(log_ns)[1] == t_ns},
                        "subscribers": subs})
        return out
