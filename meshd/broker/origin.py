"""The origin side of durable delivery (sans-IO): which durable subscribers a node serves
from its logs, what to deliver to whom, and what acks, naks and departures mean.

Theory of operation: a node is the origin of its own durable logs (and, while their origin
is down, of the copies it took over, see mirrors.py). For each (log namespace, topic,
durable name) it keeps one `Consumer` (consumer.py). The shell (durable.py) and the
simulator (sim/brokersim.py) both drive this class: they create the consumers it asks for
(`wanted`; creating one needs the log), call `offer` when a consumer may have work and carry
out what it returns, and report acks, naks, returns and departed members.

Rules:
- O1 Discovery: a consumer is wanted for every durable subscriber anywhere (interest in the
  queue group "durable:NAME") whose pattern matches a log this node delivers (its own, or a
  copy it took over), in that log's namespace.
- O2 Offer: while some live node holds a member of NAME, the consumer is polled and each
  offer becomes a `Deliver` to one such node (routing as a queue group: nearest, then least
  loaded, counting what this core gave each node; chosen afresh per message so a group
  shares the load) or a `Dead` (max deliver
  reached). While no node holds a member nothing is polled: no attempt is spent, and the
  consumer's deadlines are left out of `next_deadline` (its time comes with discovery), so a
  passed deadline cannot make the shell's loop spin.
- O3 Settle: acks, naks (an attempt spent) and returns (not spent: the delivery found no
  member) of a key's messages; from another node only for messages delivered to that node
  (a member acts as a node: it cannot settle what it was never given), the rest counted.
- O4 Departure: what was delivered to a member that died or left is offered again at once,
  without spending an attempt.
- O5 Every change of a consumer's state marks its key dirty; the shell saves dirty states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .consumer import DEAD, Consumer
from .interest import InterestTable
from .subjects import matches

DURABLE = "durable:"  # the queue group of durable subscriber NAME is DURABLE + NAME
MIRROR = "~"  # log namespaces of copies of other nodes' logs start with it (mirrors.py)
Key = tuple[str, str, str]  # (log namespace, topic, durable name)


def mirror_ns(origin: str, ns: str) -> str:
    """The log namespace a replica keeps `origin`'s log of namespace `ns` under (no
    namespace can contain "~")."""
    return f"{MIRROR}{origin}{MIRROR}{ns}"


def log_of(log_ns: str) -> tuple[str | None, str]:
    """(origin, namespace) of a log namespace: origin None for our own logs."""
    if not log_ns.startswith(MIRROR):
        return None, log_ns
    origin, _, ns = log_ns[1:].rpartition(MIRROR)
    return origin, ns


@dataclass(frozen=True)
class Deliver:
    node: str
    seq: int
    attempt: int


@dataclass(frozen=True)
class Dead:
    seq: int
    attempt: int
    reason: str


class Origin:
    def __init__(self, node: str, interest: InterestTable,
                 cost: Callable[[str], float | None], load: Callable[[str], float]) -> None:
        self.node = node
        self.interest = interest
        self.cost = cost
        self.load = load
        self.consumers: dict[Key, Consumer] = {}
        self.where: dict[tuple[Key, int], str] = {}  # delivered (key, seq) -> node
        self.unrouted: set[Key] = set()  # consumers whose last offer found no member
        self.dirty: set[Key] = set()
        self.given: dict[str, int] = {}  # deliveries sent per node (part of its load)
        # what `wanted` found, consumers held or not, by (interest changes, logs)
        self._wanted: tuple[Any, list[Key]] = (None, [])
        self.stats = {"broker_settles_refused": 0, "broker_redelivered": 0}

    # --- consumers (O1, O5) -------------------------------------------------------------------

    def wanted(self, delivered: Iterable[tuple[str, str]]) -> list[Key]:
        """O1: keys of consumers to create, for the logs (log namespace, topic) this node
        delivers."""
        logs = tuple(delivered)
        if not logs:
            return []
        memo = (self.interest.changes, logs)
        if self._wanted[0] != memo:  # (the deliverer asks every round: most find no change)
            out: list[Key] = []
            for rec in list(self.interest.records.values()):
                for (ns, pattern, queue) in rec.subs:
                    if not queue or not queue.startswith(DURABLE):
                        continue
                    for log_ns, topic in logs:
                        key = (log_ns, topic, queue[len(DURABLE):])
                        if log_of(log_ns)[1] == ns and matches(pattern, topic) \
                                and key not in out:
                            out.append(key)
            self._wanted = (memo, out)
        return [key for key in self._wanted[1] if key not in self.consumers]

    def add(self, key: Key, consumer: Consumer) -> None:
        self.consumers[key] = consumer
        self.dirty.add(key)

    def remove(self, key: Key) -> Consumer | None:
        c = self.consumers.pop(key, None)
        self.dirty.discard(key)
        self.unrouted.discard(key)
        for seq in [s for (k, s) in self.where if k == key]:
            del self.where[(key, seq)]
        return c

    def next_deadline(self) -> float | None:
        """The earliest deadline of a consumer that has somewhere to deliver (O2)."""
        times = [d for key, c in self.consumers.items()
                 if key not in self.unrouted and (d := c.next_deadline()) is not None]
        return min(times) if times else None

    # --- offers (O2) ---------------------------------------------------------------------------

    def _load(self, node: str) -> float:
        """The shell's load of a node plus the deliveries this core sent it."""
        return self.load(node) + self.given.get(node, 0)

    def _route(self, key: Key) -> str | None:
        log_ns, topic, name = key
        group = DURABLE + name
        delivery = self.interest.route(log_of(log_ns)[1], topic, self.cost, self._load,
                                       queues=group.__eq__, plain_too=False)
        return next(iter(delivery.copies), None)

    def offer(self, key: Key, now: float) -> list[Deliver | Dead]:
        """What to do now for `key`'s consumer. The shell sends each Deliver's message to
        its node (ours: delivered here) and publishes each Dead to TOPIC.dead; a message
        the log no longer holds is reported with `lost`."""
        c = self.consumers.get(key)
        if c is None or (key not in self.unrouted and not c.may_offer(now)):
            return []  # (nothing due: no route to look up; an unrouted one looks again)
        if self._route(key) is None:
            self.unrouted.add(key)
            return []
        self.unrouted.discard(key)
        out: list[Deliver | Dead] = []
        for o in c.poll(now):
            self.dirty.add(key)
            if o.kind == DEAD:
                self.where.pop((key, o.seq), None)
                out.append(Dead(o.seq, o.attempt, o.reason))
                continue
            node = self._route(key)  # each message afresh: the load moves
            if node is None:  # (cannot happen between two calls without I/O; be safe)
                c.nak(o.seq, now, 0.0, spent=False)
                continue
            if o.attempt > 1:
                self.stats["broker_redelivered"] += 1
            self.where[(key, o.seq)] = node
            self.given[node] = self.given.get(node, 0) + 1
            out.append(Deliver(node, o.seq, o.attempt))
        return out

    def lost(self, key: Key, seq: int) -> None:
        """The log no longer holds `seq` (retention): it counts as acked."""
        c = self.consumers.get(key)
        if c is not None:
            c.ack(seq)
            self.where.pop((key, seq), None)
            self.dirty.add(key)

    # --- settles and departures (O3, O4) --------------------------------------------------------

    def settle(self, key: Key, kind: str, seqs: list[int], delay: float | None, now: float,
               peer: str | None = None) -> list[int]:
        """O3: apply "ack", "nak" or "return" of `seqs` (from `peer`, None: this node);
        the sequence numbers applied."""
        c = self.consumers.get(key)
        if c is None:
            return []
        if peer is not None:
            allowed = [s for s in seqs if self.where.get((key, s)) == peer]
            self.stats["broker_settles_refused"] += len(seqs) - len(allowed)
            seqs = allowed
        done = []
        for seq in seqs:
            if kind == "ack":
                if c.ack(seq):
                    done.append(seq)
                self.where.pop((key, seq), None)
            elif c.nak(seq, now, delay, spent=kind == "nak"):
                done.append(seq)
                self.where.pop((key, seq), None)  # no longer out there: it comes again
        self.dirty.add(key)
        return done

    def gone(self, node: str, now: float) -> list[tuple[Key, int]]:
        """O4: a member died or left; what was delivered to it is offered again now."""
        again = []
        for (key, seq), where in list(self.where.items()):
            if where == node:
                del self.where[(key, seq)]
                c = self.consumers.get(key)
                if c is not None and c.nak(seq, now, 0.0, spent=False):
                    again.append((key, seq))
                    self.dirty.add(key)
        return again
