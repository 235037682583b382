"""Broker interest (sans-IO): which nodes want which topics, and who gets each message.

Theory of operation
-------------------
Every node keeps one :class:`InterestTable`. It holds, per node, per namespace, the
subscription patterns that node has local subscribers for, each with its queue group (None:
plain) and its subscriber count. A node writes only its own part; the other nodes' parts
arrive as records through replication (the registry's way: rumor pushes plus digest
anti-entropy). Publishing asks :meth:`InterestTable.route` which nodes get one copy of a
message; receiving a copy asks :meth:`InterestTable.local_targets` which local subscriptions
it goes to. The table does no I/O and reads no clock but the injected HLC's.

Rules, in the order the code applies them:

Local interest
  L1. ``subscribe(ns, pattern, queue)`` counts one more local subscriber of (ns, pattern,
      queue); several subscribers of the same triple are one interest entry with a count.
      ``unsubscribe`` counts one less; the entry goes at zero. Namespace, pattern (NATS
      wildcards, see subjects.py) and queue group name (``QUEUE``) are checked: a 400 says
      what is wrong.
  L2. Every change stamps our record with a new HLC timestamp and returns the record to
      publish: one record per node holding its whole interest set, so the newest record of a
      node is all there is to know about it and a shell may coalesce bursts of changes by
      publishing only the latest ``record()``.
  L3. A node with no interest left publishes a record with no entries: the tombstone. A
      fresh table starts with one, stamped at construction: the shell publishes it at start,
      so whatever an earlier life of this node published is replaced (its timestamp is
      newer).
  L4. Caps: at most ``max_patterns`` entries (default 10,000) and ``max_record_bytes``
      (default 1 MiB, estimated as the encoded size) per record; a subscribe past them is a
      400 and changes nothing, and a peer's record past them is refused (W1).

Replication (last writer wins per node)
  R1. ``merge(node, record)`` decodes strictly (W1) and applies the record iff its
      timestamp is newer than the one we hold for `node`: merging is commutative,
      associative and idempotent, and every table that has seen the same records holds the
      same interest (one timestamp is one write: HLC timestamps of a writer never repeat).
  R2. A record stamped more than the HLC's drift bound ahead of our physical clock is
      refused (FUTURE) and counted (``interest_future_refused``), as the registry does.
  R3. A record of our own node that is newer than ours was written by an earlier life of
      this node (a restart with a clock set back): it is not applied; our version jumps past
      it and the caller publishes ``record()`` again (OURS).
  R4. ``forget(node)`` drops a dead or left node's record. Nothing marks it forgotten: a
      node declared dead by mistake comes back through anti-entropy. Routing skips nodes
      with no route (cost None), so a stale record of an unreachable node gets nothing.
  R5. ``digest()`` is ``{node: [wall, counter]}`` of the versions held; ``differing`` and
      ``records_of`` give what anti-entropy exchanges, as the registry's per-owner digest.
  R6. ``receive(msg)`` is one step of the exchange (the shell and the simulator both use
      it): records are merged (R1-R3); what was new is forwarded (rumor); a digest is
      answered with the records the sender lacks or holds older, plus ``want`` for those
      it holds newer; a ``want`` is answered with those records.

Routing one published message (``route``)
  D1. Namespaces isolate: only interest in the message's namespace is looked at.
  D2. Every node with a plain (non-queue) pattern matching the topic gets the message.
  D3. For each queue group of the namespace with a member pattern matching the topic,
      exactly one node holding that group is chosen: lowest cost first (``cost(node)``,
      None = no route: skipped), then least ``load(node)``, then the smallest name, so every
      publisher with the same view decides the same. Costs compare exactly: a caller that
      wants "about as near" nodes balanced by load rounds its costs. Our own node is always
      at cost 0.
  D4. A node gets ONE copy however many of its patterns and groups match; the copy lists
      its matching plain patterns and, per group it was chosen for, the group's matching
      patterns there. Nodes with plain interest but no route are listed as ``unreachable``
      and groups with no reachable member as ``unserved``, for the shell to count as drops.
  D5. ``route`` may be narrowed: ``queues`` picks the queue groups considered (core
      delivery leaves out durable subscribers' groups, which their log serves) and
      ``plain_too=False`` leaves out plain subscribers (a durable delivery goes to one
      member of one durable group).

Receiving a copy (``local_targets``)
  T1. Every local plain subscription whose pattern matches gets the message (if the
      publisher's view was behind, our plain subscribers are still interested).
  T2. For each group the copy names, the local subscriptions of that group whose patterns
      match are returned; the shell hands the message to one subscriber among them. A
      group named but with no member left here is simply absent (the message is dropped:
      core delivery is at-most-once).

Wire (W1)
  A record is a plain map, CBOR-ready (meshd/wire.py bounds the bytes upstream)::

      {"v": 1, "ts": [wall_ms, counter, node], "subs": [[ns, pattern, queue|None, count], ...]}

  Decoding is strict: exactly these keys, exact types (no bools for ints), ``ts[2]`` is the
  node the record is merged for, names and patterns pass the same checks as local ones,
  counts are 1..MAX_COUNT, no entry twice, caps as L4. Anything else raises
  :class:`WireError` (a meshd.wire.WireError) saying what, and changes nothing.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from meshd import namespaces, wire
from meshd.errors import MeshError, bad_request
from meshd.hlc import HLC, Timestamp

from .subjects import Index, check_pattern, check_topic

VERSION = 1
MAX_PATTERNS = 10_000
MAX_RECORD_BYTES = 1 << 20
MAX_COUNT = 1 << 31
MAX_DIGEST_NODES = 100_000
MATCH_CACHE = 4096  # (namespace, topic) pairs whose matching interest is remembered
QUEUE = r"[A-Za-z0-9_-][A-Za-z0-9_.:-]{0,127}"
_QUEUE = re.compile(QUEUE)
_ENTRY_OVERHEAD = 16  # CBOR array and integer heads of one entry, rounded up
_RECORD_OVERHEAD = 64  # the map, its keys and the timestamp

Key = tuple[str, str, str | None]  # (namespace, pattern, queue group or None)
V = TypeVar("V")


class WireError(wire.WireError):
    """A peer's interest record or digest that does not decode; str() says why."""


class Merged(enum.Enum):
    """What ``merge`` did with a record (R1-R3)."""
    NEW = "new"        # applied: push it on to other peers
    OLD = "old"        # we held it or a newer one: nothing to do
    FUTURE = "future"  # refused: stamped beyond the clock drift bound
    OURS = "ours"      # our own, from an earlier life: not applied; publish record() again


@dataclass(slots=True)
class Exchange:
    """What to send after receiving an interest message (R6): `forward` the records that
    were new to us to `fanout` other peers (not back to the sender); `push_ours` our own
    record again (an earlier life of ours wrote a newer one); `reply` to the sender the
    records it lacks or asked for, with `want` the nodes whose records it holds newer."""
    forward: dict[str, Any] = field(default_factory=dict)
    push_ours: bool = False
    reply: dict[str, Any] = field(default_factory=dict)
    want: list[str] = field(default_factory=list)

    def answer(self) -> dict[str, Any] | None:
        """The message for the sender, if there is anything to say."""
        if not self.reply and not self.want:
            return None
        return InterestTable.message(self.reply, want=self.want or None)


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of a message for `node`: its matching plain patterns, and for each queue
    group it delivers to one member of, that group's matching patterns there."""
    node: str
    plain: tuple[str, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    copies: Mapping[str, Copy]          # node -> its one copy, in node order
    unreachable: tuple[str, ...] = ()   # nodes with matching plain interest but no route
    unserved: tuple[str, ...] = ()      # queue groups with no reachable matching member

    @property
    def nodes(self) -> list[str]:
        return list(self.copies)

    @property
    def reusable(self) -> bool:
        """Whether the same delivery serves the next message on the topic (a publisher's
        batch): only when no queue group is in it, since a group's member is chosen anew
        for every message (load decides)."""
        return not self.unserved and not any(c.groups for c in self.copies.values())


@dataclass(frozen=True, slots=True)
class Targets:
    """The local subscriptions a received copy goes to: every plain one listed, and one
    subscriber among each group's listed patterns."""
    plain: tuple[str, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Record:
    ts: Timestamp
    subs: Mapping[Key, int]  # empty: the tombstone

    def to_wire(self) -> dict[str, Any]:
        rows = sorted(self.subs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))
        return {"v": VERSION, "ts": list(self.ts),
                "subs": [[ns, p, q, n] for (ns, p, q), n in rows]}


def check_queue(queue: Any) -> str | None:
    """A queue group name (None or "" = plain subscription); a 400 if it is not one."""
    if queue is None or queue == "":
        return None
    if not isinstance(queue, str) or not _QUEUE.fullmatch(queue):
        shown = repr(queue) if len(repr(queue)) <= 80 else repr(queue)[:77] + "..."
        raise bad_request(f"invalid queue group {shown}: 1 to 128 letters, digits or "
                          f"'_-.:' (allowed: {QUEUE})", id="meshd.broker")
    return queue


def _entry_bytes(key: Key) -> int:
    ns, pattern, queue = key
    return len(ns) + len(pattern.encode()) + len(queue or "") + _ENTRY_OVERHEAD


class _Spaces(Generic[V]):
    """One subjects.Index per namespace, so that namespaces never see each other (D1).
    Matches are cached per (namespace, topic) until the next change (a publisher publishes
    on few topics, many times)."""

    def __init__(self) -> None:
        self._by_ns: dict[str, Index[V]] = {}
        self._sizes: dict[str, int] = {}
        self._changes = 0
        self._cache: dict[tuple[str, str], tuple[int, frozenset[V]]] = {}

    def add(self, ns: str, pattern: str, value: V) -> None:
        self._by_ns.setdefault(ns, Index()).add(pattern, value)
        self._sizes[ns] = self._sizes.get(ns, 0) + 1
        self._changes += 1

    def remove(self, ns: str, pattern: str, value: V) -> None:
        index = self._by_ns.get(ns)
        if index is not None and index.remove(pattern, value):
            self._changes += 1
            self._sizes[ns] -= 1
            if not self._sizes[ns]:
                del self._by_ns[ns], self._sizes[ns]

    def match(self, ns: str, topic: str) -> frozenset[V]:
        found = self._cache.get((ns, topic))
        if found is not None and found[0] == self._changes:
            return found[1]
        if len(self._cache) >= MATCH_CACHE:
            self._cache.clear()
        index = self._by_ns.get(ns)
        matched = index.match(topic) if index is not None else frozenset()
        self._cache[(ns, topic)] = (self._changes, matched)
        return matched


class InterestTable:
    def __init__(self, node: str, hlc: HLC, max_patterns: int = MAX_PATTERNS,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.node = node
        self.hlc = hlc
        self.max_patterns = max_patterns
        self.max_record_bytes = max_record_bytes
        self.records: dict[str, Record] = {}
        self.changes = 0  # bumped whenever `records` changes: views on it are cached by it
        self._digest: tuple[int, dict[str, list[int]]] = (-1, {})
        self._local: dict[Key, int] = {}
        self._local_bytes = _RECORD_OVERHEAD
        self._routes: _Spaces[tuple[str, str | None, str]] = _Spaces()  # (node, queue, pattern)
        self._mine: _Spaces[tuple[str | None, str]] = _Spaces()  # (queue, pattern), L-side
        self.stats = {"interest_future_refused": 0, "interest_refused": 0}
        self._set(node, Record(hlc.now(), {}))  # L3: the tombstone we start with

    # -- local side (L1-L4) --------------------------------------------------------------

    def subscribe(self, ns: str, pattern: str, queue: str | None = None) -> dict[str, Any]:
        """One more local subscriber of (ns, pattern, queue); returns the record to publish."""
        key = self._key(ns, pattern, queue)
        if key not in self._local:
            if len(self._local) >= self.max_patterns:
                raise bad_request(f"this node already has {len(self._local)} subscription "
                                  f"patterns, the limit (broker max_patterns)",
                                  id="meshd.broker")
            size = _entry_bytes(key)
            if self._local_bytes + size > self.max_record_bytes:
                raise bad_request(f"this node's subscriptions would exceed "
                                  f"{self.max_record_bytes} bytes of interest, the limit",
                                  id="meshd.broker")
            self._local_bytes += size
            self._mine.add(key[0], key[1], (key[2], key[1]))
        self._local[key] = self._local.get(key, 0) + 1
        return self._publish()

    def unsubscribe(self, ns: str, pattern: str, queue: str | None = None
                    ) -> dict[str, Any] | None:
        """One local subscriber less; the record to publish, None if there was none."""
        key = self._key(ns, pattern, queue)
        count = self._local.get(key)
        if count is None:
            return None
        if count > 1:
            self._local[key] = count - 1
        else:
            del self._local[key]
            self._local_bytes -= _entry_bytes(key)
            self._mine.remove(key[0], key[1], (key[2], key[1]))
        return self._publish()

    def record(self) -> dict[str, Any]:
        """Our current record, as published (wire form)."""
        return self.records[self.node].to_wire()

    @property
    def version(self) -> Timestamp:
        return self.records[self.node].ts

    def version_of(self, node: str) -> Timestamp | None:
        rec = self.records.get(node)
        return None if rec is None else rec.ts

    def _key(self, ns: str, pattern: str, queue: str | None) -> Key:
        return (namespaces.check(ns), check_pattern(pattern), check_queue(queue))

    def _publish(self) -> dict[str, Any]:
        self._set(self.node, Record(self.hlc.now(), dict(self._local)))
        return self.record()

    # -- replication (R1-R5) -------------------------------------------------------------

    def merge(self, node: str, record: Any) -> Merged:
        """Merge `node`'s record from a peer (wire form); WireError if it does not decode."""
        try:
            rec = decode_record(node, record, self.max_patterns, self.max_record_bytes)
        except WireError:
            self.stats["interest_refused"] += 1
            raise
        held = self.records.get(node)
        if held is not None and held.ts >= rec.ts:
            return Merged.OLD
        if not self.hlc.observe(rec.ts):
            self.stats["interest_future_refused"] += 1
            return Merged.FUTURE
        if node == self.node:
            self._set(self.node, Record(self.hlc.now(), dict(self._local)))
            return Merged.OURS
        self._set(node, rec)
        return Merged.NEW

    def forget(self, node: str) -> bool:
        """Drop a dead or left node's record (never our own); True if there was one."""
        if node == self.node or node not in self.records:
            return False
        self._set(node, None)
        return True

    def digest(self) -> dict[str, list[int]]:
        """Our digest (R5); the same object until the records change: read it, send it,
        never change it (every sync sends it: most find nothing changed)."""
        if self._digest[0] != self.changes:
            self._digest = (self.changes, {n: [r.ts[0], r.ts[1]] for n, r in self.records.items()})
        return self._digest[1]

    def differing(self, remote: Any) -> list[str]:
        """Nodes whose versions differ between us and a peer's digest (strictly decoded)."""
        theirs = decode_digest(remote)
        ours = self.digest()
        return sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))

    def records_of(self, nodes: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {n: self.records[n].to_wire() for n in nodes if n in self.records}

    def receive(self, msg: Any) -> Exchange:
        """R6: one interest message from a peer, `{"t": "interest", "records": {node:
        record}, "digest"?: {...}, "want"?: [node]}`: merges the records and says what to
        send (WireError, changing nothing more, if the message is malformed)."""
        if not isinstance(msg, dict):
            raise WireError("an interest message is a map")
        records = msg.get("records", {})
        if not isinstance(records, dict) or len(records) > MAX_DIGEST_NODES:
            raise WireError("interest records must be a map of node to record")
        out = Exchange()
        for node, record in records.items():
            if not isinstance(node, str):
                raise WireError("interest records are keyed by node name")
            merged = self.merge(node, record)
            if merged is Merged.NEW:
                out.forward[node] = record
            elif merged is Merged.OURS:
                out.push_ours = True
        if "digest" in msg:
            theirs = decode_digest(msg["digest"])
            mine = self.digest()
            differing = self.differing(theirs)
            give = [n for n in differing if n in mine and (n not in theirs
                                                           or list(theirs[n]) < mine[n])]
            out.reply = self.records_of(give)
            out.want = [n for n in differing if n not in give]
        want = msg.get("want")
        if want is not None:
            if not isinstance(want, list) or len(want) > MAX_DIGEST_NODES \
                    or not all(isinstance(n, str) for n in want):
                raise WireError("want is a list of node names")
            out.reply.update(self.records_of(want))
        return out

    @staticmethod
    def message(records: dict[str, Any], digest: dict[str, list[int]] | None = None,
                want: list[str] | None = None) -> dict[str, Any]:
        """An interest message (what `receive` reads)."""
        msg: dict[str, Any] = {"t": "interest", "records": records}
        if digest is not None:
            msg["digest"] = digest
        if want:
            msg["want"] = want
        return msg

    def _set(self, node: str, rec: Record | None) -> None:
        self.changes += 1
        old = self.records.pop(node, None)
        old_subs = old.subs if old is not None else {}
        new_subs = rec.subs if rec is not None else {}
        for key in old_subs.keys() - new_subs.keys():
            self._routes.remove(key[0], key[1], (node, key[2], key[1]))
        for key in new_subs.keys() - old_subs.keys():
            self._routes.add(key[0], key[1], (node, key[2], key[1]))
        if rec is not None:
            self.records[node] = rec

    # -- routing (D1-D4) and receiving (T1-T2) -------------------------------------------

    def route(self, ns: str, topic: str, cost: Callable[[str], float | None],
              load: Callable[[str], float], queues: Callable[[str], bool] | None = None,
              plain_too: bool = True) -> Delivery:
        """Which nodes get one copy of a message published on `topic` in `ns` (only the
        queue groups `queues` accepts, when given; no plain subscribers unless
        `plain_too`)."""
        ns, topic = namespaces.check(ns), check_topic(topic)
        plain: dict[str, list[str]] = {}
        groups: dict[str, dict[str, list[str]]] = {}
        for node, queue, pattern in self._routes.match(ns, topic):
            if queue is None:
                if plain_too:
                    plain.setdefault(node, []).append(pattern)
            elif queues is not None and not queues(queue):
                continue
            else:
                groups.setdefault(queue, {}).setdefault(node, []).append(pattern)
        costs: dict[str, float | None] = {}

        def cost_of(node: str) -> float | None:
            if node not in costs:
                costs[node] = 0.0 if node == self.node else cost(node)
            return costs[node]

        chosen: dict[str, dict[str, tuple[str, ...]]] = {}
        unserved = []
        for group in sorted(groups):
            members = groups[group]
            reachable = [(c, n) for n in members if (c := cost_of(n)) is not None]
            if not reachable:
                unserved.append(group)
                continue
            nearest = min(c for c, _ in reachable)
            best = min((load(n), n) for c, n in reachable if c == nearest)[1]
            chosen.setdefault(best, {})[group] = tuple(sorted(members[best]))
        unreachable = sorted(n for n in plain if cost_of(n) is None)
        nodes = sorted((set(plain) - set(unreachable)) | set(chosen))
        copies = {n: Copy(n, tuple(sorted(plain.get(n, ()))), chosen.get(n, {}))
                  for n in nodes}
        return Delivery(copies, tuple(unreachable), tuple(unserved))

    def local_targets(self, ns: str, topic: str, groups: Iterable[str] = ()) -> Targets:
        """The local subscriptions a received copy for `groups` goes to (T1, T2)."""
        ns, topic = namespaces.check(ns), check_topic(topic)
        wanted = set(groups)
        plain: list[str] = []
        members: dict[str, list[str]] = {}
        for queue, pattern in self._mine.match(ns, topic):
            if queue is None:
                plain.append(pattern)
            elif queue in wanted:
                members.setdefault(queue, []).append(pattern)
        return Targets(tuple(sorted(plain)),
                       {g: tuple(sorted(members[g])) for g in sorted(members)})

    def rows(self, ns: str | None = None) -> list[dict[str, Any]]:
        """Interest as rows (node, namespace, pattern, queue, subscribers) for listings;
        `ns` None: every namespace."""
        return [{"node": node, "namespace": k[0], "pattern": k[1], "queue": k[2],
                 "subscribers": count}
                for node in sorted(self.records)
                for k, count in sorted(self.records[node].subs.items(),
                                       key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))
                if ns is None or k[0] == ns]


# -- strict decoding (W1) ----------------------------------------------------------------

def decode_record(node: str, raw: Any, max_patterns: int = MAX_PATTERNS,
                  max_record_bytes: int = MAX_RECORD_BYTES) -> Record:
    """`node`'s record from its wire form; WireError saying why if it is not one."""
    if type(raw) is not dict or set(raw) != {"v", "ts", "subs"}:
        raise WireError("interest record must be a map of exactly v, ts, subs")
    if type(raw["v"]) is not int or raw["v"] != VERSION:
        raise WireError(f"interest record version {raw['v']!r} is not {VERSION}")
    ts = raw["ts"]
    if type(ts) is not list or len(ts) != 3 or type(ts[0]) is not int \
            or type(ts[1]) is not int or type(ts[2]) is not str \
            or not 0 <= ts[0] < 1 << 63 or not 0 <= ts[1] < 1 << 63:
        raise WireError("interest record timestamp must be [wall_ms, counter, node]")
    if ts[2] != node:
        raise WireError(f"interest record of {node!r} written by {ts[2]!r}: refused")
    subs = raw["subs"]
    if type(subs) is not list:
        raise WireError("interest record subs must be a list")
    if len(subs) > max_patterns:
        raise WireError(f"interest record holds {len(subs)} patterns, more than the "
                        f"{max_patterns} allowed")
    out: dict[Key, int] = {}
    size = _RECORD_OVERHEAD
    for i, entry in enumerate(subs):
        if type(entry) is not list or len(entry) != 4:
            raise WireError(f"interest entry {i} must be [namespace, pattern, queue, count]")
        ns, pattern, queue, count = entry
        if type(ns) is not str or type(pattern) is not str \
                or (queue is not None and type(queue) is not str):
            raise WireError(f"interest entry {i} has a field of the wrong type")
        try:
            key = (namespaces.check(ns), check_pattern(pattern), check_queue(queue))
        except MeshError as exc:
            raise WireError(f"interest entry {i}: {exc.detail}") from None
        if key != (ns, pattern, queue):  # only canonical forms ("" is no queue name)
            raise WireError(f"interest entry {i} is not in canonical form")
        if type(count) is not int or not 1 <= count <= MAX_COUNT:
            raise WireError(f"interest entry {i} count must be 1 to {MAX_COUNT}")
        if key in out:
            raise WireError(f"interest entry {i} repeats {key!r}")
        size += _entry_bytes(key)
        if size > max_record_bytes:
            raise WireError(f"interest record exceeds {max_record_bytes} bytes")
        out[key] = count
    return Record((ts[0], ts[1], ts[2]), out)


def decode_digest(raw: Any) -> dict[str, list[int]]:
    if type(raw) is not dict or len(raw) > MAX_DIGEST_NODES:
        raise WireError("interest digest must be a map of node to [wall, counter]")
    for node, version in raw.items():
        if type(node) is not str or type(version) is not list or len(version) != 2 \
                or type(version[0]) is not int or type(version[1]) is not int:
            raise WireError("interest digest must be a map of node to [wall, counter]")
    return raw
