"""Issue 11 item 13 for the registry: an entry stamped far in the future is refused and
counted, and does not move our clock; one within the drift bound is applied."""

from __future__ import annotations

import random

from meshd.hlc import HLC
from meshd.registry.core import Entry
from meshd.registry.replication import Replicator

NOW_MS = 1_700_000_000_000


def _replicator() -> Replicator:
    return Replicator("b", HLC("b", lambda: NOW_MS), lambda: ["a"], random.Random(1), 0.0)


def _delta(wall_ms: int, key: str) -> dict:
    return {"t": "delta", "entries": [Entry(key, (wall_ms, 0, "a"), "boot", {"x": 1}).to_wire()]}


def test_registry_entry_ten_minutes_ahead_is_refused_and_counted():
    rep = _replicator()
    rep.receive("a", _delta(NOW_MS + 10 * 60 * 1000, "a/svc-1"), 1.0)
    assert "a/svc-1" not in rep.state.entries
    assert rep.stats["registry_future_refused"] == 1
    assert rep.hlc.now()[0] == NOW_MS, "our clock did not move"


def test_registry_entry_within_the_drift_is_applied():
    rep = _replicator()
    rep.receive("a", _delta(NOW_MS + 30_000, "a/svc-1"), 1.0)
    assert rep.state.entries["a/svc-1"].value == {"x": 1}
    assert rep.stats["registry_future_refused"] == 0
    assert rep.hlc.now()[0] == NOW_MS + 30_000
