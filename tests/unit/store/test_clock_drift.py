"""Issue 11 item 13: a record stamped far in the future is refused and counted, and it does
not move our clock; one within the drift bound is merged as before."""

from __future__ import annotations

import random

from meshd.hlc import HLC
from meshd.store import crdt
from meshd.store.replication import StoreReplicator

NOW_MS = 1_700_000_000_000
TEN_MINUTES_MS = 10 * 60 * 1000


def _replica(**bound: int) -> StoreReplicator:
    hlc = HLC("b", lambda: NOW_MS, **bound)  # the default bound is 60 s
    return StoreReplicator("b", hlc, lambda: ["a"], random.Random(1), 0.0)


def _batch(wall_ms: int, key: str = "k", ack: list[int] | None = None) -> dict:
    msg = {"t": "batch", "fwd": False,
           "e": [["d", "t", key, {"lww": crdt.lww((wall_ms, 0, "a"), b"v")}]]}
    if ack:
        msg["ack"] = ack
    return msg


def test_hlc_refuses_a_timestamp_beyond_the_drift_and_keeps_its_clock():
    hlc = HLC("b", lambda: NOW_MS)
    assert hlc.observe((NOW_MS + TEN_MINUTES_MS, 3, "a")) is False
    assert hlc.now()[0] == NOW_MS, "a refused timestamp must not move the clock"
    assert hlc.observe((NOW_MS + 30_000, 3, "a")) is True
    assert hlc.now()[:2] == (NOW_MS + 30_000, 5), "one within the drift is merged"


def test_store_record_ten_minutes_ahead_is_refused_counted_and_not_acked():
    rep = _replica()
    sends = rep.receive("a", _batch(NOW_MS + TEN_MINUTES_MS, ack=[4]), 1.0)
    assert rep.state.get("d", "t", "k") is None, "the record must not be merged"
    assert rep.stats["store_future_refused"] == 1
    assert sends == [], "a replica does not acknowledge a batch it refused"
    assert rep.hlc.now()[0] == NOW_MS, "our clock did not move"
    # anti-entropy offers it again: still refused, counted again
    rep.receive("a", {"t": "fill", "e": _batch(NOW_MS + TEN_MINUTES_MS)["e"]}, 2.0)
    assert rep.state.get("d", "t", "k") is None
    assert rep.stats["store_future_refused"] == 2


def test_store_record_within_the_drift_is_merged_and_acked():
    rep = _replica()
    sends = rep.receive("a", _batch(NOW_MS + 59_000, ack=[4]), 1.0)
    assert rep.state.get("d", "t", "k")["lww"][1] == b"v"
    assert rep.stats["store_future_refused"] == 0
    assert sends == [("a", {"t": "ack", "ids": [4]})]
    assert rep.hlc.now()[0] == NOW_MS + 59_000


def test_the_bound_is_a_setting_of_the_clock():
    rep = _replica(max_drift_ms=15 * 60 * 1000)
    rep.receive("a", _batch(NOW_MS + TEN_MINUTES_MS), 1.0)
    assert rep.state.get("d", "t", "k") is not None
    assert rep.stats["store_future_refused"] == 0
