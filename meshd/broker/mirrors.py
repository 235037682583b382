"""Replicas of durable topics (`--replicas N`): copies of an origin's log on other nodes,
and which replica delivers them while the origin is down.

Theory of operation (docs/broker.md "Replicas"):
- An origin that appends a message to a topic with `replicas` N > 1 sends it to N-1 other
  live nodes (nearest by route, then by name: `choose`), each of which stores it in its own
  broker.db at the origin's number, under the log namespace `~ORIGIN~NS` (no namespace can
  contain "~"), and answers "replicated" once committed. The publish is acknowledged when
  N-1 replicas answered, or fails with 408 after `replica_timeout` seconds (the message is
  on disk at the origin and will be delivered; fewer nodes hold it).
- The origin also sends its durable subscribers' state ("mirror-state") to the replicas as
  it saves it, so a replica knows what was acked.
- Takeover: when the origin is declared dead or left, the first live node (by name) of the
  replica set it used takes over: it delivers the copy to the durable subscribers, from
  their mirrored state (so it repeats at most what was acked since the last state the
  origin sent). When the origin is back, the replica stops and sends what was acked
  meanwhile ("absorb", sent again every second until the origin confirms "absorbed", for
  a minute), so the origin does not deliver it again.
- A replica set is remembered per (origin, namespace, topic) from the items that name it;
  a replica restarted since knows none and then takes over only for origins it holds
  copies of with no set known (possibly together with another replica: at-least-once
  delivery allows the duplicates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from .origin import log_of, mirror_ns

__all__ = ["ReplicaWaits", "check_item", "choose", "log_of", "mirror_ns", "taker"]

class ReplicaWaits:
    """Publishes waiting for their replicas' answers."""

    def __init__(self) -> None:
        self._waits: dict[tuple[str, str, int], tuple[set[str], set[str], trio.Event]] = {}

    async def wait(self, key: tuple[str, str, int], nodes: list[str], timeout: float
                   ) -> int:
        """How many of `nodes` answered within `timeout` seconds (all: returns at once
        when the last one does)."""
        done = trio.Event()
        got: set[str] = set()
        self._waits[key] = (set(nodes), got, done)
        try:
            with trio.move_on_after(timeout):
                await done.wait()
            return len(got)
        finally:
            self._waits.pop(key, None)

    def answered(self, key: tuple[str, str, int], node: str) -> None:
        found = self._waits.get(key)
        if found is None:
            return
        expected, got, done = found
        if node in expected:
            got.add(node)
            if got >= expected:
                done.set()


def choose(me: str, n: int, live: list[str], cost: Callable[[str], float | None]) -> list[str]:
    """The n other nodes that hold copies: reachable live nodes, nearest first, then by
    name (every origin with the same view picks the same)."""
    ranked = sorted((c, name) for name in live if name != me
                    and (c := cost(name)) is not None)
    return [name for _, name in ranked[:n]]


def taker(replica_set: list[str] | None, me: str, alive: Callable[[str], bool]) -> bool:
    """Whether we deliver a dead origin's copy: the first live node of its replica set by
    name (unknown set: we do)."""
    if not replica_set:
        return True
    for name in sorted(replica_set):
        if name == me or alive(name):
            return name == me
    return True


def check_item(item: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields a replica item needs, checked (ValueError saying which is wrong)."""
    seq = item.get("seq")
    if kind in ("replicate", "replicated") and (type(seq) is not int or seq < 1):
        raise ValueError(f"{kind} without a sequence number")
    if kind == "replicate":
        at, nb, nodes = item.get("published_at"), item.get("not_before"), item.get("set")
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise ValueError("replicate without published_at")
        if nb is not None and (not isinstance(nb, int | float) or isinstance(nb, bool)):
            raise ValueError("replicate with a bad not_before")
        if not isinstance(nodes, list) or len(nodes) > 16 \
                or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in nodes):
            raise ValueError("replicate with a bad replica set")
    if kind in ("mirror-state", "absorb") and not isinstance(item.get("state"), dict):
        raise ValueError(f"{kind} without a state")
    return item
