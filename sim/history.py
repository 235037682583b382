"""The nemesis's checker over the event log: the issue's invariants from what the log alone
says, run after the run (and by `python -m meshd_sim check LOG` on a saved log).

Job: read an event log of a nemesis run line by line, rebuild from it the history of what
clients did and were told, and at every check record (a quiet period's observation of the
nodes) judge what the nodes held against that history, with the pure functions of
sim/checker.py. It shares no state with the run, only the rules (checker.StoreLedger, the
check functions): a slip in how the run gathers its check's data or keeps its ledger (what
it counts, owes, filters by life) shows as a difference between the two checkers. What
the run records is its own: an acknowledgement recorded too early, or a wrong view taken
of a node's state, would mislead both.

What it reads (the nemesis writes each `hist` record as `TIME NODE hist KIND JSON`):
- `setup` (first): the core subscribers ([pattern, queue group or null], by index) and the
  durable names with their patterns; `round`: a fault phase starts (publishes until its
  end are owed at the next check); `end` (last): the run's number of checks.
- `op` (a store operation issued through NODE: id, kind, key, and the write's timestamp and
  value, the increment, or the set tags), then `acked` or `unknown` with its id: what the
  client was told.
- `reg`: a registry write (entry key, timestamp, the owner's life, whether it removed).
- `offer` / `dead`: a durable message offered to, or dead-lettered for, a durable name.
- `probe`: a core message published with every fault healed, and who must get it.
- `exception`: an exception that escaped a core or handler (always a violation).
- `check`: the running nodes and their lives, and what each sees as alive, holds in the
  registry and reads from the workload's store keys (each distinct view once).
and the plain lines `publish ID TOPIC SEQ` (a durable publish, acknowledged as it is
logged), `receive NAME ID ATTEMPT from ORIGIN`, `publish-core ID TOPIC SEQ` and
`receive-core INDEX ID from ORIGIN`.

Rules:
- The in-run check's invariants and data, plus: the store's invariants are judged on
  every distinct view the nodes hold, not on one node's; each op's client is told its
  outcome once (`client-told-once`). Digests compare what readers see (a tombstone as
  absent, a counter by its value), as the run's do.
- Never a silent pass: a line it cannot parse, a log without the setup record first or
  without the end record last (cut off), or with fewer checks than the end record says,
  is an error naming what is wrong. Memory: the history (one entry per operation, message
  and registry key), not the log.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshd.broker.subjects import matches

from . import checker

EXCERPT_RING = 20000  # event-log lines kept for excerpts


class HistoryError(Exception):
    """The log is not a nemesis event log this checker can read."""


@dataclass
class Report:
    violations: list[dict[str, Any]] = field(default_factory=list)
    checked_ops: int = 0
    checks: int = 0
    lines: int = 0


class _History:
    """The ledger rebuilt from the log, and the checks at each check record."""

    def __init__(self) -> None:
        self.report = Report()
        self.ring: collections.deque[str] = collections.deque(maxlen=EXCERPT_RING)
        self.setup = False
        self.ended = False
        self.phase_end = 0.0
        self.handlers: dict[str, Any] = {
            "setup": self._setup, "round": self._round, "end": self._end, "op": self._op,
            "acked": self._acked, "unknown": self._unknown, "reg": self._reg,
            "offer": self._offer, "dead": self._dead, "probe": self._probe,
            "exception": self._exception, "check": self._check}
        self.core: list[tuple[str, str | None]] = []
        self.durable: dict[str, list[str]] = {}
        self.ops: dict[int, checker.StoreOp] = {}
        self.ledger = checker.StoreLedger()
        self.lww_keys = self.ledger.lww_keys
        self.counters = self.ledger.counters
        self.sets = self.ledger.sets
        self.acked = 0
        self.reg_latest: dict[str, tuple[Any, str, int, bool]] = {}
        # durable message id -> (topic, publish time), in order
        self.published: dict[str, tuple[str, float]] = {}
        self.owed_open: dict[tuple[str, str], None] = {}
        self.owed_total = 0
        self.owed_scanned = 0
        self.received: dict[tuple[str, str], int] = {}
        self.offers: dict[tuple[str, str], int] = {}
        self.dead: dict[tuple[str, str], str] = {}
        self.repeated: list[tuple[str, str]] = []
        self.repeats_seen = 0
        self.dup_reported: set[tuple[str, str]] = set()
        self.core_published: dict[str, tuple[str, str, int]] = {}  # id -> origin, topic, seq
        self.core_ledger = checker.CoreLedger()
        self.probes: list[tuple[str, list[str]]] = []
        self.now = 0.0

    # --- reading ----------------------------------------------------------------------------

    def line(self, number: int, text: str) -> None:
        fields = text.split(" ", 4)
        if len(fields) < 3:
            raise HistoryError(f"line {number}: not an event-log line: {text[:80]!r}")
        try:
            self.now = float(fields[0])
        except ValueError:
            raise HistoryError(f"line {number}: no time: {text[:80]!r}") from None
        node, what = fields[1], fields[2]
        if self.ended:
            raise HistoryError(f"line {number}: after the end record: {text[:80]!r}")
        if what != "hist":
            self.ring.append(text)  # (excerpts: as the run's, without history records)
        elif not self.setup and fields[3:4] != ["setup"]:
            raise HistoryError(f"line {number}: a history record before the setup record: "
                               "not the event log of a nemesis run")
        try:
            if what == "hist":
                handler = self.handlers.get(fields[3])
                if handler is None:
                    raise HistoryError(f"line {number}: unknown history record "
                                       f"{fields[3]!r}")
                handler(node, json.loads(fields[4]))
            elif what == "publish":
                self.published[fields[3]] = (fields[4].split(" ")[0], self.now)
            elif what == "receive":
                name, msg_id = fields[3], fields[4].split(" ")[0]
                pair = (name, msg_id)
                n = self.received[pair] = self.received.get(pair, 0) + 1
                if n > 1:
                    self.repeated.append(pair)
            elif what == "publish-core":
                topic, seq = fields[4].split(" ")
                self.core_published[fields[3]] = (node, topic, int(seq))
            elif what == "receive-core":
                msg_id, _, origin = fields[4].split(" ")
                self._core_received(node, int(fields[3]), msg_id, origin)
        except HistoryError:
            raise
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise HistoryError(f"line {number}: cannot read {what!r} "
                               f"({type(exc).__name__}: {exc}): {text[:120]!r}") from None

    # --- history records --------------------------------------------------------------------

    def _setup(self, _node: str, data: dict[str, Any]) -> None:
        if self.setup:
            raise ValueError("a second setup record")
        self.setup = True
        self.core = [(p, q) for p, q in data["core"]]
        self.durable = {name: list(p) for name, p in data["durable"].items()}

    def _round(self, _node: str, d: dict[str, Any]) -> None:
        self.phase_end = float(d["until"])

    def _end(self, _node: str, d: dict[str, Any]) -> None:
        self.ended = True
        if d["checks"] != self.report.checks:
            raise HistoryError(f"the end record counts {d['checks']} checks, the log holds "
                               f"{self.report.checks}")

    def _op(self, node: str, d: dict[str, Any]) -> None:
        kind, key = d["kind"], d["key"]
        if kind in ("write", "delete"):
            ts = tuple(d["ts"])
            value = d["value"]
            self.lww_keys.setdefault(key, checker.LwwKey()).written[ts] = \
                None if value is None else value.encode()
            op = checker.StoreOp(kind, key, node, ts=ts)  # type: ignore[arg-type]
        elif kind == "incr":
            self.counters.setdefault(key, checker.CounterKey())
            op = checker.StoreOp(kind, key, node, delta=d["delta"])
        elif kind == "add":
            (tag,) = d["tags"]
            led = self.sets.setdefault(key, checker.SetKey())
            if tag in led.adds:
                self.finding(checker.Finding("set-tag-unique", f"{key}: tag {tag} made twice",
                                             [node], [key]))
            led.adds[tag] = d["element"]
            op = checker.StoreOp(kind, key, node, tags=(tag,), element=d["element"])
        elif kind == "remove":
            tags = tuple(d["tags"])
            self.sets.setdefault(key, checker.SetKey()).removed.update(tags)
            op = checker.StoreOp(kind, key, node, tags=tags, element=d["element"])
        else:
            raise ValueError(f"unknown store op {kind!r}")
        self.ops[d["id"]] = op

    def _told(self, node: str, op_id: int, what: str) -> checker.StoreOp | None:
        op = self.ops.pop(op_id, None)
        if op is None:
            self.finding(checker.Finding("client-told-once", f"store op {op_id} {what}, but it "
                                         "was not issued or its client was told already",
                                         [node], [node]))
        return op

    def _acked(self, node: str, op_id: int) -> None:
        op = self._told(node, op_id, "acknowledged")
        if op is not None:
            self.acked += 1
            self.ledger.acked(op)

    def _unknown(self, node: str, op_id: int) -> None:
        op = self._told(node, op_id, "of unknown outcome")
        if op is not None:
            self.ledger.unknown(op)

    def _reg(self, node: str, d: dict[str, Any]) -> None:
        self.reg_latest[d["key"]] = (tuple(d["ts"]), node, d["life"], d["gone"])

    def _offer(self, _node: str, d: dict[str, Any]) -> None:
        pair = (d["name"], d["msg"])
        self.offers[pair] = self.offers.get(pair, 0) + 1

    def _dead(self, _node: str, d: dict[str, Any]) -> None:
        self.dead[(d["name"], d["msg"])] = d["why"]

    def _probe(self, _node: str, d: dict[str, Any]) -> None:
        self.probes.append((d["msg"], list(d["targets"])))

    def _exception(self, node: str, d: dict[str, Any]) -> None:
        nodes = [] if node == "-" else [node]
        self.finding(checker.Finding("no-crash-from-exception", d["detail"], nodes, nodes))

    def _core_received(self, node: str, index: int, msg_id: str, origin: str) -> None:
        if not self.setup:
            raise HistoryError("a core hand-over before any setup record: not the event log "
                               "of a nemesis run")
        _, topic, seq = self.core_published[msg_id]
        pattern, queue = self.core[index]
        if not matches(pattern, topic):
            self.finding(checker.Finding("broker-core-matching", f"{msg_id} on {topic} handed "
                                         f"to core{index}, subscribed to {pattern}", [node],
                                         [msg_id]))
        for f in self.core_ledger.handed(f"core{index}", queue, msg_id, origin, topic, seq):
            f.nodes = [node]
            self.finding(f)

    # --- a check ----------------------------------------------------------------------------

    def _check(self, _node: str, d: dict[str, Any]) -> None:
        self.report.checks += 1
        up: dict[str, int] = d["up"]
        found: list[checker.Finding] = []
        alive = {n: d["alive_views"][i] for n, i in d["alive"].items()}
        found += checker.membership(alive, list(up))
        reg_views = d["registry_views"]
        live = [sorted((k, tuple(ts)) for k, (ts, is_live) in v.items() if is_live)
                for v in reg_views]
        found += checker.digests("registry", {n: live[i] for n, i in d["registry"].items()})
        # what readers see (the run's digests): a tombstone is an absent value, a counter
        # its value; the registers and per-node counts themselves are judged below
        seen_views = [[(k, None if reg is None or reg[1] is None else reg, value, members)
                       for k, reg, value, _, members in v] for v in d["store_views"]]
        found += checker.digests("store", {n: seen_views[i] for n, i in d["store"].items()})
        held = {n: {k: tuple(ts) for k, (ts, _) in reg_views[i].items()}
                for n, i in d["registry"].items()}
        latest = {k: (ts, owner, gone) for k, (ts, owner, life, gone)
                  in self.reg_latest.items() if up.get(owner) == life}
        found += checker.registry(latest, held)
        self.report.checked_ops += len(latest)
        if up:
            seen: set[tuple[str, str]] = set()
            for i in sorted(set(d["store"].values())):
                for f in self._store_view(d["store_views"][i]):
                    if (f.invariant, f.detail) not in seen:
                        seen.add((f.invariant, f.detail))
                        found.append(f)
            self.report.checked_ops += self.acked
        found += checker.broker(self._owed_open(), self.received, self.dead)
        self.report.checked_ops += self.owed_total
        extra = {}
        for pair in dict.fromkeys(self.repeated[self.repeats_seen:]):
            if pair in self.dup_reported:
                continue
            over = self.received[pair] - self.offers.get(pair, 0)
            if over > 0:
                extra[pair] = over
                self.dup_reported.add(pair)
        self.repeats_seen = len(self.repeated)
        found += checker.queue_duplicates(extra)
        found += checker.core_delivered(self.probes, self.core_ledger)
        self.report.checked_ops += len(self.probes)
        self.probes = []
        for f in found:
            self.finding(f)

    def _store_view(self, view: list[Any]) -> list[checker.Finding]:
        by_key = {k: (reg, value, slots, members) for k, reg, value, slots, members in view}
        out: list[checker.Finding] = []
        for key, led in sorted(self.lww_keys.items()):
            reg = by_key.get(key, (None,))[0]
            out += checker.lww(key, led, None if reg is None else [
                tuple(reg[0]), None if reg[1] is None else reg[1].encode()])
        for key, cled in sorted(self.counters.items()):
            _, value, slots, _ = by_key.get(key, (None, 0, {}, []))
            out += checker.counter(key, cled, value)
            for node, nled in sorted(cled.slots.items()):
                out += checker.counter(f"{key}[{node}]", nled, slots.get(node, 0))
        for key, sled in sorted(self.sets.items()):
            members = by_key.get(key, (None, 0, {}, []))[3]
            out += checker.or_set(key, sled, members)
        return out

    def _owed_open(self) -> list[tuple[str, str]]:
        """(durable name, message id) pairs owed for the acknowledged publishes and not
        received yet (a pair received stays received)."""
        ids = list(self.published)
        for msg_id in ids[self.owed_scanned:]:
            topic, t = self.published[msg_id]
            if t >= self.phase_end:
                break
            self.owed_scanned += 1
            for name, patterns in self.durable.items():
                if any(matches(p, topic) for p in patterns):
                    self.owed_open[(name, msg_id)] = None
                    self.owed_total += 1
        for pair in [p for p in self.owed_open if p in self.received]:
            del self.owed_open[pair]
        return list(self.owed_open)

    def finding(self, f: checker.Finding) -> None:
        self.report.violations.append(checker.violation(f, self.now, self.ring))


def check(lines: Iterable[str]) -> Report:
    """Check a nemesis event log; HistoryError if it is not one."""
    h = _History()
    n = 0
    for n, text in enumerate(lines, 1):
        h.line(n, text.rstrip("\n"))
    h.report.lines = n
    if not h.setup:
        raise HistoryError("no setup record: not the event log of a nemesis run"
                           if n else "the log is empty")
    if not h.ended:
        raise HistoryError(f"no end record after line {n}: the log was cut off (or the run "
                           "did not finish)")
    return h.report
