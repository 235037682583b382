"""One membership core driven by hand: the test plays every other member, with explicit
times, and reads the core's Output (no harness delivery, no sleeps)."""

from __future__ import annotations

import random
from collections.abc import Callable

from meshd.membership.core import Membership, Output, Send
from meshd.membership.messages import ALIVE, Ack, IndirectPing, MemberState, Message, Ping

from .helpers import addr, settings


def solo(*others: str, t0: float = 0.0, seed: int = 1, inc: int = 0,
         **overrides: object) -> Membership:
    """Core "a" at time t0 that knows `others` as alive (incarnation `inc`)."""
    core = Membership("a", addr("a"), settings(**overrides), random.Random(seed), t0)
    core.restore([MemberState(n, addr(n), inc, ALIVE, {}) for n in others], t0)
    return core


def msgs(out: Output, kind: type, dst: str | None = None) -> list:
    return [m for s in out.sends if dst is None or s.addr == addr(dst)
            for m in s.msgs if isinstance(m, kind)]


def sends_of(out: Output, kind: type) -> list[tuple[Send, Message]]:
    """(send, main message) for sends whose first message is of this type."""
    return [(s, s.msgs[0]) for s in out.sends if isinstance(s.msgs[0], kind)]


def step(core: Membership, limit: float = 1e5) -> tuple[float, Output]:
    """Tick at the core's own next deadline, as the shell does."""
    t = core.next_deadline()
    assert t < limit, "the core has nothing left to do"
    return t, core.tick(t)


def until_probe(core: Membership, target: str | None,
                max_steps: int = 500) -> tuple[float, Send, Ping | IndirectPing]:
    """Tick at deadlines until a probe round pings `target` (any member if None), directly
    or routed (not a measure, not a stream ping); probes of other members are acked at once
    from their own address."""
    for _ in range(max_steps):
        t, out = step(core)
        found = None
        for s, m in sends_of(out, Ping | IndirectPing):
            if s.reliable or (isinstance(m, Ping) and m.quiet):
                continue
            if target is None or m.target == target:
                found = found or (t, s, m)
            elif isinstance(m, Ping):
                core.receive(addr(m.target), [Ack(m.seq)], t)
        if found:
            return found
    raise AssertionError(f"no probe of {target}")


def until_ping(core: Membership, target: str) -> tuple[float, int]:
    """until_probe for a direct probe: its time and sequence number."""
    t, _, m = until_probe(core, target)
    assert isinstance(m, Ping), f"{target} was probed through a relay"
    return t, m.seq


def run_until(core: Membership, until: float, on_out: Callable[[float, Output], None]
              | None = None) -> None:
    """Tick at the core's deadlines up to `until`."""
    while core.next_deadline() <= until:
        t, out = step(core)
        if on_out is not None:
            on_out(t, out)
