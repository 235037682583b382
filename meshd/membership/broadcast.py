"""Broadcast queue: membership changes waiting to be piggybacked or gossiped.

Rules (memberlist's TransmitLimitedQueue):
- One pending broadcast per node: a newer message about a node replaces the older one.
- Each broadcast is sent at most `limit` times (retransmit_mult * ceil(log10(N+1))).
- Packets take the least-sent broadcasts first and, among equals, the newest first, so a
  fresh change spreads fast and an old one does not starve new ones.
- A broadcast goes into a packet only if it fits the remaining byte budget.
- News a node has no use for about itself (an alive message, queued with for_subject=False)
  is not put in packets to that node: it would spend one of the broadcast's few
  transmissions on the one node that already knows. Suspicions do go to their subject
  (that is how it refutes).
"""

from __future__ import annotations

from typing import Any

# CBOR array header bytes an item costs inside a packet on top of its own encoding.
ITEM_OVERHEAD = 2


class _Pending:
    __slots__ = ("for_subject", "key", "msg", "seq", "size", "transmits")

    def __init__(self, key: str, msg: Any, size: int, seq: int, for_subject: bool) -> None:
        self.key = key
        self.for_subject = for_subject
        self.msg = msg
        self.size = size
        self.seq = seq
        self.transmits = 0


def _newest_first(p: _Pending) -> int:
    return -p.seq


class BroadcastQueue:
    """Pending broadcasts grouped in tiers by how often they were sent."""

    __slots__ = ("_by_key", "_seq", "_tiers")

    def __init__(self) -> None:
        self._by_key: dict[str, _Pending] = {}
        self._tiers: dict[int, dict[int, _Pending]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def queue(self, key: str, msg: Any, size: int, for_subject: bool = True) -> None:
        """Queue `msg` about node `key`, replacing any older broadcast about it."""
        old = self._by_key.pop(key, None)
        if old is not None:
            self._remove_from_tier(old)
        self._seq += 1
        pending = _Pending(key, msg, size, self._seq, for_subject)
        self._by_key[key] = pending
        self._tiers.setdefault(0, {})[pending.seq] = pending

    def take(self, budget: int, limit: int, to: str | None = None) -> list[Any]:
        """Messages that fit in `budget` bytes for a packet to node `to`; each taken message
        counts one transmit."""
        if not self._by_key:
            return []
        taken: list[_Pending] = []
        for tier in sorted(self._tiers):
            tier_items = self._tiers[tier]
            ordered = reversed(tier_items.values()) if len(tier_items) < 2 else sorted(
                tier_items.values(), key=_newest_first)
            for pending in ordered:
                if pending.key == to and not pending.for_subject:
                    continue
                cost = pending.size + ITEM_OVERHEAD
                if cost <= budget:
                    budget -= cost
                    taken.append(pending)
                    if budget <= ITEM_OVERHEAD:
                        break
            if budget <= ITEM_OVERHEAD:
                break
        for pending in taken:
            self._remove_from_tier(pending)
            pending.transmits += 1
            if pending.transmits >= limit:
                del self._by_key[pending.key]
            else:
                self._tiers.setdefault(pending.transmits, {})[pending.seq] = pending
        return [p.msg for p in taken]

    def drop(self, key: str) -> None:
        """Forget any pending broadcast about `key`."""
        old = self._by_key.pop(key, None)
        if old is not None:
            self._remove_from_tier(old)

    def _remove_from_tier(self, pending: _Pending) -> None:
        tier = self._tiers[pending.transmits]
        del tier[pending.seq]
        if not tier:
            del self._tiers[pending.transmits]
