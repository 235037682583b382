"""A delete survives a partition shorter than the tombstone grace; past it, it may not."""

from __future__ import annotations

import random

from meshd.hlc import HLC
from meshd.store import crdt
from meshd.store.replication import StoreReplicator


def scenario(partition_s: float, grace_s: float) -> bytes | None:
    clock = {"ms": 0}
    names = ["a", "b"]
    cut = {"on": False}
    reps = {n: StoreReplicator(n, HLC(n, lambda: clock["ms"]),
                               lambda n=n: [] if cut["on"] else [x for x in names if x != n],
                               random.Random(n), 0.0, sync_interval=5.0,
                               tombstone_grace=grace_s) for n in names}

    def deliver(src, sends):
        queue = [(src, a, m) for a, m in sends]
        while queue:
            s, dst, msg = queue.pop(0)
            if cut["on"]:
                continue
            queue += [(dst, x, m) for x, m in reps[dst].receive(s, msg, 0.0)]

    def advance(seconds):
        for _ in range(int(seconds)):
            clock["ms"] += 1000
            t = clock["ms"] / 1000
            for n, r in reps.items():
                deliver(n, r.tick(t))

    reps["a"].local("d", "t", "k", {"lww": crdt.lww(reps["a"].hlc.now(), b"old")}, 0.0)
    advance(2)
    assert reps["b"].state.get("d", "t", "k")["lww"][1] == b"old"
    cut["on"] = True
    reps["a"].local("d", "t", "k", {"lww": crdt.lww(reps["a"].hlc.now(), None)}, 0.0)
    advance(partition_s)
    cut["on"] = False
    advance(30)
    states = [r.state.get("d", "t", "k") for r in reps.values()]
    values = {None if s is None else s["lww"][1] for s in states}
    assert len(values) == 1, "replicas must agree either way"
    return values.pop()


def test_delete_survives_a_partition_shorter_than_the_grace():
    assert scenario(partition_s=20, grace_s=60) is None


def test_past_the_grace_the_deleted_value_comes_back():
    # the tombstone was collected on `a` while `b` was cut off; when b returns, its old
    # copy is the only version left and spreads again: set the grace above the longest
    # partition you must survive (default 24 h)
    assert scenario(partition_s=120, grace_s=60) == b"old"
