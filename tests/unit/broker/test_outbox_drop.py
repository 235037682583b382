"""A durable delivery the outbox could not send is handed back (links.Outbox.on_drop), so
the origin offers it again without counting an attempt (durable.DurableTopics.dropped)."""

from __future__ import annotations

import time
from typing import Any

import trio

from meshd.broker.links import Outbox
from meshd.transport.links import LinkError


class _Unreachable:
    """A link manager whose every dial fails (the node is cut off)."""

    def __init__(self) -> None:
        self.dials = 0

    async def open_channel(self, addr: str, name: str) -> Any:
        self.dials += 1
        raise LinkError(f"cannot reach {addr}")


async def test_a_batch_that_could_not_be_shipped_is_handed_to_on_drop():
    links = _Unreachable()
    stats = {"broker_copies_dropped": 0, "broker_batches_out": 0}
    box = Outbox("b", links, lambda node: "127.0.0.1:1", stats)  # type: ignore[arg-type]
    dropped: list[tuple[str, list[Any]]] = []
    box.on_drop = lambda node, items: dropped.append((node, items))
    item = {"t": "deliver", "ns": "default", "topic": "t", "durable": "d", "seq": 1,
            "attempt": 1, "msg": {}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run)
        await box.put(item)
        with trio.fail_after(5):
            while not dropped:
                await trio.sleep(0.01)
        box.close()
    assert dropped == [("b", [item])]
    assert links.dials == 2  # tried twice (a channel that died while idle), then gave up
    assert stats["broker_copies_dropped"] == 1


async def test_what_a_closed_outbox_still_held_is_handed_to_on_drop():
    stats = {"broker_copies_dropped": 0, "broker_batches_out": 0}
    box = Outbox("b", _Unreachable(), lambda node: None, stats)  # type: ignore[arg-type]
    dropped: list[Any] = []
    box.on_drop = lambda node, items: dropped.extend(items)
    box.close()
    assert not box.put_nowait({"t": "ack", "seqs": [1]})
    await box.put({"t": "deliver", "seq": 2})
    assert [i.get("seq", i.get("seqs")) for i in dropped] == [[1], 2]
    assert stats["broker_copies_dropped"] == 2


def test_a_delivery_that_never_left_is_offered_again_without_counting_an_attempt(tmp_path):
    from types import SimpleNamespace

    from meshd.broker.consumer import Consumer
    from meshd.broker.durable import UNSENT_DELAY, DurableTopics
    from meshd.broker.interest import InterestTable
    from meshd.broker.origin import Dead, Deliver
    from meshd.hlc import HLC
    from meshd.settings import BrokerSettings

    interest = InterestTable("o", HLC("o", lambda: 10**12, max_drift_ms=None))
    interest.merge("a", {"v": 1, "ts": [1, 0, "a"],
                         "subs": [["default", "jobs", "durable:w", 1]]})
    broker = SimpleNamespace(node="o", interest=interest, route_cost=lambda n: 1.0,
                             load=lambda n: 0.0, durable=None)
    durable = DurableTopics(broker, None, tmp_path, BrokerSettings())  # type: ignore[arg-type]
    key = ("default", "jobs", "w")
    c = Consumer(ack_wait=10.0, max_deliver=1)
    c.append(1)
    durable.origin.add(key, c)
    assert durable.origin.offer(key, 0.0) == [Deliver("a", 1, 1)]
    item = {"t": "deliver", "ns": "default", "topic": "jobs", "durable": "w", "seq": 1,
            "attempt": 1, "msg": {}}
    durable.dropped("a", [{"t": "ack", "seqs": [7]}, item])
    assert durable.stats["broker_deliveries_unsent"] == 1
    # offered again at attempt 1 once due: max_deliver 1 is not spent by the unsent one
    now = time.time() + UNSENT_DELAY + 1  # (durable delivery runs on the wall clock)
    assert durable.origin.offer(key, now) == [Deliver("a", 1, 1)]
    durable.dropped("b", [item])  # never given to b: nothing happens
    assert durable.origin.offer(key, now + 100)[0] == Dead(1, 1, "not acked after 1 deliveries")
