"""The nemesis's checker: invariants over what the cluster holds and what clients were told.

Job: given the nodes' views and states at a quiet period (faults healed for long enough) and
the ledger of what the workload did and which operations were acknowledged, return the
violations. Pure functions over plain data (and the store ledger's rules): sim/nemesis.py
gathers the data and keeps a ledger as the run goes, sim/history.py rebuilds both from the
event log afterwards; tests/sim/test_checker.py plants each kind of violation.

Rules (the issue's invariants, as checked here):
- membership: every running node sees exactly the running nodes as alive.
- digests: every running node reads the same registry (live entries and their timestamps)
  and the same values of the workload's store keys. (Tombstones are collected at slightly
  different moments on each node, so the raw digests may differ for a while after a
  collection without anything being wrong for a reader.)
- registry: an instance registered (or removed) by a node that is still in the same life
  is held as its last write, with that write's timestamp, on every running node.
- LWW keys (a Jepsen-style history check): the register every node holds has a timestamp
  at or after every acknowledged write of the key (a later write or delete may supersede an
  acknowledged one; nothing may undo it), and its value is the one written with that
  timestamp (no value the workload did not write).
- counters: the value is the sum of the acknowledged increments plus the sum of some of
  the increments whose outcome the client never learned (each counts wholly or not at
  all); with none unknown it equals the acknowledged sum. The same holds for each node's
  slot alone (a PN-counter's per-node count: few unknowns each, so a swallowed increment
  shows there when the sum over all nodes could still be explained).
- OR-sets (add wins): an element added by an acknowledged add is present unless a remove
  (acknowledged or not) removed that add's tag; an element whose every tag was removed by
  acknowledged removes, and that no later add re-added, is absent; nothing is present that
  was never added.
- broker: every (durable name, message) owed for an acknowledged publish was handed to a
  member of the name at least once; no message was handed to a queue group more often than
  its origin offered it (a duplicate only after a redelivery).
- core delivery (checked as each hand-over happens, CoreLedger): no core subscriber and no
  queue group is handed a message twice (at most once; a group: one member); each
  subscriber gets one publisher's messages on a topic in publish order; and with faults
  healed, a probe published through a running node reaches every matching subscriber that
  is attached and one member of every matching group (core_delivered).
Each violation names its invariant, the nodes involved and `subjects` (node names, keys,
message ids) that select the event-log lines of its excerpt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Finding:
    invariant: str
    detail: str
    nodes: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)


EXCERPT_LINES = 30


def violation(f: Finding, now: float, ring: Iterable[str]) -> dict[str, Any]:
    """The result's record of `f`, found at `now`, with the last EXCERPT_LINES lines of
    `ring` (recent event-log lines) that name one of its subjects."""
    subjects = [s for s in f.subjects if s]
    lines = [line for line in ring if any(s in line.split() for s in subjects)] \
        if subjects else list(ring)
    # (the time as the event log writes it, rounded: the same for a checker reading it)
    return {"time": round(float(f"{now:.6f}"), 3), "invariant": f.invariant, "nodes": f.nodes,
            "detail": f.detail, "excerpt": lines[-EXCERPT_LINES:]}


def membership(views: Mapping[str, Iterable[str]], running: Iterable[str]) -> list[Finding]:
    """`views`: each running node's alive members (itself included)."""
    want = sorted(running)
    out = []
    for node, alive in sorted(views.items()):
        got = sorted(alive)
        if got != want:
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            out.append(Finding("membership-agrees",
                               f"{node} sees alive {len(got)} of {len(want)} running: "
                               f"missing {missing[:10]}, not running {extra[:10]}",
                               [node, *missing[:5], *extra[:5]], [node, *missing[:5]]))
    return out


def digests(what: str, by_node: Mapping[str, Any]) -> list[Finding]:
    """Every node's digest of `what` ("registry", "store") must be equal."""
    groups: dict[str, list[str]] = {}
    for node, d in sorted(by_node.items()):
        groups.setdefault(repr(d), []).append(node)
    if len(groups) <= 1:
        return []
    sizes = sorted((len(v), v[0]) for v in groups.values())
    odd = [n for v in groups.values() if len(v) < sizes[-1][0] for n in v]
    return [Finding(f"{what}-digests-equal",
                    f"{len(groups)} different {what} digests among {len(by_node)} nodes; "
                    f"nodes off the largest group: {odd[:10]}", odd[:10], odd[:5])]


def registry(latest: Mapping[str, tuple[Any, str, bool]],
             held: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """`latest`: entry key -> (timestamp of its last write, owner, whether it removed the
    instance) for owners still in the life that wrote it; `held`: running node -> {entry
    key: timestamp}. A removal's tombstone may have been collected (absent is fine)."""
    out = []
    for key, (ts, owner, gone) in sorted(latest.items()):
        wrong = sorted(n for n, entries in held.items()
                       if entries.get(key) != ts and not (gone and key not in entries))
        if wrong:
            out.append(Finding("registry-write-kept",
                               f"{key} (last written {ts} by {owner}) is not held as that "
                               f"write on {wrong[:10]}", [owner, *wrong[:5]], [key, owner]))
    return out


@dataclass
class LwwKey:
    """A register's ledger: the newest acknowledged write, every value written by ts."""
    acked: tuple[int, int, str] | None = None
    written: dict[tuple[int, int, str], bytes | None] = field(default_factory=dict)


def lww(key: str, ledger: LwwKey, held: list[Any] | None) -> list[Finding]:
    """`held`: the register every node holds (crdt.lww form), None if the key is absent."""
    if held is None:
        if ledger.acked is None:
            return []
        return [Finding("lww-acked-write-kept", f"{key}: acknowledged write {ledger.acked} "
                        "is gone and nothing superseded it", [ledger.acked[2]], [key])]
    ts = (held[0][0], held[0][1], held[0][2])
    if ts not in ledger.written:
        return [Finding("lww-no-invented-value", f"{key} holds {ts}, which no client wrote",
                        [ts[2]], [key])]
    if ledger.written[ts] != held[1]:
        return [Finding("lww-no-invented-value", f"{key} holds {held[1]!r} at {ts}, but "
                        f"{ledger.written[ts]!r} was written then", [ts[2]], [key])]
    if ledger.acked is not None and ts < ledger.acked:
        return [Finding("lww-acked-write-kept",
                        f"{key}: acknowledged write {ledger.acked} lost to the older {ts}",
                        [ledger.acked[2], ts[2]], [key])]
    return []


@dataclass
class CounterKey:
    acked: int = 0
    unknown: int = 0
    parts: list[int] = field(default_factory=list)  # each increment of unknown outcome
    slots: dict[str, CounterKey] = field(default_factory=dict)  # the same, per node's slot


def counter(key: str, ledger: CounterKey, value: int) -> list[Finding]:
    """Each increment whose outcome is unknown counts wholly or not at all: the value less
    the acknowledged sum must be a sum of some of them (with `parts` not given, anything
    up to `unknown`)."""
    low, high = ledger.acked, ledger.acked + ledger.unknown
    extra = value - low
    if ledger.parts:
        reach = 1  # bit s: some of the parts sum to s
        for d in ledger.parts:
            reach |= reach << d
        if extra >= 0 and (reach >> extra) & 1:
            return []
    elif low <= value <= high:
        return []
    return [Finding("counter-sum", f"{key} = {value}; acknowledged increments sum to {low}"
                    + (f" (up to {high} with those of unknown outcome, "
                       f"{len(ledger.parts)} of them: no subset of them adds {extra})"
                       if high != low else ""), [], [key])]


@dataclass
class SetKey:
    acked_adds: dict[str, str] = field(default_factory=dict)  # tag -> element
    adds: dict[str, str] = field(default_factory=dict)  # every add's tag -> element
    removed: set[str] = field(default_factory=set)  # tags any remove removed
    acked_removed: set[str] = field(default_factory=set)


@dataclass(slots=True)
class StoreOp:
    """A store operation a client issued (through `node`): a write or delete with its
    timestamp, an increment, or a set add (its tag) or remove (the tags it saw)."""
    kind: str
    key: str
    node: str
    id: int = 0
    delta: int = 0
    ts: tuple[int, int, str] | None = None
    tags: tuple[str, ...] = ()
    element: str = ""


@dataclass
class StoreLedger:
    """What the workload's clients were told, by key: the ledgers the store checks read."""
    lww_keys: dict[str, LwwKey] = field(default_factory=dict)
    counters: dict[str, CounterKey] = field(default_factory=dict)
    sets: dict[str, SetKey] = field(default_factory=dict)

    def acked(self, op: StoreOp) -> None:
        if op.kind in ("write", "delete"):
            led = self.lww_keys[op.key]
            assert op.ts is not None
            if led.acked is None or op.ts > led.acked:
                led.acked = op.ts
        elif op.kind == "incr":
            cled = self.counters[op.key]
            cled.acked += op.delta
            cled.slots.setdefault(op.node, CounterKey()).acked += op.delta
        elif op.kind == "add":
            self.sets[op.key].acked_adds[op.tags[0]] = op.element
        else:
            self.sets[op.key].acked_removed.update(op.tags)

    def unknown(self, op: StoreOp) -> None:
        if op.kind == "incr":
            cled = self.counters[op.key]
            for one in (cled, cled.slots.setdefault(op.node, CounterKey())):
                one.unknown += op.delta
                one.parts.append(op.delta)


def or_set(key: str, ledger: SetKey, members: Iterable[str]) -> list[Finding]:
    present = set(members)
    out = []
    lost = sorted({e for tag, e in ledger.acked_adds.items()
                   if tag not in ledger.removed and e not in present})
    if lost:
        out.append(Finding("set-acked-add-kept",
                           f"{key}: acknowledged adds of {lost[:10]} are gone, no remove saw "
                           "them", [], [key]))
    live = {e for tag, e in ledger.adds.items() if tag not in ledger.acked_removed}
    back = sorted(present - live)
    if back:
        invented = [e for e in back if e not in ledger.adds.values()]
        out.append(Finding("set-acked-remove-kept" if not invented else "set-no-invented-member",
                           f"{key}: {back[:10]} present, but every add of them was removed by "
                           "an acknowledged remove" if not invented else
                           f"{key}: {invented[:10]} present, never added", [], [key]))
    return out


def broker(owed: Iterable[tuple[str, str]], received: Mapping[tuple[str, str], int],
           dead: Mapping[tuple[str, str], str]) -> list[Finding]:
    """`owed`: (durable name, message id) pairs; `received`: hand-overs per pair; `dead`:
    pairs moved to the dead letter topic, with the reason."""
    out = []
    for name, msg in owed:
        if received.get((name, msg), 0) == 0:
            why = dead.get((name, msg))
            out.append(Finding("broker-durable-delivered",
                               f"{msg} acknowledged to its publisher, never delivered to "
                               f"durable subscriber {name!r}"
                               + (f" (dead-lettered: {why})" if why else ""), [], [msg]))
    return out


def queue_duplicates(extra: Mapping[tuple[str, str], int]) -> list[Finding]:
    """`extra`: (name, message) -> hand-overs beyond the offers of it (must be none)."""
    return [Finding("broker-no-duplicate-without-redelivery",
                    f"{msg} handed to queue group {name!r} {n} more times than offered",
                    [], [msg]) for (name, msg), n in sorted(extra.items()) if n > 0]


@dataclass
class CoreLedger:
    """What core subscribers were handed so far, by subscriber and by queue group."""

    got: dict[str, set[str]] = field(default_factory=dict)  # subscriber -> message ids
    groups: dict[str, set[str]] = field(default_factory=dict)  # queue group -> message ids
    last: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (sub, origin, topic)

    def handed(self, sub: str, group: str | None, msg: str, origin: str, topic: str,
               seq: int) -> list[Finding]:
        """One hand-over of `msg` (seq `seq` of `origin` on `topic`) to subscriber `sub`, a
        member of `group` (None: plain); the violations it shows."""
        mine = self.got.setdefault(sub, set())
        if group is not None and msg in self.groups.setdefault(group, set()):
            return [Finding("broker-core-at-most-once",
                            f"{msg} handed to queue group {group!r} twice (now to {sub})",
                            [], [msg])]
        if msg in mine:
            return [Finding("broker-core-at-most-once", f"{msg} handed to {sub} twice",
                            [], [msg])]
        mine.add(msg)
        if group is not None:
            self.groups[group].add(msg)
        key = (sub, origin, topic)
        before = self.last.get(key, 0)
        self.last[key] = max(before, seq)
        if seq < before:
            return [Finding("broker-core-in-order",
                            f"{msg} (seq {seq} from {origin} on {topic}) handed to {sub} after "
                            f"seq {before}", [origin], [msg])]
        return []


def core_delivered(probes: Iterable[tuple[str, Iterable[str]]], ledger: CoreLedger
                   ) -> list[Finding]:
    """`probes`: (message id, the subscribers and groups that must have it): core
    messages published with every fault healed for a while."""
    out = []
    for msg, targets in probes:
        missing = sorted(t for t in targets if msg not in ledger.got.get(t, ())
                         and msg not in ledger.groups.get(t, ()))
        if missing:
            out.append(Finding("broker-core-delivered-when-healed",
                               f"{msg}, published with every fault healed, never reached "
                               f"{', '.join(missing)}", [], [msg]))
    return out
