"""A hand-driven harness for membership cores: instant, lossless, fully controlled delivery."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from meshd.membership.core import Member, MemberEvent, Membership, Output, Send
from meshd.membership.messages import ALIVE, MemberState
from meshd.settings import MembershipSettings, membership_profile


def settings(**overrides: object) -> MembershipSettings:
    return membership_profile("lan", **overrides)


def addr(name: str) -> str:
    return f"{name}:7946"


@dataclass
class Harness:
    """Cores addressed by name; sends are captured and delivered only when asked."""

    s: MembershipSettings = field(default_factory=settings)
    cores: dict[str, Membership] = field(default_factory=dict)
    outbox: list[tuple[str, Send]] = field(default_factory=list)
    events: list[tuple[str, MemberEvent]] = field(default_factory=list)
    now: float = 0.0
    down: set[str] = field(default_factory=set)
    sent: list[tuple[str, Send]] = field(default_factory=list)
    # drop(src, dst) -> True drops everything from src to dst
    drop: Callable[[str, str], bool] | None = None

    def add(self, *names: str, converged: bool = True) -> None:
        for name in names:
            self.cores[name] = Membership(name, addr(name), self.s, random.Random(name),
                                          self.now)
        if converged:
            states = [MemberState(n, addr(n), 0, ALIVE, {}) for n in self.cores]
            for core in self.cores.values():
                core.restore(states, self.now)

    def take(self, name: str, out: Output) -> Output:
        self.outbox.extend((name, s) for s in out.sends)
        self.sent.extend((name, s) for s in out.sends)
        self.events.extend((name, e) for e in out.events)
        return out

    def tick(self, name: str, now: float) -> Output:
        self.now = now
        return self.take(name, self.cores[name].tick(now))

    def tick_all(self, now: float) -> None:
        for name in list(self.cores):
            if name not in self.down:
                self.tick(name, now)

    def sends_from(self, name: str) -> list[Send]:
        return [s for src, s in self.outbox if src == name]

    def deliver(self, rounds: int = 20, drop_to: set[str] | None = None) -> None:
        """Deliver everything queued (and what the replies queue), instantly."""
        for _ in range(rounds):
            if not self.outbox:
                return
            batch, self.outbox = self.outbox, []
            for src, send in batch:
                dst = send.addr.split(":")[0]
                if dst in self.down or (drop_to and dst in drop_to) or dst not in self.cores:
                    continue
                if self.drop is not None and self.drop(src, dst):
                    continue
                self.take(dst, self.cores[dst].receive(addr(src), send.msgs, self.now,
                                                       send.reliable))

    def run(self, until: float, step: float = 0.05, drop_to: set[str] | None = None) -> None:
        t = self.now
        while t < until:
            t = round(t + step, 6)
            self.tick_all(t)
            self.deliver(drop_to=drop_to)

    def member(self, observer: str, subject: str) -> Member | None:
        return self.cores[observer].members.get(subject)

    def status(self, observer: str, subject: str) -> str | None:
        m = self.member(observer, subject)
        return None if m is None else m.status

    def msgs_sent(self, src: str, kind: type, dst: str | None = None) -> list:
        """Messages of a type that src sent (to dst), main message or piggybacked."""
        return [m for o, s in self.sent if o == src and (dst is None or s.addr == addr(dst))
                for m in s.msgs if isinstance(m, kind)]

    def kinds(self, observer: str, subject: str) -> list[str]:
        return [e.kind for o, e in self.events if o == observer and e.node == subject]
