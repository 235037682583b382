"""Membership core: SWIM failure detection with Lifeguard, gossip and push-pull. Sans-IO.

Theory of operation
-------------------
The core is a state machine with no sockets and no clock. The shell (or the simulator) calls
``receive(sender, msgs, now)`` for every decoded packet and ``tick(now)`` when
``next_deadline()`` has passed; each call returns an :class:`Output` holding the packets to
send and the membership events that happened. Randomness comes from the injected
``random.Random``; times are the caller's monotonic seconds and are only compared with
other times from the same caller.

Rules, in the order the code applies them:

Probing (SWIM)
  P1. Every probe interval (scaled by the local health multiplier) the next member of a
      shuffled round-robin list is pinged; the list is reshuffled at each wrap. Dead and
      left members are skipped; self is never probed.
  P2. If no ack arrives within the probe timeout (scaled), `indirect_checks` random alive
      members are asked to ping the target (IndirectPing), and, with `tcp_fallback`, the
      target is pinged once over a stream too.
  P3. If no ack arrives by the end of the probe interval, the target is suspected.
  P4. An indirect prober that gets no ack within nack_fraction * probe timeout sends a Nack
      to the requester when asked to (Lifeguard); an ack it gets until the end of the probe
      interval is forwarded.
  P5. Routed probes. Membership cares whether a member answers, not which path is fastest:
      a member is reached directly unless it was found silent to a direct ping (P6) and
      never answered one since ("unreached": another cloud, NAT, a firewall). When the shell
      sets ``next_hop`` (its routing table: first hop towards a member, or None), an
      unreached member with a route through another live member is probed with an
      IndirectPing to that hop instead of a Ping (no TCP fallback); the indirect round asks
      the random helpers and the table's hop (for any member: during a change the table may
      know before we do). A relay forwards a request along its own table's route (at most
      MAX_HOPS relays, never back to the requester) and also pings the target itself unless
      it is unreached; acks and nacks travel back along the chain. Only a last relay (it
      pings the target, knows it answers directly, forwards nowhere) times out and nacks;
      a relay that can neither reach the target nor forward stays out. A routed probe that
      fails with no nack at all means the path broke, not that the target did: the target
      is not suspected (the broken hop is found by its own neighbours' direct probes, and
      routes go around it). The same holds for a blind probe (the member never answered us
      directly and changed state less than `route_grace` ago): while links are being
      measured, silence is no evidence. Helpers, gossip and push-pull skip unreached
      members (any member if none is left). Each gossip round also sends to one transit hop
      (a next hop that unreached members are routed through), taking them in turn, so
      broadcasts cross every gateway.
  P6. measure(names) pings members once outside the probe round, quietly: neither the ping
      nor its ack carries broadcasts (a burst of measurements at a join would otherwise
      spend the newcomer's few transmissions on nodes that already know). An ack records
      the RTT as a direct probe's does and clears "unreached"; silence sets it unless the
      member answered within 2 probe intervals plus a timeout (no suspicion, no health
      change), and so do DIRECT_MISSES probes in a row that only a helper got answered (the
      member is alive but our direct path to it broke). The routing layer measures members
      with no fresh RTT, so a new member's reachability is known in about a second, and
      watches its next hops with it.
Lifeguard
  L1. Local health: a successful probe lowers the score by one; a failed one raises it by the
      missing nacks (by one when none were expected); refuting a suspicion of ourselves
      raises it by one. Probe interval and timeout are multiplied by score + 1.
  L2. A suspicion's timeout starts at suspicion_max and shrinks toward suspicion_min as
      independent accusers confirm it (see suspicion.py). k = suspicion_mult - 2 expected.
  L3. Buddy system: a ping to a suspected member carries the suspicion, so the member hears
      it at once and refutes.
  With ``lifeguard = False`` L1-L3 are off and the suspicion timeout is fixed at the minimum.
Incarnations and state (memberlist's rules)
  S1. Alive(i) about a known member applies if i > its incarnation (or the member is
      dead/left and comes back with a new address). Suspect(i) applies if i >= its
      incarnation and it is alive; if already suspect it is a confirmation. Dead(i) applies if
      i >= its incarnation and it is not already dead/left; source == node means "left".
  S2. A node that hears itself suspected or declared dead (and is not leaving), or hears an
      alive about itself that differs from its own, refutes: incarnation = accused + 1 and a
      new Alive is broadcast.
  S3. Alive about an unknown member adds it. Alive for a known live member from another
      address is a name conflict: reported, not applied.
  S4. Dead and left members are kept for gossip_to_the_dead (they are still gossiped to, so
      they can refute), then reaped from the table.
  S5. Identity. A member's name is bound to the identity key of the first alive that named
      it, for as long as the member is in the table (dead and left ones included, until
      reaped): an alive for that name with another key is a conflict, not applied, as is an
      alive for our own name with a key that is not ours. With keys, the key (not the
      address) tells who a member is: a newer alive signed by the member's own key moves it
      to a new address (a restart elsewhere), and an alive with our own key from another
      address is our earlier life, refuted like any stale alive about us. An alive is
      applied only if the shell's ``verify`` accepts it (its signature by that key); our
      own alives are signed with ``sign``. Without ``sign``/``verify`` (the simulator) keys
      are empty, S5 only binds names to the empty key and addresses tell members apart.
Dissemination
  D1. Every applied change is queued for broadcast (one per node, newest replaces older),
      and piggybacked on every UDP packet we send, least-sent first, within the packet
      budget; each is sent at most retransmit_mult * ceil(log10(N+1)) times.
  D2. Every gossip interval, if anything is queued, a packet of broadcasts goes to
      `gossip_nodes` random members (alive, suspect, or dead for less than
      gossip_to_the_dead).
Anti-entropy
  A1. Every push-pull period (scaled up with log2 N) state is exchanged over a stream with
      one random live member. To a member that takes digests (membership protocol 3) we send
      our table's bucket digests (table.py); it answers with its members in the buckets that
      differ, we merge them, then send back our records in those buckets that differ from
      what it showed, as a one-way PushPull (reply=True). To others the full state goes, and
      the receiver merges first and replies after, so the reply already carries its
      refutations (this is what lets a healed partition reunite in one exchange). Merging
      treats a remote "dead" as a suspicion, never as a death.
  A2. Every reconnect interval, with probability (#dead / #alive), one dead member's last
      address is sent a join push-pull, until reconnect_timeout after its death. Left members
      are retried only with reconnect_left.
  A3. join(addrs) sends a join push-pull to each address; a reply is a JoinSucceeded event,
      no reply within the join timeout a JoinFailed event.
"""

from __future__ import annotations

import heapq
import math
import random
from array import array
from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cbor2

from meshd.settings import MembershipSettings

from .awareness import Awareness
from .broadcast import ITEM_OVERHEAD, BroadcastQueue
from .messages import (
    ALIVE,
    DEAD,
    LEFT,
    MAX_HOPS,
    STATE_NAMES,
    SUSPECT,
    Ack,
    Alive,
    Dead,
    Digest,
    DigestReply,
    IndirectPing,
    MemberState,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
)
from .messages import wire_size as encoded_size
from .suspicion import Suspicion
from .table import (
    NO_POS,
    Member,
    MemberTable,
    Names,
    RestorePlan,
    differing_buckets,
    pack_digest,
    record_hash,
    want_bitmap,
    wanted_buckets,
)

# Packet framing bytes around the items (array headers, version).
PACKET_OVERHEAD = 4
# probes in a row that only a helper got answered before a member counts as unreached (P6)
DIRECT_MISSES = 2
MAX_SEQ = 2**32


class MembershipError(ValueError):
    """Bad arguments to the core (too large tags, a bad name...)."""


__all__ = ["STATE_NAMES", "Member", "MemberEvent", "Membership", "MembershipError", "Output",
           "Send"]


@dataclass(slots=True)
class MemberEvent:
    """Something changed in the member table. kind is one of: join, update, alive (recovered
    from suspicion), suspect, dead, left, reap, conflict, join-ok, join-failed."""

    kind: str
    node: str
    addr: str
    incarnation: int
    tags: dict[str, str] = field(default_factory=dict)
    detail: str = ""


@dataclass(slots=True)
class Send:
    """A packet to send. Unreliable (UDP) unless `reliable` (a stream)."""

    addr: str
    msgs: list[Message]
    reliable: bool
    size: int


@dataclass(slots=True)
class Output:
    sends: list[Send]
    events: list[MemberEvent]


class _Probe:
    __slots__ = ("done", "expected_nacks", "interval", "nacks", "routed", "seq", "start",
                 "target", "via")

    def __init__(self, target: str, seq: int, start: float, interval: float) -> None:
        self.target = target
        self.seq = seq
        self.start = start
        self.interval = interval
        self.done = False
        self.nacks = 0
        self.expected_nacks = 0
        self.routed = False
        self.via: str | None = None  # the hop a routed probe went through


class _Relay:
    """An indirect probe we run for someone else."""

    __slots__ = ("done", "nack", "orig_seq", "requester_addr", "seq")

    def __init__(self, seq: int, requester_addr: str, orig_seq: int, nack: bool) -> None:
        self.seq = seq
        self.requester_addr = requester_addr
        self.orig_seq = orig_seq
        self.nack = nack
        self.done = False


class _Measure:
    """A one-off ping that only measures (P6)."""

    __slots__ = ("done", "seq", "start", "target")

    def __init__(self, target: str, seq: int, start: float) -> None:
        self.target = target
        self.seq = seq
        self.start = start
        self.done = False


class _RelayNack:
    """The Lifeguard nack deadline of a relay (the relay itself lives on for late acks)."""

    __slots__ = ("relay",)

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay


class _Former:
    """A dead or left member remembered for reconnect attempts after it is reaped."""

    __slots__ = ("addr", "since", "state")

    def __init__(self, addr: str, state: int, since: float) -> None:
        self.addr = addr
        self.state = state
        self.since = since


def _record_rtt(table: MemberTable, i: int, rtt: float, now: float,
                unreached: set[str]) -> None:
    """A direct ack from member i: smoothed RTT (UDP ping -> ack) and when it came."""
    p = table.probe_data(i)
    p.rtt = rtt if p.rtt is None else 0.8 * p.rtt + 0.2 * rtt
    p.rtt_at = now
    unreached.discard(table.names.names[i])




def shuffle(rng: random.Random, x: MutableSequence[int]) -> None:
    """rng.shuffle(x): the same permutation from the same generator state (a test holds
    the two equal), with random.Random's per-element method calls inlined; the simulator
    shuffles 10^8 ids when it starts 10,000 nodes."""
    if type(rng) is not random.Random:
        rng.shuffle(x)
        return
    getrandbits = rng.getrandbits
    for i in range(len(x) - 1, 0, -1):
        n = i + 1
        k = n.bit_length()
        j = getrandbits(k)
        while j >= n:
            j = getrandbits(k)
        x[i], x[j] = x[j], x[i]


def tags_size(tags: dict[str, str]) -> int:
    return len(cbor2.dumps(tags))


def _tags_estimate(tags: dict[str, str]) -> int:
    if not tags:
        return 1
    return 1 + sum(2 + len(k) + len(v) for k, v in tags.items())


class Membership:
    """SWIM + Lifeguard membership of one node. See the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        addr: str,
        settings: MembershipSettings,
        rng: random.Random,
        now: float,
        tags: dict[str, str] | None = None,
        incarnation: int = 0,
        key: bytes = b"",
        sign: Callable[[bytes], bytes] | None = None,
        verify: Callable[[Alive], bool] | None = None,
        names: Names | None = None,
    ) -> None:
        if not name or len(name) > 128:
            raise MembershipError("node name must be 1..128 characters")
        tags = dict(tags or {})
        if tags_size(tags) > settings.max_meta_bytes:
            raise MembershipError(
                f"tags take {tags_size(tags)} bytes encoded; the limit is "
                f"{settings.max_meta_bytes}")
        self.s = settings
        self.rng = rng
        # the member table; `names` is shared by the cores of one simulation (table.py)
        self._t = MemberTable(names)
        self._names = self._t.names
        self._me = self._names.intern(name)
        self._name = name
        self._t.put(self._me, self._names.record(self._me, addr, incarnation, ALIVE, tags, key,
                                                 b""), now)
        self._sign = sign
        self._verify = verify
        self.bad_alives = 0  # alives refused by verify (bad signature, revoked key)
        self._key_index: tuple[int, dict[bytes, str], dict[str, bytes]] = (-1, {}, {})
        self.leaving = False
        # live members other than self (ids), for O(1) random choice and removal
        self._live = array("i")
        self._live_pos = array("i")  # by id: position in _live, or NO_POS
        self._recent_dead: dict[str, float] = {}
        self._former: dict[str, _Former] = {}
        self._probe_list = array("i")
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._seq = 0
        self._acks: dict[int, Any] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._joins: dict[str, float] = {}
        self._broadcasts = BroadcastQueue()
        self._awareness = Awareness(settings.awareness_max_multiplier)
        self.suspicions = 0  # members this node came to suspect (for /metrics)
        self.refutations = 0  # times it refuted a suspicion of itself
        self._timers: list[tuple[float, int, Callable[[Any, float], None], Any]] = []
        self._timer_seq = 0
        self._sends: list[Send] = []
        self._events: list[MemberEvent] = []
        self._gossip_armed = False
        self._now = now
        # bumped on every change of the member table, so views built on it can be cached
        self.member_version = 0
        self._addr_index: tuple[int, dict[str, str]] = (-1, {})
        self._list_cache: tuple[tuple[int, int], list[Member]] | None = None
        self._peers_cache: tuple[int, list[str]] = (-1, [])
        # routing table lookup set by the shell (P5): member name -> first hop name or None
        self.next_hop: Callable[[str], str | None] | None = None
        # whether a member takes digest push-pulls (A1); None: every member does. The
        # daemon asks the member's advertised protocol versions.
        self.takes_digests: Callable[[str], bool] | None = None
        self.push_pulls = {"full": 0, "digest": 0, "same": 0}  # started by us, by kind
        self._transit_turn = 0
        # members found silent to a direct ping (P6) that have not answered one since
        self._unreached: set[str] = set()
        self._direct_misses: dict[str, int] = {}
        # Random phases so that nodes started together do not act in lockstep.
        self._schedule(now + rng.uniform(0, settings.probe_interval), self._probe_round, None)
        self._schedule(now + rng.uniform(0, settings.push_pull_interval),
                       self._push_pull_round, None)
        self._schedule(now + rng.uniform(0, settings.reconnect_interval),
                       self._reconnect_round, None)
        self._next_gossip = now + rng.uniform(0, settings.gossip_interval)
        # announce ourselves (memberlist does the same on create): whoever we meet first
        # passes it on, so a join does not rest on the seed's gossip alone
        self._broadcast_self_alive()

    # --- public API ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def me(self) -> Member:
        """This node as a member (a snapshot, as every Member)."""
        return self._t.member(self._me)

    @property
    def members(self) -> MemberTable:
        """name -> Member, self included (a read-only mapping)."""
        return self._t

    def _my(self) -> MemberState:
        return self._t.recs[self._me]  # type: ignore[return-value]

    def _put_mine(self, incarnation: int, tags: dict[str, str], sig: bytes) -> None:
        """Replace our own record (same state, address and key); not a state change."""
        me = self._my()
        self._t.put(self._me, MemberState(me.node, me.addr, incarnation, me.state, tags,
                                          me.key, sig), None)

    @property
    def unreached(self) -> frozenset[str]:
        """Members found silent to direct pings that have not answered one since (P6)."""
        return frozenset(self._unreached)

    @property
    def health_score(self) -> int:
        """Lifeguard local health score (0 = healthy)."""
        return self._awareness.score

    def num_live(self) -> int:
        """Alive and suspect members, self included: the N of every formula."""
        return len(self._live) + 1

    def member_list(self) -> list[Member]:
        """Every member, self included, as snapshots. Kept until the table or a probe's
        data changes: the routing monitor asks several times a tick."""
        key = (self.member_version, self._t.probe_version)
        cache = self._list_cache
        if cache is None or cache[0] != key:
            cache = self._list_cache = (key, self._t.values())
        return list(cache[1])

    def alive_peers(self) -> list[str]:
        """The addresses of the alive members but us, in table order (where replicators
        push). Kept until the member table changes: they ask on every write."""
        version, addrs = self._peers_cache
        if version != self.member_version:
            addrs = [r.addr for r in self._t.records() if r.state == ALIVE and r.node != self.name]
            self._peers_cache = (self.member_version, addrs)
        return list(addrs)

    def name_at(self, addr: str) -> str | None:
        """The member at an address (the first one, as the table lists them). The index is
        rebuilt only when the member table changes: links and RPC ask on every call."""
        version, index = self._addr_index
        if version != self.member_version:
            index = {}
            for r in self._t.records():
                index.setdefault(r.addr, r.node)
            self._addr_index = (self.member_version, index)
        return index.get(addr)

    def _identity_index(self) -> tuple[dict[bytes, str], dict[str, bytes]]:
        version, by_key, by_addr = self._key_index
        if version != self.member_version:
            by_key, by_addr = {}, {}
            records = self._t.records()
            for r in records:
                if r.key and r.state in (ALIVE, SUSPECT):
                    by_key.setdefault(r.key, r.node)
                    by_addr[r.addr] = r.key  # a live member's address is its own
            for r in records:
                if r.key and r.state not in (ALIVE, SUSPECT):
                    by_addr.setdefault(r.addr, r.key)  # a dead one's, until reaped
            self._key_index = (self.member_version, by_key, by_addr)
        return by_key, by_addr

    def name_of_key(self, key: bytes) -> str | None:
        """The live member (alive or suspect) whose identity key this is (S5)."""
        return self._identity_index()[0].get(key)

    def key_at(self, addr: str) -> bytes | None:
        """The identity key expected at an address: the live member's there, else a dead or
        left member's still in the table (traffic meant for it, such as a reconnect, must
        not reach another key); None if no member with a key is there."""
        return self._identity_index()[1].get(addr)

    def restore(self, states: list[MemberState], now: float) -> None:
        """Load members as known without gossiping them (a converged start, or a member list
        persisted before a restart). Probing verifies them from there. The states become
        the table's records: they must not be changed afterwards."""
        states = list(states) if not isinstance(states, list) else states
        before = len(self._t)
        plan = self._names.restore_plan(states)
        fresh = self._t.holds_only(self._me) and not self._live and not self._probe_list
        self._t.load(plan, now, self._me)
        if len(self._t) == before:
            return
        self._grow_pos()
        if fresh and plan.one_run:
            self._restore_run(plan)
            return
        recs = self._t.recs
        live_pos, live = self._live_pos, self._live
        probe = self._probe_list
        in_probe = set(probe) if probe else ()
        for i in plan.ids:
            if i == self._me or i in in_probe:
                continue
            rec = recs[i]
            if rec is None:
                continue
            if rec.state in (ALIVE, SUSPECT) and live_pos[i] == NO_POS:
                live_pos[i] = len(live)
                live.append(i)
            probe.append(i)
        self._table_changed()
        shuffle(self.rng, probe)
        self._probe_index = 0

    def _restore_run(self, plan: RestorePlan) -> None:
        """restore's member-by-member loop done in array copies, for a table that held only
        us and a plan of one ascending run of ids: the same live order, positions and probe
        order as the loop gives."""
        lo, hi, me = plan.lo, plan.hi, self._me
        k = plan.pos[me - lo] if lo <= me < hi else NO_POS
        if k == NO_POS:
            self._live = array("i", plan.live)
            self._live_pos[lo:hi] = plan.pos
        else:
            self._live = plan.live[:k] + plan.live[k + 1:]
            self._live_pos[lo:hi] = (plan.pos[:me - lo] + array("i", [NO_POS])
                                     + plan.pos_after[me - lo + 1:])
        if lo <= me < hi:
            self._probe_list = plan.probe[:me - lo] + plan.probe[me - lo + 1:]
        else:
            self._probe_list = array("i", plan.probe)
        self._table_changed()
        shuffle(self.rng, self._probe_list)
        self._probe_index = 0

    def join(self, addrs: Iterable[str], now: float, timeout: float = 10.0) -> Output:
        """Contact seeds with a join push-pull (A3)."""
        self._now = now
        me = self._my()
        for addr in addrs:
            if addr == me.addr:
                continue
            self._joins[addr] = now + timeout
            self._schedule(now + timeout, self._join_expired, addr)
            self._send_push_pull(addr, join=True)
        return self._flush()

    def leave(self, now: float) -> Output:
        """Say goodbye: broadcast Dead(self, source=self) and gossip it right away."""
        self._now = now
        if not self.leaving:
            self.leaving = True
            me = self._my()
            msg = Dead(me.incarnation, self._name, self._name)
            self._t.put(self._me, self._names.record(self._me, me.addr, me.incarnation, LEFT,
                                                     me.tags, me.key, me.sig), now)
            self._table_changed()
            self._broadcast(self._name, msg)
            self._gossip(now)
        return self._flush()

    def evict(self, name: str, now: float) -> Output:
        """Declare a member dead now (an admin revoked its identity): the shell's verify
        refuses its alives from then on, so it cannot refute."""
        self._now = now
        m = self._t.rec(name)
        if m is not None and name != self._name and m.state in (ALIVE, SUSPECT):
            self._on_dead(Dead(m.incarnation, name, self._name), self._my().addr, now, False)
        return self._flush()

    def update_tags(self, tags: dict[str, str], now: float) -> Output:
        """Change this node's tags and spread them with a new incarnation."""
        self._now = now
        tags = dict(tags)
        size = tags_size(tags)
        if size > self.s.max_meta_bytes:
            raise MembershipError(
                f"tags take {size} bytes encoded; the limit is {self.s.max_meta_bytes}")
        me = self._my()
        if self.leaving:
            # saying goodbye: an alive now would undo the leave
            self._put_mine(me.incarnation, tags, me.sig)
            return self._flush()
        self._put_mine(me.incarnation + 1, tags, me.sig)
        self._broadcast_self_alive()
        return self._flush()

    def measure(self, names: Iterable[str], now: float) -> Output:
        """Ping these members once to learn whether and how fast they answer (P6)."""
        self._now = now
        me = self._my()
        for name in names:
            m = self._t.rec(name)
            if m is None or name == self._name or m.state not in (ALIVE, SUSPECT):
                continue
            w = _Measure(name, self._next_seq(), now)
            self._acks[w.seq] = w
            self._send(m.addr, Ping(w.seq, name, me.node, me.addr, True), piggyback=False)
            self._schedule(now + self.s.probe_interval, self._measure_expired, w)
        return self._flush()

    def _measure_expired(self, w: _Measure, now: float) -> None:
        if not w.done:
            w.done = True
            self._acks.pop(w.seq, None)
            if w.target not in self._t:
                return
            p = self._t.probe_of(w.target)
            rtt_at = None if p is None else p.rtt_at
            # one lost ping of a member that answered moments ago proves nothing
            if rtt_at is None or now - rtt_at > self.s.silent_after():
                self._unreached.add(w.target)

    def pending_broadcasts(self) -> int:
        return len(self._broadcasts)

    def next_deadline(self) -> float:
        """When tick() must next be called."""
        timers = self._timers
        while timers:
            head = timers[0]
            if head[3] is None or not self._is_stale(head):  # None: a probe round, never stale
                break
            heapq.heappop(timers)
        deadline = timers[0][0] if timers else math.inf
        if self._gossip_armed and self._next_gossip < deadline:
            return self._next_gossip
        return deadline

    def tick(self, now: float) -> Output:
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, handler, arg = heapq.heappop(timers)
            handler(arg, now)
        if self._gossip_armed and self._next_gossip <= now:
            self._gossip(now)
        return self._flush()

    def receive(self, sender: str, msgs: list[Message], now: float,
                reliable: bool = False) -> Output:
        """Handle a decoded packet from address `sender`."""
        self._now = now
        for msg in msgs:
            handler = self._handlers.get(type(msg))
            if handler is not None:
                handler(self, msg, sender, now, reliable)
        return self._flush()

    # --- timers --------------------------------------------------------------------------

    def _schedule(self, when: float, handler: Callable[[Any, float], None], arg: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, handler, arg))

    def _is_stale(self, entry: tuple[float, int, Any, Any]) -> bool:
        """A timer whose work was already done or cancelled (skipped, never run)."""
        arg = entry[3]
        kind = type(arg)
        if kind is _Probe or kind is _Relay or kind is _Measure:
            return arg.done
        if kind is _RelayNack:
            return arg.relay.done
        if kind is tuple and type(arg[1]) is Suspicion:
            name, sus = arg
            return self._suspicions.get(name) is not sus or entry[0] < sus.deadline()
        return False

    def _flush(self) -> Output:
        out = Output(self._sends, self._events)
        self._sends = []
        self._events = []
        return out

    # --- sending -------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % MAX_SEQ
        return self._seq

    def _send(self, addr: str, msg: Message, extra: list[Message] | None = None,
              piggyback: bool = True, to: str | None = None) -> None:
        """Send one UDP packet with as many piggybacked broadcasts as fit (unless it may well
        be lost: each piggybacked send uses up one of a broadcast's transmissions)."""
        msgs = [msg]
        size = PACKET_OVERHEAD + encoded_size(msg) + ITEM_OVERHEAD
        if extra:
            for m in extra:
                size += encoded_size(m) + ITEM_OVERHEAD
            msgs.extend(extra)
        if piggyback and self._broadcasts:
            budget = self.s.packet_budget - size
            limit = self.s.retransmit_limit(self.num_live())
            for m in self._broadcasts.take(budget, limit, to):
                msgs.append(m)
                size += encoded_size(m) + ITEM_OVERHEAD
        self._sends.append(Send(addr, msgs, False, size))

    def _send_reliable(self, addr: str, msg: Message) -> None:
        self._sends.append(Send(addr, [msg], True, PACKET_OVERHEAD + encoded_size(msg)))

    def _broadcast(self, key: str, msg: Message) -> None:
        self._broadcasts.queue(key, msg, encoded_size(msg), not isinstance(msg, Alive))
        if not self._gossip_armed:
            # the gossip ticker keeps its phase while idle: the next round is the next
            # grid point, not "now" (so a change waits for a round, as in memberlist)
            self._gossip_armed = True
            interval = self.s.gossip_interval
            if self._next_gossip <= self._now:
                skipped = math.floor((self._now - self._next_gossip) / interval) + 1
                self._next_gossip += skipped * interval

    def _broadcast_self_alive(self) -> None:
        self._table_changed()
        me = self._my()
        msg = Alive(me.incarnation, me.node, me.addr, dict(me.tags), me.key)
        if self._sign is not None:
            msg.sig = self._sign(msg.payload())
            self._put_mine(me.incarnation, me.tags, msg.sig)
        self._broadcast(me.node, msg)

    def _table_changed(self) -> None:
        self.member_version += 1

    def _event(self, kind: str, m: MemberState, detail: str = "") -> None:
        self._table_changed()
        self._events.append(MemberEvent(kind, m.node, m.addr, m.incarnation, m.tags, detail))

    # --- member table bookkeeping ---------------------------------------------------------

    def _grow_pos(self) -> None:
        short = len(self._names) - len(self._live_pos)
        if short > 0:
            self._live_pos.extend([NO_POS] * short)

    def _add_member(self, i: int, rec: MemberState, now: float) -> None:
        self._t.put(i, rec, now)
        if rec.state in (ALIVE, SUSPECT):
            self._live_add(i)
        # insert at a random position of the probe list (memberlist does the same)
        pos = self.rng.randint(0, len(self._probe_list))
        self._probe_list.insert(pos, i)
        if pos < self._probe_index:
            self._probe_index += 1
        self._former.pop(rec.node, None)

    def _live_add(self, i: int) -> None:
        self._grow_pos()
        if self._live_pos[i] == NO_POS:
            self._live_pos[i] = len(self._live)
            self._live.append(i)
        self._recent_dead.pop(self._names.names[i], None)

    def _live_remove(self, i: int) -> None:
        self._grow_pos()
        pos = self._live_pos[i]
        if pos == NO_POS:
            return
        self._live_pos[i] = NO_POS
        last = self._live.pop()
        if last != i:
            self._live[pos] = last
            self._live_pos[last] = pos

    def _is_live(self, name: str) -> bool:
        i = self._names.ids.get(name)
        return i is not None and i < len(self._live_pos) and self._live_pos[i] != NO_POS

    def _random_live(self, k: int, exclude: tuple[str, ...] = ()) -> list[str]:
        """Up to k distinct random live members (not self), excluding `exclude`."""
        live = self._live
        n = len(live)
        if n == 0 or k <= 0:
            return []
        names = self._names.names
        if n <= 2 * (k + len(exclude)):
            pool = [names[x] for x in live if names[x] not in exclude]
            return self.rng.sample(pool, min(k, len(pool)))
        chosen: list[str] = []
        attempts = 0
        while len(chosen) < k and attempts < 8 * k:
            attempts += 1
            cand = names[live[self.rng.randrange(n)]]
            if cand in exclude or cand in chosen:
                continue
            chosen.append(cand)
        return chosen

    def _route_via(self, name: str) -> str | None:
        """The live member through which `name` is reached: only for members found silent
        to a direct ping (P6), whatever route latency prefers; None means directly (P5)."""
        if name not in self._unreached:
            return None
        return self._table_hop(name)

    def _table_hop(self, name: str) -> str | None:
        """The routing table's first hop towards `name` when it is another live member."""
        if self.next_hop is None:
            return None
        hop = self.next_hop(name)
        if hop is None or hop == name or hop == self._name or not self._is_live(hop):
            return None
        return hop

    def _known_direct(self, name: str) -> bool:
        """It answered a direct ping and was not found silent to one since."""
        p = self._t.probe_of(name)
        return p is not None and p.rtt_at is not None and name not in self._unreached

    def _is_direct(self, name: str) -> bool:
        """Worth a packet: not found silent to a direct ping (a new member is presumed
        reachable until a measure ping says otherwise)."""
        return name not in self._unreached

    def _transit_hops(self) -> list[str]:
        """Next hops that some live unreached member is routed through (P5)."""
        hops = {self._table_hop(name) for name in self._unreached if self._is_live(name)}
        hops.discard(None)
        return sorted(hops)  # type: ignore[arg-type]

    def _random_direct(self, k: int, exclude: tuple[str, ...] = ()) -> list[str]:
        """Up to k random live members that are not unreached (P5); if every candidate is,
        any live members."""
        if self.next_hop is None:
            return self._random_live(k, exclude)
        picked: list[str] = []
        for name in self._random_live(min(len(self._live), 4 * k), exclude):
            if self._is_direct(name):
                picked.append(name)
                if len(picked) == k:
                    break
        return picked or self._random_live(k, exclude)

    def _set_dead(self, i: int, m: MemberState, incarnation: int, state: int,
                  now: float) -> MemberState:
        was_live = m.state in (ALIVE, SUSPECT)
        rec = self._names.record(i, m.addr, incarnation, state, m.tags, m.key, m.sig)
        self._t.put(i, rec, now)
        if was_live:
            self._live_remove(i)
        name = rec.node
        self._recent_dead[name] = now
        self._former[name] = _Former(rec.addr, state, now)
        self._schedule(now + self.s.gossip_to_the_dead, self._reap, (name, now))
        return rec

    def _compact(self) -> None:
        """Renumber a daemon's names once reaped ones outnumber the known (table.py)."""
        old_names = self._names.names
        old = self._t
        fresh = MemberTable()
        fresh.put(fresh.names.intern(self._name), old.recs[self._me], old.since[self._me])
        remap: dict[int, int] = {self._me: 0}
        for i, rec in enumerate(old.recs):
            if rec is None or i == self._me:
                continue
            j = fresh.names.intern(old_names[i])
            fresh.names.last[j] = rec
            fresh.put(j, rec, old.since[i])
            remap[i] = j
            if i in old.probed:
                fresh.probed[j] = old.probed[i]
        self._t, self._names, self._me = fresh, fresh.names, 0
        self._live = array("i", [remap[i] for i in self._live])
        self._live_pos = array("i", [NO_POS]) * len(fresh.names)
        for pos, i in enumerate(self._live):
            self._live_pos[i] = pos
        kept = [(n, remap[i]) for n, i in enumerate(self._probe_list) if i in remap]
        self._probe_index = sum(1 for n, _ in kept if n < self._probe_index)
        self._probe_list = array("i", [i for _, i in kept])
        self._table_changed()

    # --- probing (P1-P4, L1, L3) ----------------------------------------------------------

    def _next_probe_target(self) -> MemberState | None:
        probe_list = self._probe_list
        recs = self._t.recs
        at = self._probe_index
        if at < len(probe_list):  # the usual case, before the loop below: the next is live
            m = recs[probe_list[at]]
            if m is not None and (m.state == ALIVE or m.state == SUSPECT):
                self._probe_index = at + 1
                return m
        for _ in range(len(probe_list) + 1):
            if self._probe_index >= len(probe_list):
                # reshuffle at each wrap, dropping reaped names
                probe_list = self._probe_list = array(
                    "i", [i for i in probe_list if recs[i] is not None])
                shuffle(self.rng, probe_list)
                self._probe_index = 0
                if not probe_list:
                    return None
            m = recs[probe_list[self._probe_index]]
            self._probe_index += 1
            if m is not None and m.state in (ALIVE, SUSPECT):
                return m
        return None

    def _probe_round(self, _: Any, now: float) -> None:
        lifeguard = self.s.lifeguard
        interval = self.s.probe_interval
        if lifeguard and self._awareness.score:
            interval = self._awareness.scale(interval)
        self._schedule(now + interval, self._probe_round, None)
        old = self._probe
        if old is not None and not old.done:
            self._probe_failed(old, now)
        if self.leaving:
            return
        target = self._next_probe_target()
        if target is None:
            return
        tname = target.node
        probe = _Probe(tname, self._next_seq(), now, interval)
        self._probe = probe
        self._acks[probe.seq] = probe
        extra = None
        if lifeguard and target.state == SUSPECT:
            extra = [Suspect(target.incarnation, tname, self._name)]
        me = self._t.recs[self._me]
        hop = None if tname not in self._unreached else self._table_hop(tname)  # _route_via
        if hop is None:
            if self.next_hop is not None and not self._known_direct(tname) \
                    and now - self._t.since[self._names.ids[tname]] < self.s.route_grace:
                probe.routed = True  # blind: no route yet and it never answered us directly
            self._send(target.addr, Ping(probe.seq, tname, self._name, me.addr), extra,
                       to=tname)
        else:
            probe.routed = True
            probe.via = hop
            self._send(self._t.rec(hop).addr,  # type: ignore[union-attr]
                       IndirectPing(probe.seq, tname, target.addr, self._name, me.addr,
                                    lifeguard), extra, to=hop)
        timeout = self.s.probe_timeout
        if lifeguard and self._awareness.score:
            timeout = self._awareness.scale(timeout)
        self._schedule(now + timeout, self._probe_indirect, probe)

    def _probe_indirect(self, probe: _Probe, now: float) -> None:
        if probe.done:
            return
        target = self._t.rec(probe.target)
        if target is None or target.state not in (ALIVE, SUSPECT):
            self._probe_done(probe)
            return
        tname = target.node
        helpers = self._random_direct(self.s.indirect_checks, (tname,))
        hop = self._table_hop(tname)  # the route's way, even if we never marked it
        if hop is not None and hop not in helpers:
            helpers.append(hop)
        nack = self.s.lifeguard
        my_addr = self._my().addr
        for name in helpers:
            helper = self._t.rec(name)
            self._send(helper.addr, IndirectPing(  # type: ignore[union-attr]
                probe.seq, tname, target.addr, self._name, my_addr, nack), to=name)
        probe.expected_nacks = len(helpers) if nack else 0
        if self.s.tcp_fallback and hop is None:
            self._send_reliable(target.addr, Ping(probe.seq, tname, self._name, my_addr))
        self._schedule(probe.start + probe.interval, self._probe_final, probe)

    def _probe_final(self, probe: _Probe, now: float) -> None:
        if not probe.done:
            self._probe_failed(probe, now)

    def _probe_done(self, probe: _Probe) -> None:
        probe.done = True
        self._acks.pop(probe.seq, None)

    def _probe_failed(self, probe: _Probe, now: float) -> None:
        self._probe_done(probe)
        if self.s.lifeguard:
            if probe.expected_nacks > 0:
                self._awareness.apply(max(0, probe.expected_nacks - probe.nacks))
            else:
                self._awareness.apply(1)
        target = self._t.rec(probe.target)
        if target is None or target.state not in (ALIVE, SUSPECT):
            return
        if probe.routed and probe.nacks == 0 and self.s.lifeguard:
            return  # no relay confirmed the target silent: the path failed, not the target
        self._on_suspect(Suspect(target.incarnation, target.node, self._name),
                         self._my().addr, now, False)

    def _on_ping(self, msg: Ping, sender: str, now: float, reliable: bool) -> None:
        if msg.target != self._name:
            return  # meant for a node that used to have our address
        if reliable:
            self._send_reliable(sender, Ack(msg.seq))
        else:
            self._send(sender, Ack(msg.seq), None, not msg.quiet, msg.source)

    def _on_indirect_ping(self, msg: IndirectPing, sender: str, now: float,
                          reliable: bool) -> None:
        if msg.target == self._name:  # we are the target (a relay before us routed here)
            self._send(sender, Ack(msg.seq))
            return
        hop = self._table_hop(msg.target)
        hop_rec = None if hop is None else self._t.rec(hop)
        if hop_rec is not None and (hop_rec.addr == sender or msg.hops >= MAX_HOPS):
            hop = None  # the route leads back where the request came from, or too far
        direct = msg.target not in self._unreached
        if hop is None and not direct:
            return  # we cannot reach it and know no way on: we cannot help
        relay = _Relay(self._next_seq(), sender, msg.seq, msg.nack)
        self._acks[relay.seq] = relay
        my_addr = self._my().addr
        if direct:
            self._send(msg.target_addr, Ping(relay.seq, msg.target, self._name, my_addr),
                       to=msg.target)
        if hop is not None:
            # a forwarding relay passes the nack of the last relay back; it has none itself
            self._send(self._t.rec(hop).addr,  # type: ignore[union-attr]
                       IndirectPing(relay.seq, msg.target, msg.target_addr, self._name,
                                    my_addr, msg.nack, msg.hops + 1))
        # only a relay that pings the target itself and knows it answers directly (as far
        # as it knows) may say "silent"
        final = hop is None and (self.next_hop is None or msg.target not in self._t
                                 or self._known_direct(msg.target))
        relay.nack = msg.nack and (final or hop is not None)
        if relay.nack and hop is None:
            self._schedule(now + self.s.nack_fraction * self.s.probe_timeout,
                           self._relay_nack, _RelayNack(relay))
        self._schedule(now + self.s.probe_interval, self._relay_expired, relay)

    def _relay_nack(self, arg: _RelayNack, now: float) -> None:
        relay = arg.relay
        if not relay.done:
            self._send(relay.requester_addr, Nack(relay.orig_seq))

    def _relay_expired(self, relay: _Relay, now: float) -> None:
        if relay.done:
            return
        relay.done = True
        self._acks.pop(relay.seq, None)

    def _on_ack(self, msg: Ack, sender: str, now: float, reliable: bool) -> None:
        waiter = self._acks.pop(msg.seq, None)
        if waiter is None:
            return
        if isinstance(waiter, _Probe):
            waiter.done = True
            if self.s.lifeguard and self._awareness.score:
                self._awareness.apply(-1)
            ti = self._t.id_of(waiter.target)
            target = None if ti is None else self._t.recs[ti]
            if reliable and target is not None:
                self._events.append(MemberEvent(
                    "udp-unreachable", target.node, target.addr, target.incarnation, {},
                    "answered over TCP but not over UDP: check firewalls for UDP"))
            if target is not None and not reliable and sender == target.addr:
                _record_rtt(self._t, ti, now - waiter.start, now,  # type: ignore[arg-type]
                            self._unreached)
                self._direct_misses.pop(target.node, None)
            elif waiter.via is not None:
                hi = self._t.id_of(waiter.via)
                if hi is not None and sender == self._t.recs[hi].addr:  # type: ignore[union-attr]
                    self._t.probe_data(hi).heard_at = now
            elif target is not None and not waiter.routed and self.next_hop is not None:
                # alive, but only a helper got through: the direct path may be broken
                misses = self._direct_misses.get(target.node, 0) + 1
                self._direct_misses[target.node] = misses
                if misses >= DIRECT_MISSES:
                    self._unreached.add(target.node)
        elif isinstance(waiter, _Measure):
            waiter.done = True
            ti = self._t.id_of(waiter.target)
            target = None if ti is None else self._t.recs[ti]
            if target is not None and not reliable and sender == target.addr:
                _record_rtt(self._t, ti, now - waiter.start, now,  # type: ignore[arg-type]
                            self._unreached)
        else:
            waiter.done = True
            self._send(waiter.requester_addr, Ack(waiter.orig_seq))

    def _on_nack(self, msg: Nack, sender: str, now: float, reliable: bool) -> None:
        waiter = self._acks.get(msg.seq)
        if isinstance(waiter, _Probe):
            waiter.nacks += 1
        elif isinstance(waiter, _Relay) and waiter.nack and not waiter.done:
            self._send(waiter.requester_addr, Nack(waiter.orig_seq))

    # --- state changes (S1-S4) -----------------------------------------------------------

    def _refute(self, accused_incarnation: int) -> None:
        self.refutations += 1
        me = self._my()
        self._put_mine(max(me.incarnation, accused_incarnation) + 1, me.tags, me.sig)
        self._broadcast_self_alive()
        if self.s.lifeguard:
            self._awareness.apply(1)

    def _verified(self, msg: Alive) -> bool:
        """S5: the shell's verdict on an alive we are about to apply."""
        if self._verify is None or self._verify(msg):
            return True
        self.bad_alives += 1
        return False

    def _on_alive(self, msg: Alive, sender: str, now: float, reliable: bool) -> None:
        name = msg.node
        if name == self._name:
            me = self._my()
            if self.leaving or msg.incarnation < me.incarnation:
                return
            if msg.incarnation == me.incarnation and msg.addr == me.addr \
                    and msg.tags == me.tags and msg.key == me.key:
                return
            if msg.key != me.key:
                # another identity claims our name (S5): refuting would not stop it
                if self._verified(msg):
                    self._events.append(MemberEvent(
                        "conflict", name, msg.addr, msg.incarnation, dict(msg.tags),
                        f"name {name} is also claimed by another identity at {msg.addr}"))
                return
            if msg.addr != me.addr and msg.incarnation >= me.incarnation and not me.key:
                # another node uses our name: refuting would make us fight over it forever
                # (with identity keys the key says who it is: ours is our earlier life)
                self._events.append(MemberEvent("conflict", name, msg.addr,
                                                msg.incarnation, dict(msg.tags),
                                                f"name {name} is also used by {msg.addr}"))
                return
            self._refute(msg.incarnation)
            return
        names = self._names
        i = self._t.id_of(name)
        if i is None:
            if tags_size(msg.tags) > self.s.max_meta_bytes or not self._verified(msg):
                return
            i = names.intern(name)
            rec = names.record(i, msg.addr, msg.incarnation, ALIVE, msg.tags, msg.key, msg.sig)
            self._add_member(i, rec, now)
            self._broadcast(name, msg)
            self._event("join", rec)
            return
        m: MemberState = self._t.recs[i]  # type: ignore[assignment]
        if m.key and msg.key != m.key:
            # the name is bound to another identity while it is in the table (S5)
            if msg.incarnation > m.incarnation and self._verified(msg):
                self._event("conflict", m, f"{name} also claimed by another identity at "
                                           f"{msg.addr}")
            return
        if msg.addr != m.addr:
            if m.state in (ALIVE, SUSPECT) and (not m.key or msg.incarnation <= m.incarnation):
                # without keys a second address is a second node; with them, the member's
                # own newer alive says it moved (only its key could sign it)
                if not m.key:
                    self._event("conflict", m, f"{name} also claimed by {msg.addr}")
                return
            if tags_size(msg.tags) > self.s.max_meta_bytes or not self._verified(msg):
                return
            # a dead node came back on a new address
        elif (msg.incarnation <= m.incarnation
              or tags_size(msg.tags) > self.s.max_meta_bytes or not self._verified(msg)):
            return
        old_state = m.state
        rec = names.record(i, msg.addr, msg.incarnation, ALIVE, msg.tags, msg.key, msg.sig)
        self._t.put(i, rec, None if old_state == ALIVE else now)
        self._suspicions.pop(name, None)
        if old_state in (DEAD, LEFT):
            self._live_add(i)
            self._former.pop(name, None)
            if i not in self._probe_list:
                self._probe_list.insert(self.rng.randint(0, len(self._probe_list)), i)
        self._broadcast(name, msg)
        kind = "join" if old_state in (DEAD, LEFT) else \
            "alive" if old_state == SUSPECT else "update"
        self._event(kind, rec)

    def _accused(self, msg: Suspect | Dead) -> int | None:
        """The member a suspect/dead message may act on (S1, S2); refutes if it is us."""
        i = self._t.id_of(msg.node)
        if i is None:
            return None
        m: MemberState = self._t.recs[i]  # type: ignore[assignment]
        if msg.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return None
        if i == self._me:
            if not self.leaving:
                self._refute(msg.incarnation)
            return None
        return i

    def _on_suspect(self, msg: Suspect, sender: str, now: float, reliable: bool) -> None:
        i = self._accused(msg)
        if i is None:
            return
        m: MemberState = self._t.recs[i]  # type: ignore[assignment]
        name = m.node
        if m.state == SUSPECT:
            sus = self._suspicions.get(name)
            if sus is not None and sus.confirm(msg.source):
                self._broadcast(name, msg)
                self._schedule(sus.deadline(), self._suspicion_expired, (name, sus))
            return
        rec = self._names.record(i, m.addr, msg.incarnation, SUSPECT, m.tags, m.key, m.sig)
        self._t.put(i, rec, now)
        self.suspicions += 1
        n = self.num_live()
        k = self.s.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        sus = Suspicion(msg.source, k, self.s.suspicion_min(n), self.s.suspicion_max(n), now)
        self._suspicions[name] = sus
        self._schedule(sus.deadline(), self._suspicion_expired, (name, sus))
        self._broadcast(name, msg)
        self._event("suspect", rec, f"by {msg.source}")

    def _suspicion_expired(self, arg: tuple[str, Suspicion], now: float) -> None:
        name, sus = arg
        if self._suspicions.get(name) is not sus or now < sus.deadline():
            return  # cancelled, or a later deadline (an earlier one fired first)
        m = self._t.rec(name)
        assert m is not None
        self._on_dead(Dead(m.incarnation, name, self._name), self._my().addr, now, False)

    def _on_dead(self, msg: Dead, sender: str, now: float, reliable: bool) -> None:
        i = self._accused(msg)
        if i is None:
            return
        m: MemberState = self._t.recs[i]  # type: ignore[assignment]
        name = m.node
        self._suspicions.pop(name, None)
        state = LEFT if msg.source == name else DEAD
        rec = self._set_dead(i, m, msg.incarnation, state, now)
        self._broadcast(name, msg)
        self._event("left" if state == LEFT else "dead", rec,
                    "" if state == LEFT else f"by {msg.source}")

    def _reap(self, arg: tuple[str, float], now: float) -> None:
        name, since = arg
        i = self._t.id_of(name)
        if i is None:
            return
        m: MemberState = self._t.recs[i]  # type: ignore[assignment]
        if m.state not in (DEAD, LEFT) or self._t.since[i] != since:
            return
        self._t.remove(i)
        self._recent_dead.pop(name, None)
        self._unreached.discard(name)
        self._direct_misses.pop(name, None)
        self._broadcasts.drop(name)
        self._event("reap", m)
        if self._t.wants_compaction():
            self._compact()

    # --- gossip (D2) ---------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        interval = self.s.gossip_interval
        self._next_gossip += interval
        if self._next_gossip <= now:  # we were descheduled: keep the phase, skip the backlog
            self._next_gossip += (math.floor((now - self._next_gossip) / interval) + 1) * interval
        if not self._broadcasts:
            self._gossip_armed = False
            return
        targets = self._random_direct(self.s.gossip_nodes)
        if self.next_hop is not None:
            hops = self._transit_hops()
            if hops:
                self._transit_turn = (self._transit_turn + 1) % len(hops)
                if hops[self._transit_turn] not in targets:
                    targets.append(hops[self._transit_turn])
        recent = self._recent_dead
        if recent:
            horizon = now - self.s.gossip_to_the_dead
            for name in [n for n, t in recent.items() if t < horizon]:
                del recent[name]
            if recent:
                # dead members may receive gossip too: each with the same chance as one live
                pool = len(self._live) + len(recent)
                for name in recent:
                    if self.rng.random() * pool < self.s.gossip_nodes:
                        targets.append(name)
        limit = self.s.retransmit_limit(self.num_live())
        budget = self.s.packet_budget - PACKET_OVERHEAD
        for name in targets:
            m = self._t.rec(name)
            if m is None:
                continue
            msgs = self._broadcasts.take(budget, limit, name)
            if not msgs:
                continue  # nothing for this one (news about itself only): others may differ
            size = PACKET_OVERHEAD + sum(encoded_size(x) + ITEM_OVERHEAD for x in msgs)
            self._sends.append(Send(m.addr, msgs, False, size))
        if not self._broadcasts:
            self._gossip_armed = False

    # --- anti-entropy (A1-A3) ------------------------------------------------------------

    def _states_size(self, states: list[MemberState]) -> int:
        """Estimated encoded size of push-pull states (exact encoding of thousands of states
        is costly and the shell measures real bytes): 12 bytes of headers and numbers each."""
        return 16 + len(self._name) + sum(
            12 + len(st.node) + len(st.addr) + _tags_estimate(st.tags) for st in states)

    def _send_push_pull(self, addr: str, join: bool, reply: bool = False) -> None:
        states = self._t.records()
        msg = PushPull(self._name, join, reply, states)
        self._sends.append(Send(addr, [msg], True, self._states_size(states)))

    def _push_pull_round(self, _: Any, now: float) -> None:
        n = self.num_live()
        period = self.s.push_pull_period(n)
        self._schedule(now + period, self._push_pull_round, None)
        if self.leaving:
            return
        peers = self._random_direct(1)
        if not peers:
            return
        peer = peers[0]
        addr = self._t.rec(peer).addr  # type: ignore[union-attr]
        if self.takes_digests is not None and not self.takes_digests(peer):
            self.push_pulls["full"] += 1
            self._send_push_pull(addr, join=False)
            return
        self.push_pulls["digest"] += 1
        msg = Digest(self._name, pack_digest(self._t.digest))
        self._sends.append(Send(addr, [msg], True, PACKET_OVERHEAD + 8 + len(self._name)
                                + len(msg.buckets)))

    def _on_digest(self, msg: Digest, sender: str, now: float, reliable: bool) -> None:
        """A1 with digests: answer with our records in the buckets whose digests differ,
        and ask for the sender's records in them."""
        if not reliable:
            return
        differ = differing_buckets(self._t.digest, msg.buckets)
        states = self._t.bucket_records(differ) if differ else []
        reply = DigestReply(self._name, want_bitmap(differ), states)
        self._sends.append(Send(sender, [reply], True,
                                self._states_size(states) + len(reply.want)))

    def _on_digest_reply(self, msg: DigestReply, sender: str, now: float,
                         reliable: bool) -> None:
        """Merge what differs, then send back ours in those buckets (merged first, so it
        carries our refutations), leaving out what the peer just showed it holds."""
        if not reliable:
            return
        wanted = wanted_buckets(msg.want)
        if not wanted:
            self.push_pulls["same"] += 1
            return
        self._merge(msg.states, msg.source, sender, now)
        theirs = {st.node: record_hash(st) for st in msg.states}
        ours = [st for st in self._t.bucket_records(wanted)
                if theirs.get(st.node) != record_hash(st)]
        if ours:
            back = PushPull(self._name, False, True, ours)
            self._sends.append(Send(sender, [back], True, self._states_size(ours)))

    def _on_push_pull(self, msg: PushPull, sender: str, now: float, reliable: bool) -> None:
        if not reliable:
            return  # full state only travels on streams
        self._merge(msg.states, msg.source, sender, now)
        if not msg.reply:
            self._send_push_pull(sender, join=msg.join, reply=True)
        elif sender in self._joins:
            del self._joins[sender]
            self._events.append(MemberEvent("join-ok", msg.source, sender, 0))

    def _merge(self, states: list[MemberState], source: str, sender: str, now: float) -> None:
        table = self._t
        for st in states:
            m = table.rec(st.node)
            if m is not None and st.incarnation < m.incarnation:
                continue  # older news than ours: no rule would apply it
            if st.state == ALIVE:
                if m is not None and st.incarnation == m.incarnation and st.addr == m.addr \
                        and st.node != self._name:
                    continue  # nothing new (fast path: most of a push-pull)
                self._on_alive(Alive(st.incarnation, st.node, st.addr, st.tags, st.key,
                                     st.sig), sender, now, True)
            elif st.state == LEFT:
                self._on_dead(Dead(st.incarnation, st.node, st.node), sender, now, True)
            else:
                # a remote "dead" is only a suspicion here: we may still reach the node
                self._on_suspect(Suspect(st.incarnation, st.node, source), sender, now,
                                 True)

    def _join_expired(self, addr: str, now: float) -> None:
        deadline = self._joins.get(addr)
        if deadline is not None and deadline <= now:
            del self._joins[addr]
            self._events.append(MemberEvent("join-failed", "", addr, 0, {},
                                            "no reply to join"))

    def stream_failed(self, addr: str, now: float, reason: str = "could not connect"
                      ) -> Output:
        """The shell could not open a stream to addr: fail a pending join at once."""
        self._now = now
        if addr in self._joins:
            del self._joins[addr]
            self._events.append(MemberEvent("join-failed", "", addr, 0, {}, reason))
        return self._flush()

    def _reconnect_round(self, _: Any, now: float) -> None:
        self._schedule(now + self.s.reconnect_interval, self._reconnect_round, None)
        if self.leaving or not self._former:
            return
        horizon = now - self.s.reconnect_timeout
        for name in [n for n, f in self._former.items() if f.since < horizon]:
            del self._former[name]
        candidates = [f for f in self._former.values()
                      if f.state == DEAD or (f.state == LEFT and self.s.reconnect_left)]
        if not candidates:
            return
        if self.rng.random() * self.num_live() > len(candidates):
            return
        target = candidates[self.rng.randrange(len(candidates))]
        self._send_push_pull(target.addr, join=True)

    _handlers: ClassVar[dict[type, Callable[..., None]]] = {}


Membership._handlers = {
    Ping: Membership._on_ping,
    IndirectPing: Membership._on_indirect_ping,
    Ack: Membership._on_ack,
    Nack: Membership._on_nack,
    Alive: Membership._on_alive,
    Suspect: Membership._on_suspect,
    Dead: Membership._on_dead,
    PushPull: Membership._on_push_pull,
    Digest: Membership._on_digest,
    DigestReply: Membership._on_digest_reply,
}
