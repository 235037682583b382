"""A core subscriber's inbox and its full-buffer policies (meshd/broker/inbox.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshd.broker.inbox import EndOfInbox, Inbox


async def drain(box: Inbox) -> list[int]:
    out = []
    while len(box):
        out.append(await box.get())
    return out


async def test_drop_oldest_keeps_the_newest_and_counts():
    box = Inbox(3, "drop-oldest")
    for i in range(5):
        assert await box.deliver(i)
    assert await drain(box) == [2, 3, 4]
    assert (box.dropped, box.delivered) == (2, 5)


async def test_drop_newest_keeps_an_unbroken_prefix_and_counts():
    box = Inbox(3, "drop-newest")
    results = [await box.deliver(i) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert await drain(box) == [0, 1, 2]
    assert (box.dropped, box.delivered) == (2, 3)


async def test_block_holds_the_deliverer_until_the_reader_makes_room_and_loses_nothing():
    box = Inbox(2, "block")
    sent: list[int] = []

    async def producer() -> None:
        for i in range(6):
            await box.deliver(i)
            sent.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [0, 1], "the third delivery waits for room"
        got = []
        for _ in range(6):
            got.append(await box.get())
    assert got == list(range(6)) and box.dropped == 0


async def test_close_releases_a_blocked_deliverer_and_ends_the_reader_after_what_is_left():
    box = Inbox(1, "block")
    await box.deliver("a")
    outcome: list[bool] = []

    async def late() -> None:
        outcome.append(await box.deliver("b"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert outcome == [False] and box.dropped == 1
    assert await box.get() == "a"
    with pytest.raises(EndOfInbox):
        await box.get()
    assert not await box.deliver("c") and box.dropped == 2


async def test_a_waiting_reader_wakes_for_the_next_item():
    box = Inbox(4)
    got: list[str] = []

    async def reader() -> None:
        got.append(await box.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await box.deliver("x")
    assert got == ["x"]


def test_bad_inboxes_are_refused():
    with pytest.raises(ValueError):
        Inbox(0)
    with pytest.raises(ValueError):
        Inbox(1, "drop-some")  # type: ignore[arg-type]
