"""Durable pub/sub in the simulator: the broker's real InterestTable and Consumer cores on
every node, under partitions, loss, crashes and heals, checked for lost messages.

The job: the issue's test "a partition with durable publishes on both sides: every message
delivered after the heal". Clients publish durable messages through random running nodes
(both sides of a cut); durable subscribers NAME (a queue group "durable:NAME", members on
one or several nodes) must each get every acknowledged publish at least once.

Rules (the model):
- Cores: each node runs meshd.broker.interest.InterestTable (with its own HLC on the node's
  clock) and, per (namespace, topic, NAME) it has seen durable interest for, one
  meshd.broker.consumer.Consumer. Time handed to them is the node's clock (simulated time
  plus its clock offset). Membership is the engine's real membership core on each node.
- The decisions are the daemon's own: interest exchange (InterestTable.receive, R6) and the
  origin side of durable delivery (meshd.broker.origin.Origin: discovery, offers, settles,
  departures, O1-O4) run here as in the daemon. What is left of the trio shell (sending,
  the subscriber's side: handing a delivery to a member, tags, acks going back) is
  re-stated, each method naming the one it mirrors.
  Interest: our record is pushed to `fanout` random ALIVE peers on every change; a peer
  that learns something new pushes it on (never back); every `sync_interval` (x0.5..1.5) a
  random ALIVE peer gets our digest and the two exchange what differs; a member that dies or
  leaves is forgotten (and its deliveries naked with spent=False: `on_gone`); a member that
  (re)joins gets our record and digest. Durable delivery: the origin's deliverer wakes on
  every publish, ack or nak, at the consumers' next deadline and at least every
  DISCOVER_EVERY; it discovers consumers from interest, and while `route(...,
  queues="durable:NAME", plain_too=False)` names a member node it polls the consumer and
  sends each offer to one member node as a "deliver" item. The member node hands it to one
  local subscriber (round robin), which acks after `handle_ms`; the ack goes back to the
  origin. A delivery that finds no member there is returned (nak, spent=False, after
  RETURN_DELAY).
- The log: each node's durable log is an in-memory list per (namespace, topic). It keeps the
  log's contract (meshd/broker/log.py): append-only, numbered from 1 per topic per origin,
  durable once appended (it survives a crash of its node), a publish acknowledged at once
  (group commit time is not modelled), nothing trimmed (no retention). A consumer's state
  survives a crash exactly as it was (the daemon saves it within SAVE_EVERY: after a crash
  it may repeat the acks of that last moment; the model repeats none), unless the
  simulation sets `save_states` (the nemesis): then the states saved SAVE_EVERY after a
  change (durable._saver) are what a restarted origin resumes from, and a consumer never
  saved starts afresh.
- Network: every broker message is one stream message through the engine's network model
  (latency, jitter, loss as retransmission delay, partitions) in order per pair of nodes, as
  a link channel. A message is lost when the pair cannot reach each other when it is sent
  or when it arrives (a cut drops what is in flight), when its destination is down, or when
  the sender's membership holds no live member to send it to (the outbox's addr_of). Each
  item travels alone (the daemon batches what waits; batching changes no decision). A
  delivery that could not be sent at all (unreachable, or no member to send it to: the
  daemon's outbox fails to ship it) is returned to its consumer without counting the
  attempt (durable.dropped, again after UNSENT_DELAY); one lost in flight counts.
- Partitions split nodes in index order (side 0: the first nodes, and so on; the engine cuts
  at random), so a scenario places subscribers on a known side by node index.
- Subscribers are clients attached to one node from `at`; after their node restarts they
  subscribe again `resubscribe_after` seconds later (a client reconnecting). A paused node
  handles broker messages and timers only when it resumes (they are retried every
  PAUSE_STEP; messages in one queue per node, so they keep their order).
- Core delivery (service.publish, deliver_local; only when the scenario names
  `core_subscribers`): a core publish routes through the real table (route(...,
  queues=not durable)) and sends one "copy" item to each node it names (ours: delivered
  here), through the outbox like a delivery; the receiving node hands it to every local
  plain subscriber whose pattern matches and to one local member of each group the copy
  names (local_targets). At most once: nothing is retried, a copy lost is lost.
- Not modelled: delays, dead-letter
  topics' own subscribers, retention, replicas (R>1 is not built), outbox back-pressure,
  a publisher retrying a publish it got no answer for (dedup by message id), wall-clock
  save intervals, multi-hop relaying (a cut pair is unreachable).

Metrics (over the whole run, checked at the end):
- broker_publishes_acked: publishes appended to a log (acknowledged to their client);
  broker_published_in_partition: of those, per side, while a cut was in place (summed
  over cuts).
- broker_owed: (NAME, message) pairs for every acknowledged publish and every NAME with a
  pattern matching its topic; broker_delivered: those handed to a member of NAME at least
  once; broker_lost = owed - delivered; broker_unacked: owed pairs whose ack has not reached
  the origin by the end.
- broker_deliveries: every hand-over to a member; broker_duplicates: hand-overs beyond the
  first per pair; broker_redeliveries: offers of a message beyond its first.
- broker_duplicates_without_redelivery: hand-overs of a message beyond the number of times
  its origin offered it (0: every duplicate comes from a redelivery).
- broker_unjustified_offers: an offer beyond the first that came before ack_wait had passed
  since the previous one with no nak, return, departed member or restart in between (the
  consumer redelivering early); broker_offered_after_ack: offers of a message after its
  origin processed its ack. Both must be 0.
- broker_deliveries_dropped / broker_acks_dropped: deliver items and acks/naks/returns lost
  in the network; broker_dead: messages the consumers gave up on (C4).
- broker_owed_at_heal: pairs owed but not yet delivered at the (last) heal;
  broker_caught_up_after_heal_s: from the last heal until every pair owed for a publish
  made before it was delivered (None: never).
- broker_deliverer_busy_wakes: deliverer rounds after which the daemon's `_deliverer` would
  not sleep at all (a consumer's next_deadline still in the past: a redelivery due with no
  member to deliver to, as during a partition); the model sleeps until the next discovery
  instead, so it also goes on when a broken core leaves deadlines in the past.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from meshd import namespaces
from meshd.broker import messages
from meshd.broker.consumer import DEAD, DELIVER, Consumer, Offer
from meshd.broker.durable import DISCOVER_EVERY, RETURN_DELAY, SAVE_EVERY, UNSENT_DELAY
from meshd.broker.interest import InterestTable, check_queue
from meshd.broker.origin import DURABLE, Dead, Origin
from meshd.broker.subjects import check_pattern, check_topic, matches
from meshd.errors import MeshError
from meshd.hlc import HLC
from meshd.membership.messages import ALIVE, LEFT, SUSPECT
from meshd.settings import BrokerSettings

from .engine import SimNode, Simulation
from .scenario import Fault, ScenarioError, _table

PAUSE_STEP = 0.05
UNSENT = ("unreachable", "no-member")  # drops the sender's outbox sees (durable.dropped)
Key = tuple[str, str, str]  # (namespace, topic, durable name), as durable.py
MsgKey = tuple[str, str, str, str, int]  # (origin, namespace, topic, name, seq)
_DEFAULTS = BrokerSettings()


def pause_retry(now: float) -> float:
    """When what waits for a paused node looks again: the next multiple of PAUSE_STEP.
    (Messages wait in one queue per node, in the order they came: retried each on its own,
    PAUSE_STEP after its own arrival, they were handed over out of order; the nemesis saw
    a core message delivered after the next one from the same publisher.)"""
    at = (math.floor(now / PAUSE_STEP) + 1) * PAUSE_STEP
    return at if at > now else at + PAUSE_STEP


# --- the scenario's [broker] table ----------------------------------------------------------

@dataclass(slots=True)
class Subscriber:
    durable: str
    pattern: str
    node: int  # index: n0000 is 0
    at: float = 1.0


@dataclass(slots=True)
class CoreSubscriber:
    """A core (not durable) subscriber: plain, or a member of queue group `queue`."""
    pattern: str
    node: int
    queue: str | None = None
    at: float = 1.0


@dataclass(slots=True)
class BrokerWorkload:
    namespace: str = namespaces.DEFAULT
    topics: tuple[str, ...] = ("orders.created",)
    ack_wait: float = _DEFAULTS.ack_wait
    max_deliver: int = _DEFAULTS.max_deliver
    max_in_flight: int = _DEFAULTS.max_in_flight
    sync_interval: float = 5.0  # the daemon's: rpc.registry_sync_interval
    fanout: int = 3
    handle_ms: float = 2.0
    resubscribe_after: float = 1.0
    subscribers: list[Subscriber] = field(default_factory=list)
    core_subscribers: list[CoreSubscriber] = field(default_factory=list)


_KEYS = {"namespace": str, "topics": list, "ack_wait": float, "max_deliver": int,
         "max_in_flight": int, "sync_interval": float, "fanout": int, "handle_ms": float,
         "resubscribe_after": float, "subscribers": list, "core_subscribers": list}
_SUB_KEYS = {"durable": str, "pattern": str, "node": int, "at": float}
_CORE_KEYS = {"pattern": str, "node": int, "queue": str, "at": float}


def parse_broker(raw: Any) -> BrokerWorkload:
    """The [broker] table; ScenarioError naming the key that is wrong."""
    t = _table(raw, _KEYS, "broker")
    w = BrokerWorkload()
    for key in ("namespace", "ack_wait", "max_deliver", "max_in_flight", "sync_interval",
                "fanout", "handle_ms", "resubscribe_after"):
        if key in t:
            setattr(w, key, t[key])
    if w.ack_wait <= 0 or w.max_deliver < 1 or w.max_in_flight < 1 or w.sync_interval <= 0:
        raise ScenarioError("broker.ack_wait and broker.sync_interval must be above 0, "
                            "broker.max_deliver and broker.max_in_flight at least 1")
    try:
        namespaces.check(w.namespace)
        if "topics" in t:
            if not t["topics"] or not all(isinstance(x, str) for x in t["topics"]):
                raise ScenarioError("broker.topics must list one or more topics")
            w.topics = tuple(check_topic(x) for x in t["topics"])
        for i, item in enumerate(t.get("subscribers", [])):
            s = _table(item, _SUB_KEYS, f"broker.subscribers[{i}]")
            if "durable" not in s or "pattern" not in s or "node" not in s:
                raise ScenarioError(f"broker.subscribers[{i}] needs durable, pattern, node")
            check_queue(DURABLE + s["durable"])
            w.subscribers.append(Subscriber(s["durable"], check_pattern(s["pattern"]),
                                            s["node"], s.get("at", 1.0)))
        for i, item in enumerate(t.get("core_subscribers", [])):
            s = _table(item, _CORE_KEYS, f"broker.core_subscribers[{i}]")
            if "pattern" not in s or "node" not in s:
                raise ScenarioError(f"broker.core_subscribers[{i}] needs pattern and node")
            queue = check_queue(s.get("queue"))
            if queue is not None and queue.startswith(DURABLE):
                raise ScenarioError(f"broker.core_subscribers[{i}]: a queue group named "
                                    f"{DURABLE}... is a durable subscriber's")
            w.core_subscribers.append(CoreSubscriber(check_pattern(s["pattern"]), s["node"],
                                                     queue, s.get("at", 1.0)))
    except MeshError as exc:
        raise ScenarioError(f"broker: {exc.detail}") from None
    if not w.subscribers:
        raise ScenarioError("broker.subscribers must name at least one durable subscriber")
    return w


# --- one node's broker (the shell, modelled) ------------------------------------------------

@dataclass(eq=False)
class _CoreSub:
    """A local core subscriber (service.LocalSub without a durable name)."""
    cfg: CoreSubscriber


@dataclass(eq=False)
class _Sub:
    """A local durable subscriber (service.LocalSub)."""
    cfg: Subscriber
    ns: str
    group: str
    unacked: dict[int, tuple[str, str, int]] = field(default_factory=dict)


class BrokerNode:
    def __init__(self, sim: BrokerSimulation, node: SimNode,
                 log: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> None:
        self.sim = sim
        self.node = node
        self.w = sim.workload
        self.name = node.name
        self.incarnation = node.incarnation
        self.hlc = HLC(node.name, lambda: int(self.clock() * 1000), **sim.hlc_bounds())
        self.interest = InterestTable(node.name, self.hlc)
        self.rng = sim._rng(f"broker:{node.name}:{node.incarnation}")
        self.log = log if log is not None else {}  # durable: survives a crash
        # the daemon's own origin core decides discovery, offers, settles and departures
        self.origin = Origin(node.name, self.interest, self.route_cost, self.load)
        self.consumers = self.origin.consumers
        self.where = self.origin.where
        self.tags: dict[int, tuple[str, Key, int, _Sub]] = {}
        self.by_key: dict[tuple[str, str, str], list[_Sub]] = {}
        self.core_by_key: dict[tuple[str, str, str | None], list[_CoreSub]] = {}
        self.sent: dict[str, int] = {}
        self.turn = itertools.count()
        self.tag_ids = itertools.count(1)
        self.wake_at = math.inf
        self.wake_local = -math.inf  # the consumers' deadline the next wake is for
        # consumer states on disk (with sim.save_states: durable._saver), and a save due
        self.saved: dict[Key, dict[str, Any]] = {}
        self.save_due = False

    # --- plumbing ---------------------------------------------------------------------------

    def alive(self) -> bool:
        n = self.node
        return n.up and n.core is not None and n.incarnation == self.incarnation

    def clock(self) -> float:
        """The node's wall clock (durable.py times deliveries by time.time(): a clock jump
        moves its ack deadlines)."""
        return self.sim.now + self.node.offset + self.node.jump

    def later(self, delay: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run fn(arg) `delay` from now if this node life is still running; while the node
        is paused, retry every PAUSE_STEP."""
        def run(a: Any) -> None:
            if not self.alive():
                return
            if self.node.paused:
                self.sim.call_at(pause_retry(self.sim.now), run, a)
                return
            fn(a)
        self.sim.call_at(self.sim.now + delay, run, arg)

    def start(self) -> None:
        """service.run: publish our (empty) record, then the sync loop; the deliverer."""
        self.push({self.name: self.interest.record()})
        self.later(self.w.sync_interval * self.rng.uniform(0.5, 1.5), self.sync)
        self.schedule_deliverer()

    # --- members (service.py) ---------------------------------------------------------------

    def live(self, name: str) -> bool:
        m = self.node.core.members.get(name)  # type: ignore[union-attr]
        return m is not None and m.state in (ALIVE, SUSPECT)

    def route_cost(self, name: str) -> float | None:
        """service.route_cost: None unless live; the round trip in whole milliseconds."""
        other = self.sim.by_name.get(name)
        if other is None or not self.live(name):
            return None
        return float(round(2 * self.sim.net.mean_latency(self.node.idx, other.idx) * 1000))

    def load(self, name: str) -> float:
        return float(self.sent.get(name, 0))

    def peers(self) -> list[str]:
        return self.node.core.alive_peers()  # type: ignore[union-attr]

    def on_member(self, ev: Any) -> None:
        """service.on_member."""
        if ev.node == self.name:
            return
        if ev.kind in ("dead", "left", "reap"):
            self.interest.forget(ev.node)
            self.on_gone(ev.node)
        elif ev.kind == "join":
            self.sim.send(self, ev.addr, {"t": "interest", "records": {
                self.name: self.interest.record()}, "digest": self.interest.digest()})

    # --- interest replication (service.py) --------------------------------------------------

    def push(self, records: dict[str, Any], exclude: str | None = None) -> None:
        """service._push."""
        peers = [p for p in self.peers() if p != exclude]
        payload = {"t": "interest", "records": records}
        for addr in self.rng.sample(peers, min(self.w.fanout, len(peers))):
            self.sim.send(self, addr, payload)

    def sync(self, _arg: Any = None) -> None:
        """service._sync_loop, one round."""
        peers = self.peers()
        if peers:
            self.sim.send(self, self.rng.choice(peers), {
                "t": "interest", "records": {}, "digest": self.interest.digest()})
        self.later(self.w.sync_interval * self.rng.uniform(0.5, 1.5), self.sync)

    def receive_interest(self, sender: str, msg: dict[str, Any]) -> None:
        """service._receive_interest: the real table decides (interest.py R6)."""
        out = self.interest.receive(msg)
        if out.push_ours:
            self.push({self.name: self.interest.record()})
        if out.forward:
            self.push(out.forward, exclude=sender)
        answer = out.answer()
        if answer is not None:
            self.sim.send(self, sender, answer)

    # --- local subscribers and publishing ---------------------------------------------------

    def subscribe(self, cfg: Subscriber) -> None:
        """service.add_sub for a durable subscriber."""
        group = DURABLE + cfg.durable
        record = self.interest.subscribe(self.w.namespace, cfg.pattern, group)
        sub = _Sub(cfg, self.w.namespace, group)
        self.by_key.setdefault((sub.ns, cfg.pattern, group), []).append(sub)
        self.push({self.name: record})

    def subscribe_core(self, cfg: CoreSubscriber) -> None:
        """service.add_sub for a core subscriber."""
        record = self.interest.subscribe(self.w.namespace, cfg.pattern, cfg.queue)
        key = (self.w.namespace, cfg.pattern, cfg.queue)
        self.core_by_key.setdefault(key, []).append(_CoreSub(cfg))
        self.push({self.name: record})

    def publish_core(self, ns: str, msg: messages.Message) -> None:
        """service.publish: one copy per interested node, durable groups left out."""
        delivery = self.interest.route(ns, msg.topic, self.route_cost, self.load,
                                       queues=lambda q: not q.startswith(DURABLE))
        wired = msg.to_wire()
        for node, c in delivery.copies.items():
            if not c.plain and not c.groups:
                continue
            if node == self.name:
                self.deliver_core(self.name, ns, wired, bool(c.plain), list(c.groups))
                continue
            self.sent[node] = self.sent.get(node, 0) + 1
            self.send_item(node, {"t": "copy", "ns": ns, "msg": wired, "plain": bool(c.plain),
                                  "groups": list(c.groups)})

    def deliver_core(self, origin: str, ns: str, wired: dict[str, Any], plain: bool,
                     groups: list[str]) -> None:
        """service.deliver_local: every matching plain subscriber here, one member of
        each group the copy names (local_targets, T1-T2)."""
        targets = self.interest.local_targets(ns, wired["topic"], groups)
        if plain:
            for pattern in targets.plain:
                for sub in list(self.core_by_key.get((ns, pattern, None), ())):
                    self.sim.core_received(self, sub, origin, wired)
        for group, patterns in targets.groups.items():
            sub = self.one_of(ns, group, patterns, self.core_by_key)
            if sub is not None:
                self.sim.core_received(self, sub, origin, wired)

    def publish(self, ns: str, msg: messages.Message) -> int:
        """durable.publish: append to our log (acknowledged then), tell our consumers."""
        entries = self.log.setdefault((ns, msg.topic), [])
        entries.append(msg.to_wire())
        seq = len(entries)
        for key, c in self.consumers.items():
            if key[:2] == (ns, msg.topic):
                c.append(seq, None)
        self.kick()
        return seq

    # --- the origin's side (durable.py) -----------------------------------------------------

    def consumer(self, key: Key, state: dict[str, Any] | None = None) -> Consumer:
        """durable._consumer (nothing is trimmed: a new consumer starts at seq 1)."""
        c = self.consumers.get(key)
        if c is not None:
            return c
        settings = {"ack_wait": self.w.ack_wait, "max_deliver": self.w.max_deliver,
                    "max_in_flight": self.w.max_in_flight}
        c = Consumer.restore(state, self.clock(), **settings) if state else Consumer(**settings)
        last = len(self.log.get((key[0], key[1]), []))
        for seq in range(c.last + 1, last + 1):
            c.append(seq, None)
        c.caught_up(last)
        self.origin.add(key, c)
        return c

    def discover(self) -> None:
        """durable._discover: the consumers the origin core wants (O1)."""
        for key in self.origin.wanted(list(self.log)):
            self.consumer(key)

    def kick(self) -> None:
        self.wake(self.sim.now)

    def wake(self, at: float, local: float = -math.inf) -> None:
        """Run the deliverer at simulated time `at` (for the deadline `local` on our clock,
        if it wakes for one) unless it runs sooner."""
        if at < self.wake_at:
            self.wake_at = at
            self.wake_local = local
            self.later(at - self.sim.now, self.deliverer, at)

    def deliverer(self, at: float) -> None:
        """durable._deliverer, one round."""
        if at != self.wake_at:
            return  # superseded by an earlier wake
        self.wake_at = math.inf
        # the deadline it woke for, on our clock: (d - offset) + offset need not equal d in
        # floats, and a round that finds nothing due would wake again at the same time
        now = max(self.clock(), self.wake_local)
        self.wake_local = -math.inf
        self.discover()
        for key in list(self.consumers):
            self.offer(key, now)
        self.want_save()
        self.schedule_deliverer()

    def want_save(self) -> None:
        """durable._saver: dirty states go to disk SAVE_EVERY later (all dirty ones then)."""
        if self.sim.save_states and self.origin.dirty and not self.save_due:
            self.save_due = True
            self.later(SAVE_EVERY, self.save)

    def save(self, _arg: Any = None) -> None:
        self.save_due = False
        dirty, self.origin.dirty = self.origin.dirty, set()
        for key in sorted(dirty):  # (a set of str: its order would follow the hash seed)
            c = self.consumers.get(key)
            if c is not None:
                self.saved[key] = c.state()

    def schedule_deliverer(self) -> None:
        """The deliverer's next wake: the consumers' next deadline, at most DISCOVER_EVERY
        away. A deadline that has passed after a round (a redelivery due with no member to
        deliver to; a delayed message due with max_in_flight full) would make the daemon's
        loop go round again without sleeping: counted as a busy wake (see Metrics), and
        left out here, or virtual time would stand still."""
        now = self.clock()
        deadline = now + DISCOVER_EVERY
        busy = False
        d = self.origin.next_deadline()  # (consumers with nobody to serve left out: O2)
        if d is not None:
            if d <= now:
                busy = True
            else:
                deadline = min(deadline, d)
        self.sim.stats["broker_deliverer_busy_wakes"] += busy
        self.wake(max(self.sim.now, deadline - self.node.offset - self.node.jump), deadline)

    def offer(self, key: Key, now: float) -> None:
        """durable._offer: carry out what the origin core decides (O2)."""
        ns, topic, name = key
        entries = self.log[(ns, topic)]
        for action in self.origin.offer(key, now):
            if isinstance(action, Dead):
                self.sim.offered(self, key, Offer(DEAD, action.seq, action.attempt))
                continue  # published to TOPIC.dead: its subscribers are not modelled
            self.sim.offered(self, key, Offer(DELIVER, action.seq, action.attempt))
            item = {"t": "deliver", "ns": ns, "topic": topic, "durable": name,
                    "seq": action.seq, "attempt": action.attempt,
                    "msg": entries[action.seq - 1]}
            if action.node == self.name:
                self.deliver_here(self.name, item)
            else:
                self.sent[action.node] = self.sent.get(action.node, 0) + 1
                self.send_item(action.node, item)

    def settle(self, key: Key, kind: str, seqs: list[int], delay: float | None,
               peer: str | None = None) -> None:
        """durable._settle: the origin core applies it (O3)."""
        if key not in self.consumers:
            return
        if kind == "return":
            self.sim.stats["broker_returns"] += len(seqs)
        for seq in self.origin.settle(key, kind, seqs, delay, self.clock(), peer):
            if kind == "ack":
                self.sim.acked(self, key, seq)
            else:
                self.sim.justify((self.name, *key, seq))
        self.want_save()
        self.kick()

    def on_gone(self, node: str) -> None:
        """durable.on_gone: the origin core offers again what the member had (O4)."""
        for key, seq in self.origin.gone(node, self.clock()):
            self.sim.justify((self.name, *key, seq))
        self.want_save()
        self.kick()

    # --- the subscriber's side (durable.py) -------------------------------------------------

    def receive_item(self, peer: str, item: dict[str, Any]) -> None:
        """durable.receive."""
        kind = item["t"]
        if kind == "deliver":
            messages.decode_message(item["msg"], _DEFAULTS.max_message_bytes)
            self.deliver_here(peer, item)
        elif kind == "copy":
            messages.decode_message(item["msg"], _DEFAULTS.max_message_bytes)
            self.deliver_core(peer, item["ns"], item["msg"], item["plain"], item["groups"])
        else:
            self.settle((item["ns"], item["topic"], item["durable"]), kind, item["seqs"],
                        item.get("delay"), peer)

    def deliver_here(self, origin: str, item: dict[str, Any]) -> None:
        """durable._deliver_here; the subscriber acks after handle_ms (x0.5..1.5)."""
        ns, topic, name = item["ns"], item["topic"], item["durable"]
        group = DURABLE + name
        targets = self.interest.local_targets(ns, topic, [group])
        sub = self.one_of(ns, group, targets.groups.get(group, ()))
        if sub is None:
            self.send_settle(origin, (ns, topic, name), "return", [item["seq"]], RETURN_DELAY)
            return
        tag = next(self.tag_ids)
        sub.unacked[tag] = (origin, topic, item["seq"])
        self.tags[tag] = (origin, (ns, topic, name), item["seq"], sub)
        self.sim.received(self, origin, item)
        handle = self.w.handle_ms / 1000 * self.rng.uniform(0.5, 1.5)
        self.later(handle, lambda t: self.settle_tags(sub, "ack", [t]), tag)

    def one_of(self, ns: str, group: str, patterns: tuple[str, ...],
               subs: Mapping[tuple[str, str, Any], list[Any]] | None = None) -> Any:
        """service._one_of: round robin over the group's members here (in `subs`: the
        durable subscribers unless given)."""
        subs = self.by_key if subs is None else subs
        members = [s for p in patterns for s in subs.get((ns, p, group), ())]
        if not members:
            return None
        return members[next(self.turn) % len(members)]

    def settle_tags(self, sub: _Sub, kind: str, tags: list[int]) -> None:
        """durable.settle_tags."""
        by_origin: dict[tuple[str, Key], list[int]] = {}
        for tag in tags:
            found = self.tags.get(tag)
            if found is None or found[3] is not sub:
                continue
            del self.tags[tag]
            sub.unacked.pop(tag, None)
            by_origin.setdefault((found[0], found[1]), []).append(found[2])
        for (origin, key), seqs in by_origin.items():
            self.send_settle(origin, key, kind, seqs, None)

    def send_settle(self, origin: str, key: Key, kind: str, seqs: list[int],
                    delay: float | None) -> None:
        """durable._send_settle."""
        if origin == self.name:
            self.settle(key, kind, seqs, delay)
            return
        item: dict[str, Any] = {"t": kind, "ns": key[0], "topic": key[1], "durable": key[2],
                                "seqs": seqs}
        if delay is not None:
            item["delay"] = delay
        self.send_item(origin, item)

    def send_item(self, node: str, item: dict[str, Any]) -> None:
        """Through the node's outbox (links.Outbox, service.addr_of): to any member that has
        not left (deliveries only go where routing found a live member; settles also go to
        an origin our membership still thinks dead, as after a partition)."""
        m = self.node.core.members.get(node)  # type: ignore[union-attr]
        if m is None or m.state == LEFT:
            self.sim.dropped(self, node, {"t": "batch", "items": [item]}, "no-member")
            return
        self.sim.send(self, m.addr, {"t": "batch", "items": [item]})


# --- the simulation -------------------------------------------------------------------------

class BrokerSimulation(Simulation):
    """The engine with a BrokerNode beside every membership core (see the module rules)."""

    def __init__(self, scenario: Any, **kwargs: Any) -> None:
        if scenario.broker is None:
            raise ScenarioError("a broker simulation needs a [broker] table in the scenario")
        super().__init__(scenario, **kwargs)
        self.workload: BrokerWorkload = scenario.broker
        self.save_states = False  # consumer states lost since their last save at a crash
        self.bnodes: dict[str, BrokerNode] = {}
        # node -> its clients' subscriptions
        self.attached: dict[str, list[Subscriber | CoreSubscriber]] = {}
        self._fifo: dict[tuple[int, int], float] = {}
        # node -> what arrived while it was paused, with the node life it came for
        self._held: dict[str, list[tuple[Any, BrokerNode]]] = {}
        self._ids = itertools.count(1)
        self.names: dict[str, list[str]] = {}  # durable name -> its patterns
        for s in self.workload.subscribers:
            self.names.setdefault(s.durable, []).append(s.pattern)
        # the ledger
        # message id -> (origin, namespace, topic, seq, published at)
        self.published: dict[str, tuple[str, str, str, int, float]] = {}
        self.id_at: dict[tuple[str, str, str, int], str] = {}  # (origin, ns, topic, seq) -> id
        self.repeated: list[tuple[str, str]] = []  # (name, id) of each hand-over past the first
        self.partition_publishes: list[int] = []
        self.received_n: dict[tuple[str, str], int] = {}  # (name, id) -> hand-overs
        self.received_by: dict[tuple[str, str], int] = {}  # (name, node) -> hand-overs
        self.first_at: dict[tuple[str, str], float] = {}
        self.offers: dict[MsgKey, int] = {}
        self.last_offer: dict[MsgKey, float] = {}
        self.justified: dict[MsgKey, bool] = {}
        self.acked_keys: dict[MsgKey, None] = {}
        self.heal_at: float | None = None
        self.owed_at_heal = 0
        # core delivery's ledger: id -> (origin, topic, seq per origin and topic, published)
        self.core_published: dict[str, tuple[str, str, int, float]] = {}
        self.core_seq: dict[tuple[str, str], int] = {}
        self.core_got: dict[int, list[str]] = {}  # core subscriber (index) -> ids, in order
        self._core_ids = itertools.count(1)
        self._core_index = {id(c): i for i, c in enumerate(self.workload.core_subscribers)}
        self.stats = {"broker_redeliveries": 0, "broker_unjustified_offers": 0,
                      "broker_offered_after_ack": 0, "broker_deliveries_dropped": 0,
                      "broker_acks_dropped": 0, "broker_dead": 0, "broker_returns": 0,
                      "broker_deliverer_busy_wakes": 0, "broker_interest_dropped": 0,
                      "broker_msgs": 0, "broker_bytes": 0, "broker_copies_dropped": 0}

    # --- engine hooks -----------------------------------------------------------------------

    def _start_core(self, node: SimNode) -> Any:
        core = super()._start_core(node)
        old = self.bnodes.get(node.name)
        b = BrokerNode(self, node, old.log if old is not None else None)
        self.bnodes[node.name] = b
        if old is not None:  # a restart: the log and the consumers' saved state survive
            b.saved = old.saved
            states = old.saved if self.save_states else \
                {key: c.state() for key, c in old.consumers.items()}
            for key, state in states.items():
                restored = b.consumer(key, state)
                for seq in restored.pending:
                    self.justify((node.name, *key, seq))
            for cfg in self.attached.get(node.name, []):
                self.call_at(self.now + self.workload.resubscribe_after, self._subscribe, cfg)
        b.start()
        return core

    def _apply(self, node: SimNode, out: Any) -> None:
        super()._apply(node, out)
        b = self.bnodes.get(node.name)
        if b is not None and b.alive():
            for ev in out.events:
                b.on_member(ev)

    def _cut(self, f: Fault) -> None:
        super()._cut(f)
        groups = self.net.group_of
        assert groups is not None
        groups[:] = sorted(groups)  # the same sides, in node order (the module rules)
        sides = max(groups) + 1
        self.partition_publishes += [0] * (sides - len(self.partition_publishes))

    def _heal(self, index: int) -> None:
        super()._heal(index)
        self.heal_at = self.now
        self.owed_at_heal = sum(1 for pair in self._owed() if pair not in self.received_n)

    def _schedule_faults(self) -> None:
        super()._schedule_faults()
        for cfg in self.workload.subscribers:
            if cfg.node >= self.n_initial:
                raise ScenarioError(f"broker subscriber {cfg.durable!r} is on node {cfg.node}"
                                    f" but the scenario has {self.n_initial} nodes")
            self.call_at(cfg.at, self._subscribe, cfg)
        for core_cfg in self.workload.core_subscribers:
            if core_cfg.node >= self.n_initial:
                raise ScenarioError(f"broker core subscriber {core_cfg.pattern!r} is on node "
                                    f"{core_cfg.node} but the scenario has {self.n_initial} "
                                    "nodes")
            self.call_at(core_cfg.at, self._subscribe, core_cfg)

    def _fault_broker_publish(self, f: Fault) -> None:
        interval = 1.0 / max(f.rate, 1e-9)
        for i in range(int(f.duration * f.rate)):
            self.call_at(f.at + i * interval, self._publish_one, f)

    # --- the clients ------------------------------------------------------------------------

    def _subscribe(self, cfg: Subscriber | CoreSubscriber) -> None:
        node = self.nodes[cfg.node]
        b = self.bnodes.get(node.name)
        if b is None or not b.alive() or node.paused:  # its daemon is not there: retry
            self.call_at(self.now + self.workload.resubscribe_after, self._subscribe, cfg)
            return
        attached = self.attached.setdefault(node.name, [])
        if not any(c is cfg for c in attached):
            attached.append(cfg)
        if isinstance(cfg, CoreSubscriber):
            b.subscribe_core(cfg)
            self.log(f"{self.now:.6f} {node.name} subscribe-core {cfg.queue or '-'} "
                     f"{cfg.pattern}")
            return
        b.subscribe(cfg)
        self.log(f"{self.now:.6f} {node.name} subscribe {cfg.durable} {cfg.pattern}")

    def _publish_one(self, f: Fault) -> None:
        pool = [n for n in self.nodes if n.up and not n.paused
                and n.name in self.bnodes and self.bnodes[n.name].alive()]
        if not pool:
            return
        node = pool[self.fault_rng.randrange(len(pool))]
        topics = self.workload.topics
        topic = topics[self.fault_rng.randrange(len(topics))]
        n = next(self._ids)
        b = self.bnodes[node.name]
        # ids are counted, not messages.new_id (random bytes): the run replays from its seed
        msg = messages.Message(f"m{n:07d}", topic, {"n": n}, b.clock(), "client:sim")
        ns = self.workload.namespace
        seq = b.publish(ns, msg)
        self.published[msg.id] = (node.name, ns, topic, seq, self.now)
        self.id_at[(node.name, ns, topic, seq)] = msg.id
        if self.net.group_of is not None:
            self.partition_publishes[self.net.group_of[node.idx]] += 1
        self.log(f"{self.now:.6f} {node.name} publish {msg.id} {topic} {seq}")

    def publish_core(self, node: SimNode, topic: str) -> str:
        """A client's core publish through `node` (running); the message id."""
        b = self.bnodes[node.name]
        n = next(self._core_ids)
        key = (node.name, topic)
        seq = self.core_seq[key] = self.core_seq.get(key, 0) + 1
        msg = messages.Message(f"c{n:07d}", topic, {"n": n}, b.clock(), "client:sim")
        self.core_published[msg.id] = (node.name, topic, seq, self.now)
        self.log(f"{self.now:.6f} {node.name} publish-core {msg.id} {topic} {seq}")
        b.publish_core(self.workload.namespace, msg)
        return msg.id

    def core_received(self, b: BrokerNode, sub: _CoreSub, origin: str,
                      wired: dict[str, Any]) -> None:
        i = self._core_index[id(sub.cfg)]
        self.core_got.setdefault(i, []).append(wired["id"])
        self.log(f"{self.now:.6f} {b.name} receive-core {i} {wired['id']} from {origin}")

    # --- the network ------------------------------------------------------------------------

    def send(self, src: BrokerNode, addr: str, payload: dict[str, Any]) -> None:
        data = cbor2.dumps(payload)
        self.metrics.sent(self.now, len(data))
        self.stats["broker_msgs"] += 1
        self.stats["broker_bytes"] += len(data)
        dst = self.by_addr.get(addr)
        if dst is None:
            return
        when = self.net.delivery_time(src.node.idx, dst.idx, len(data), self.now, True,
                                      connect=False)
        if when is None:
            self.dropped(src, dst.name, payload, "unreachable")
            return
        pair = (src.node.idx, dst.idx)
        when = max(when, self._fifo.get(pair, 0.0))  # one stream per pair: in order
        self._fifo[pair] = when
        self.call_at(when, self._arrive, (src, dst, data))

    def _arrive(self, arg: tuple[BrokerNode, SimNode, bytes]) -> None:
        src, dst, data = arg
        payload = cbor2.loads(data)
        b = self.bnodes.get(dst.name)
        if b is None or not b.alive():
            self.dropped(src, dst.name, payload, "down")
            return
        if not self.net.reachable(src.node.idx, dst.idx):
            self.dropped(src, dst.name, payload, "cut-in-flight")
            return
        held = self._held.get(dst.name)
        if dst.paused or held is not None:  # behind what came before it (see pause_retry)
            if held is None:
                held = self._held[dst.name] = []
                self.call_at(pause_retry(self.now), self._drain, dst)
            held.append((arg, b))
            return
        if payload["t"] == "interest":
            b.receive_interest(src.node.addr, payload)
        else:
            for item in payload["items"]:
                b.receive_item(src.name, item)

    def _drain(self, dst: SimNode) -> None:
        """What arrived for `dst` while it was paused, in the order it came, once it runs."""
        if dst.paused:
            self.call_at(pause_retry(self.now), self._drain, dst)
            return
        for arg, b in self._held.pop(dst.name, []):
            if self.bnodes.get(dst.name) is b and b.alive():
                self._arrive(arg)
            else:  # the life it came for ended (kill -9 while paused): lost with it
                src, _, data = arg
                self.dropped(src, dst.name, cbor2.loads(data), "down")

    def dropped(self, src: BrokerNode, dst: str, payload: dict[str, Any], why: str) -> None:
        if payload["t"] == "interest":
            self.stats["broker_interest_dropped"] += 1
            return
        for item in payload["items"]:
            kind = item["t"]
            if kind == "copy":  # at most once: gone
                self.stats["broker_copies_dropped"] += 1
                self.log(f"{self.now:.6f} {src.name} drop copy {item['msg']['id']} {dst} {why}")
                continue
            self.stats["broker_deliveries_dropped" if kind == "deliver"
                       else "broker_acks_dropped"] += 1
            self.log(f"{self.now:.6f} {src.name} drop {kind} {item['durable']} "
                     f"{item.get('seq', item.get('seqs'))} {dst} {why}")
            if kind == "deliver" and why in UNSENT:
                key = (item["ns"], item["topic"], item["durable"])
                src.later(0.0, lambda a, src=src: src.settle(*a),
                          (key, "return", [item["seq"]], UNSENT_DELAY, dst))

    # --- the ledger -------------------------------------------------------------------------

    def offered(self, b: BrokerNode, key: Key, o: Offer) -> None:
        k: MsgKey = (b.name, *key, o.seq)
        now = b.clock()
        if o.kind == DEAD:
            self.stats["broker_dead"] += 1
            self.acked_keys[k] = None
            return
        if k in self.acked_keys:
            self.stats["broker_offered_after_ack"] += 1
        n = self.offers.get(k, 0)
        if n:
            self.stats["broker_redeliveries"] += 1
            if not self.justified.get(k) and now - self.last_offer[k] < self.workload.ack_wait \
                    - 1e-6:
                self.stats["broker_unjustified_offers"] += 1
        self.offers[k] = n + 1
        self.last_offer[k] = now
        self.justified[k] = False

    def justify(self, k: MsgKey) -> None:
        """A nak, a return, a departed member or a restart: an offer may come early."""
        self.justified[k] = True

    def acked(self, b: BrokerNode, key: Key, seq: int) -> None:
        self.acked_keys[(b.name, *key, seq)] = None

    def received(self, b: BrokerNode, origin: str, item: dict[str, Any]) -> None:
        name, msg_id = item["durable"], item["msg"]["id"]
        pair = (name, msg_id)
        n = self.received_n[pair] = self.received_n.get(pair, 0) + 1
        if n > 1:
            self.repeated.append(pair)
        self.received_by[(name, b.name)] = self.received_by.get((name, b.name), 0) + 1
        self.first_at.setdefault(pair, self.now)
        self.log(f"{self.now:.6f} {b.name} receive {name} {msg_id} {item['attempt']} "
                 f"from {origin}")

    def _owed(self, before: float = math.inf) -> list[tuple[str, str]]:
        """(name, message id) for every acknowledged publish (made before `before`) and
        every durable name with a pattern matching its topic."""
        return [(name, msg_id) for msg_id, (_, _, topic, _, t) in self.published.items()
                if t < before
                for name, patterns in self.names.items()
                if any(matches(p, topic) for p in patterns)]

    def run(self) -> dict[str, Any]:
        result = super().run()
        result["metrics"].update(self.broker_result())
        return result

    def broker_result(self) -> dict[str, Any]:
        owed = self._owed()
        delivered = sum(1 for pair in owed if pair in self.received_n)
        unacked = 0
        without = 0
        for msg_id, (origin, ns, topic, seq, _) in self.published.items():
            for name, patterns in self.names.items():
                if not any(matches(p, topic) for p in patterns):
                    continue
                k = (origin, ns, topic, name, seq)
                if k not in self.acked_keys:
                    unacked += 1
                without += max(0, self.received_n.get((name, msg_id), 0) - self.offers.get(k, 0))
        caught_up = None
        if self.heal_at is not None:
            before = self._owed(self.heal_at)
            if all(pair in self.first_at for pair in before):
                last = max((self.first_at[p] for p in before), default=self.heal_at)
                caught_up = round(max(0.0, last - self.heal_at), 3)
        deliveries = sum(self.received_n.values())
        out = {
            "broker_publishes_acked": len(self.published),
            "broker_published_in_partition": list(self.partition_publishes),
            "broker_owed": len(owed),
            "broker_delivered": delivered,
            "broker_lost": len(owed) - delivered,
            "broker_unacked": unacked,
            "broker_deliveries": deliveries,
            "broker_duplicates": deliveries - len(self.received_n),
            "broker_duplicates_without_redelivery": without,
            "broker_owed_at_heal": self.owed_at_heal,
            "broker_caught_up_after_heal_s": caught_up,
            "broker_core_published": len(self.core_published),
            "broker_core_handed": sum(len(ids) for ids in self.core_got.values()),
        }
        out.update(self.stats)
        return out
