"""Member table: what one node knows of every member, in a few bytes per member.

Theory of operation
-------------------
A node's view of a member is split in two. What every node agrees on once gossip settles
(name, address, incarnation, state, tags, identity key and signature) is an immutable
:class:`MemberState` record, the same class push-pull carries. What is this node's own (when
it saw the state change, the RTT of its probes) lives beside it in arrays indexed by the
member's small integer id. Names get their ids from a :class:`Names` table, which the
simulator shares between all its cores: 10,000 nodes that agree about 10,000 members then
hold 10,000 records between them, not 10^8, and each node's view costs a pointer and a
float per member.

Rules:
- Records are never changed after they are made: a change is a new record. ``Names.record``
  hands back the last record made for that member when it has the same fields, so cores
  that apply the same change share one record.
- Ids only grow within a Names table. A table that owns its Names (a daemon's) renumbers
  when reaped names outnumber known ones, so a node that sees churn for months does not keep
  every name it ever heard.
- Anti-entropy digests: each record hashes (blake2b, 64 bits) its name, incarnation, state
  and address; the table keeps the XOR of its records' hashes in DIGEST_BUCKETS buckets
  (a name's bucket is fixed by the name), updated on every change. Two tables whose bucket
  values agree hold the same members at the same incarnations and states (up to a 2^-64
  chance per bucket); where they differ, only those buckets' members need to travel.
- Nothing here draws random numbers or iterates over sets, so the simulator stays
  deterministic.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from hashlib import blake2b

from .messages import ALIVE, DIGEST_BUCKETS, STATE_NAMES, SUSPECT, MemberState

NO_POS = -1


def bucket_of(name: str) -> int:
    """The digest bucket of a member name (the same on every node)."""
    return blake2b(name.encode(), digest_size=2).digest()[0]


def record_hash(rec: MemberState) -> int:
    """The record's share of its bucket's digest, cached on the record."""
    h = rec.h
    if h < 0:
        h = int.from_bytes(blake2b(
            f"{rec.node}\x00{rec.incarnation}\x00{rec.state}\x00{rec.addr}".encode(),
            digest_size=8).digest(), "big") >> 1
        rec.h = h
    return h


def pack_digest(digest: Sequence[int]) -> bytes:
    """Bucket digests as sent: 4 bytes each (the low 32 bits), in bucket order."""
    return b"".join((h & 0xFFFFFFFF).to_bytes(4, "big") for h in digest)


def differing_buckets(digest: Sequence[int], theirs: bytes) -> frozenset[int]:
    """Buckets whose digest differs from a peer's packed one."""
    mine = pack_digest(digest)
    return frozenset(b for b in range(DIGEST_BUCKETS)
                     if mine[4 * b:4 * b + 4] != theirs[4 * b:4 * b + 4])


def want_bitmap(buckets: frozenset[int]) -> bytes:
    """A set of buckets as a bitmap (DIGEST_BUCKETS bits); empty when the set is."""
    if not buckets:
        return b""
    bits = bytearray(DIGEST_BUCKETS // 8)
    for b in buckets:
        bits[b >> 3] |= 1 << (b & 7)
    return bytes(bits)


def wanted_buckets(bitmap: bytes) -> frozenset[int]:
    return frozenset(b for b in range(8 * len(bitmap)) if bitmap[b >> 3] >> (b & 7) & 1)


class RestorePlan:
    """What restoring one list of states takes, worked out once for the list: its ids, the
    shared records, and (when the ids are one ascending run lo..hi-1, as in the simulator)
    what lets a fresh table take all of them in a few array copies instead of a loop."""

    __slots__ = ("hi", "ids", "live", "lo", "pos", "pos_after", "probe", "recs", "xor")

    def __init__(self, names: Names, states: list[MemberState]) -> None:
        self.ids = array("i", [names.intern(st.node) for st in states])
        self.recs = [names.adopt(i, st) for i, st in zip(self.ids, states, strict=True)]
        ids = self.ids
        self.lo = ids[0] if ids else 0
        self.hi = self.lo + len(ids)
        if ids and ids != array("i", range(self.lo, self.hi)):
            self.lo = self.hi = -1  # not one ascending run: restored member by member
            return
        self.xor = array("Q", bytes(8 * DIGEST_BUCKETS))
        buckets = names.buckets
        for i, rec in zip(ids, self.recs, strict=True):
            self.xor[buckets[i]] ^= record_hash(rec)
        # live members in id order, and each id's position among them (before and after
        # one member, the restoring node itself, is taken out)
        self.live = array("i", [i for i, r in zip(ids, self.recs, strict=True)
                                if r.state == ALIVE or r.state == SUSPECT])
        self.pos = array("i", [NO_POS]) * len(ids)
        self.pos_after = array("i", [NO_POS]) * len(ids)
        for k, i in enumerate(self.live):
            self.pos[i - self.lo] = k
            self.pos_after[i - self.lo] = k - 1
        self.probe = array("i", ids)

    @property
    def one_run(self) -> bool:
        return self.lo >= 0


class Names:
    """Member names interned as small ints, with the last record made for each."""

    __slots__ = ("_plan", "buckets", "ids", "last", "names")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.buckets = array("B")
        self.last: list[MemberState | None] = []
        self._plan: tuple[list[MemberState] | None, RestorePlan | None] = (None, None)

    def __len__(self) -> int:
        return len(self.names)

    def intern(self, name: str) -> int:
        i = self.ids.get(name)
        if i is None:
            i = len(self.names)
            self.ids[name] = i
            self.names.append(name)
            self.buckets.append(bucket_of(name))
            self.last.append(None)
        return i

    def restore_plan(self, states: list[MemberState]) -> RestorePlan:
        """The plan for restoring these states; the last one is kept for the same list (the
        simulator restores thousands of cores from one list, which must not change)."""
        memo, plan = self._plan
        if memo is not states or plan is None:
            plan = RestorePlan(self, states)
            self._plan = (states, plan)
        return plan

    def _last_if(self, i: int, addr: str, incarnation: int, state: int,
                 tags: dict[str, str], key: bytes, sig: bytes) -> MemberState | None:
        """The last record made for member i if it has these fields."""
        last = self.last[i]
        if last is not None and last.incarnation == incarnation and last.state == state \
                and last.addr == addr and last.key == key and last.sig == sig \
                and (last.tags is tags or last.tags == tags):
            return last
        return None

    def record(self, i: int, addr: str, incarnation: int, state: int, tags: dict[str, str],
               key: bytes, sig: bytes) -> MemberState:
        """A record with these fields: the last one made for member i if it matches."""
        rec = self._last_if(i, addr, incarnation, state, tags, key, sig)
        if rec is None:
            rec = self.last[i] = MemberState(self.names[i], addr, incarnation, state, tags,
                                             key, sig)
        return rec

    def adopt(self, i: int, rec: MemberState) -> MemberState:
        """Share `rec` (a record another core made, or a decoded state) as the last one."""
        last = self._last_if(i, rec.addr, rec.incarnation, rec.state, rec.tags, rec.key,
                             rec.sig)
        if last is None:
            last = self.last[i] = rec
        return last


class _Probed:
    """What this node measured of one member (most members never have one in a run)."""

    __slots__ = ("heard_at", "rtt", "rtt_at")

    def __init__(self) -> None:
        self.rtt: float | None = None
        self.rtt_at: float | None = None
        self.heard_at: float | None = None


class Member:
    """One member as this node sees it, read from the table when asked for (a snapshot:
    ask again for newer values)."""

    __slots__ = ("addr", "heard_at", "incarnation", "key", "name", "rtt", "rtt_at", "sig",
                 "state", "state_change", "tags")

    def __init__(self, name: str, addr: str, incarnation: int, state: int,
                 tags: dict[str, str], state_change: float, key: bytes = b"",
                 sig: bytes = b"", rtt: float | None = None, rtt_at: float | None = None,
                 heard_at: float | None = None) -> None:
        self.name = name
        self.addr = addr
        self.incarnation = incarnation
        self.state = state
        self.tags = tags
        self.state_change = state_change
        self.key = key  # identity key this member proved (S5)
        self.sig = sig  # its signature of its alive at this incarnation
        self.rtt = rtt  # smoothed RTT of direct probes (UDP ping -> ack)
        self.rtt_at = rtt_at  # when the last direct ack came (our clock)
        # when it last relayed an ack back to us (a routed probe through it)
        self.heard_at = heard_at

    @classmethod
    def of(cls, rec: MemberState, since: float, probed: _Probed | None) -> Member:
        if probed is None:
            return cls(rec.node, rec.addr, rec.incarnation, rec.state, rec.tags, since,
                       rec.key, rec.sig)
        return cls(rec.node, rec.addr, rec.incarnation, rec.state, rec.tags, since, rec.key,
                   rec.sig, probed.rtt, probed.rtt_at, probed.heard_at)

    def __repr__(self) -> str:
        return (f"Member({self.name!r}, {self.addr!r}, incarnation={self.incarnation}, "
                f"state={self.status})")

    @property
    def status(self) -> str:
        return STATE_NAMES[self.state]

    def to_state(self) -> MemberState:
        return MemberState(self.name, self.addr, self.incarnation, self.state, self.tags,
                           self.key, self.sig)


class MemberTable:
    """name -> Member (a read-only Mapping of snapshots), backed by records and per-id
    arrays."""

    __slots__ = ("_count", "_owned", "digest", "names", "probe_version", "probed", "recs",
                 "since")

    def __init__(self, names: Names | None = None) -> None:
        self._owned = names is None
        self.names = Names() if names is None else names
        self.recs: list[MemberState | None] = []
        self.since = array("d")
        self.probed: dict[int, _Probed] = {}
        self.digest = array("Q", bytes(8 * DIGEST_BUCKETS))
        self._count = 0
        self.probe_version = 0  # bumped whenever probe data may change (probe_data)

    # --- the Mapping a consumer sees ------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, name: object) -> bool:
        i = self.names.ids.get(name)  # type: ignore[call-overload]
        return i is not None and i < len(self.recs) and self.recs[i] is not None

    def __iter__(self) -> Iterator[str]:
        names = self.names.names
        return (names[i] for i, r in enumerate(self.recs) if r is not None)

    def member(self, i: int) -> Member:
        return Member.of(self.recs[i], self.since[i], self.probed.get(i))  # type: ignore[arg-type]

    def get(self, name: str, default: Member | None = None) -> Member | None:
        i = self.id_of(name)
        return default if i is None else self.member(i)

    def __getitem__(self, name: str) -> Member:
        i = self.id_of(name)
        if i is None:
            raise KeyError(name)
        return self.member(i)

    def values(self) -> list[Member]:
        since, probed = self.since, self.probed
        return [Member.of(r, since[i], probed.get(i)) for i, r in enumerate(self.recs)
                if r is not None]

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, Member]]:
        return [(m.name, m) for m in self.values()]

    # --- what the core uses ---------------------------------------------------------------

    def id_of(self, name: str) -> int | None:
        """The id of a known member (None if it is not in the table)."""
        i = self.names.ids.get(name)
        if i is None or i >= len(self.recs) or self.recs[i] is None:
            return None
        return i

    def rec(self, name: str) -> MemberState | None:
        i = self.names.ids.get(name)
        if i is None or i >= len(self.recs):
            return None
        return self.recs[i]

    def records(self) -> list[MemberState]:
        return [r for r in self.recs if r is not None]

    def _grow(self, i: int) -> None:
        short = i + 1 - len(self.recs)
        if short > 0:
            self.recs.extend([None] * short)
            self.since.extend([0.0] * short)

    def put(self, i: int, rec: MemberState, since: float | None) -> None:
        """Set member i's record (a new member, or a change); `since` = when its state
        changed, None to keep the last one."""
        self._grow(i)
        old = self.recs[i]
        bucket = self.names.buckets[i]
        if old is None:
            self._count += 1
        else:
            self.digest[bucket] ^= record_hash(old)
        self.digest[bucket] ^= record_hash(rec)
        self.recs[i] = rec
        if since is not None:
            self.since[i] = since

    def remove(self, i: int) -> MemberState | None:
        old = self.recs[i]
        if old is not None:
            self.digest[self.names.buckets[i]] ^= record_hash(old)
            self.recs[i] = None
            self._count -= 1
            self.probed.pop(i, None)
        return old

    def holds_only(self, i: int) -> bool:
        """Whether the table holds no member but (at most) member i."""
        mine = 1 if i < len(self.recs) and self.recs[i] is not None else 0
        return self._count == mine

    def load(self, plan: RestorePlan, since: float, skip: int) -> None:
        """`put` of many new members at once (a restore), except id `skip` and members the
        table holds already. A table holding nothing but `skip` takes a one-run plan in
        array copies; otherwise put's steps are inlined: the simulator restores 10^8 here."""
        ids = plan.ids
        if not ids:
            return
        self._grow(max(ids))
        recs, buckets, digest = self.recs, self.names.buckets, self.digest
        if plan.one_run and self.holds_only(skip):
            lo, hi = plan.lo, plan.hi
            inside = lo <= skip < hi
            if inside:
                kept_rec, kept_since = recs[skip], self.since[skip]
            recs[lo:hi] = plan.recs
            self.since[lo:hi] = array("d", [since]) * (hi - lo)
            for b, x in enumerate(plan.xor):
                digest[b] ^= x
            self._count += hi - lo
            if inside:
                recs[skip], self.since[skip] = kept_rec, kept_since
                digest[buckets[skip]] ^= record_hash(plan.recs[skip - lo])
                self._count -= 1
            return
        for i, st in zip(ids, plan.recs, strict=True):
            if i == skip or recs[i] is not None:
                continue
            recs[i] = st
            self.since[i] = since
            digest[buckets[i]] ^= record_hash(st)
            self._count += 1

    def probe_of(self, name: str) -> _Probed | None:
        """What this node measured of a member (None if nothing, or not a member)."""
        i = self.id_of(name)
        return None if i is None else self.probed.get(i)

    def probe_data(self, i: int) -> _Probed:
        """Member i's probe data, to be changed by the caller."""
        self.probe_version += 1
        p = self.probed.get(i)
        if p is None:
            p = self.probed[i] = _Probed()
        return p

    def bucket_records(self, wanted: set[int] | frozenset[int]) -> list[MemberState]:
        """The records whose names fall in these digest buckets."""
        buckets = self.names.buckets
        return [r for i, r in enumerate(self.recs) if r is not None and buckets[i] in wanted]

    def wants_compaction(self) -> bool:
        return self._owned and len(self.names) > 4 * self._count + 4096
