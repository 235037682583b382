"""Simulated network: per-link latency with jitter, loss, egress bandwidth and partitions.

Rules:
- Nodes sit in zones; a link's parameters come from the zone pair (`links` overrides) or the
  network defaults. Latency is one-way: base + a jitter draw (uniform, normal or exponential).
- A datagram is lost with the link's loss probability. A stream message is never lost but
  each lost segment costs a retransmission timeout (200 ms, doubling); past `stream_timeout`
  the stream fails. Opening a stream costs one round trip.
- Each node's egress is a queue at the link bandwidth (bytes/s), if one is set.
- Nodes in different partition groups cannot reach each other, in either direction. Cuts
  may also be one-way: `blocked` holds (src, dst) pairs that cannot send (sim/nemesis.py
  builds its halves, islands, one-way cuts and bridges from them).
- Gateways: in a zone marked `restricted`, only its gateway nodes reach other zones (the
  others sit behind NAT or a firewall); both ends of a cross-zone packet must be allowed.
- All randomness comes from the one `random.Random` handed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

JITTER_KINDS = ("uniform", "normal", "exponential")


@dataclass(slots=True)
class Link:
    latency: float = 0.0005  # one-way, seconds
    jitter: float = 0.0001  # scale of the jitter draw, seconds
    jitter_kind: str = "uniform"
    loss: float = 0.0  # probability a datagram is dropped
    bandwidth: float = 0.0  # bytes/s at the sender's egress; 0 = unlimited


class Network:
    def __init__(self, default: Link, rng: random.Random, stream_timeout: float = 10.0) -> None:
        self.default = default
        self.rng = rng
        self.stream_timeout = stream_timeout
        self.zone_of: list[int] = []
        self.links: dict[tuple[int, int], Link] = {}
        self.group_of: list[int] | None = None
        self.egress_free: list[float] = []
        self.gateway: list[bool] = []
        self.restricted: set[int] = set()  # zones where only gateways reach out
        self.blocked: frozenset[tuple[int, int]] = frozenset()  # (src, dst) that cannot send

    def add_node(self, zone: int = 0, gateway: bool = False) -> None:
        self.zone_of.append(zone)
        self.egress_free.append(0.0)
        self.gateway.append(gateway)

    def reachable(self, src: int, dst: int) -> bool:
        """Whether src can reach dst at all right now (partitions, gateway rules)."""
        if self.group_of is not None and self.group_of[src] != self.group_of[dst]:
            return False
        if self.blocked and (src, dst) in self.blocked:
            return False
        zs, zd = self.zone_of[src], self.zone_of[dst]
        if zs == zd or not self.restricted:
            return True
        return (zs not in self.restricted or self.gateway[src]) and \
            (zd not in self.restricted or self.gateway[dst])

    def mean_latency(self, src: int, dst: int) -> float:
        """Expected one-way latency of src -> dst (base plus the jitter draw's mean)."""
        link = self.link(src, dst)
        mean_jitter = {"uniform": 0.5, "normal": 0.7978845608, "exponential": 1.0}
        return link.latency + link.jitter * mean_jitter[link.jitter_kind]

    def link(self, src: int, dst: int) -> Link:
        if not self.links:
            return self.default
        return self.links.get((self.zone_of[src], self.zone_of[dst]), self.default)

    def partitioned(self, src: int, dst: int) -> bool:
        groups = self.group_of
        return groups is not None and groups[src] != groups[dst]

    def _latency(self, link: Link) -> float:
        jitter = link.jitter
        if jitter <= 0:
            return link.latency
        kind = link.jitter_kind
        if kind == "uniform":
            return link.latency + self.rng.random() * jitter
        if kind == "normal":
            return link.latency + abs(self.rng.gauss(0.0, jitter))
        return link.latency + self.rng.expovariate(1.0 / jitter)

    def delivery_time(self, src: int, dst: int, size: int, now: float,
                      reliable: bool, connect: bool = True) -> float | None:
        """When a message sent now arrives, or None if it never does."""
        groups = self.group_of
        if groups is not None and groups[src] != groups[dst]:
            return None
        if self.blocked and (src, dst) in self.blocked:
            return None
        if self.restricted and not self.reachable(src, dst):
            return None
        link = self.link(src, dst) if self.links else self.default
        start = now
        if link.bandwidth > 0:
            start = max(now, self.egress_free[src])
            self.egress_free[src] = start + size / link.bandwidth
            start = self.egress_free[src]
        if not reliable:
            if link.loss > 0 and self.rng.random() < link.loss:
                return None
            if link.jitter > 0 and link.jitter_kind == "uniform":  # _latency, inlined
                return start + (link.latency + self.rng.random() * link.jitter)
            return start + self._latency(link)
        # stream: a connection setup round trip (unless it rides an open link), then
        # retransmissions on loss
        arrive = start + self._latency(link)
        if connect:
            arrive += 2 * self._latency(link)
        rto = 0.2
        while link.loss > 0 and self.rng.random() < link.loss:
            arrive += rto
            rto *= 2
            if arrive - now > self.stream_timeout:
                return None
        return arrive
