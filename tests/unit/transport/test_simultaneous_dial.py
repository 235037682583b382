"""Two nodes dialing each other at once: both keep the link dialed by the lower node id, and
the loser must not take down a channel the peer opened on it before it saw the winner (its
OPEN was already on the wire). Seen as a tunnel connection reset on a loaded CI run.

Rules checked: the loser stays open while a channel on it lives and closes when the last one
ends; an idle loser closes after DRAIN_GRACE, never at once and never never."""

from __future__ import annotations

import trio

from meshd.transport.links import DRAIN_GRACE, OPEN, Channel, Link

from .mesh import GUARD, Echo, Mesh, Node, wait_for


async def ordered(mesh: Mesh) -> tuple[Node, Node]:
    """(low, high): two nodes, `low` with the lower node id (its dial wins)."""
    x, y = await mesh.add("x"), await mesh.add("y")
    if x.manager.identity.node_id > y.manager.identity.node_id:
        x, y = y, x
    return x, y


def the_link(node: Node, peer: Node, initiator: Node) -> Link:
    """`node`'s end of the link to `peer` dialed by `initiator`."""
    want = initiator.manager.identity.node_id
    [link] = [lk for lk in node.manager.live if lk.peer_public == peer.key
              and lk.initiator_id == want]
    return link


def open_on_wire(link: Link, name: str) -> Channel:
    """Open a channel on `link` as a node does before it learns the link lost: the OPEN goes
    out even though this end may already count the link as draining."""
    ch = Channel(link, link._next_id, name)
    link._next_id += 2
    link.channels[ch.id] = ch
    link.queue_frame(OPEN, ch.id, name.encode())
    return ch


async def test_a_channel_opened_on_the_losing_link_is_served_to_its_end(mesh: Mesh) -> None:
    low, high = await ordered(mesh)
    echo = Echo()
    low.manager.handlers["echo"] = echo
    lost = await high.manager.connect(low.addr)  # high dials first: this link will lose
    await wait_for(lambda: any(lk.peer_public == high.key for lk in low.manager.live),
                   "low accepted high's link")
    won = await low.manager._dial(high.addr)  # low dials too: its link wins on both ends
    assert low.manager.links[high.addr] is won
    at_low = the_link(low, high, high)
    assert at_low.draining and not at_low.closed

    ch = open_on_wire(lost, "echo")  # high had opened it before it saw low's link
    with trio.fail_after(GUARD):
        await ch.send(b"on the losing link")
        assert await ch.receive() == b"on the losing link"
    assert echo.received == [b"on the losing link"]
    await trio.sleep(DRAIN_GRACE + 0.5)  # a live channel keeps the loser past its grace
    assert not at_low.closed
    with trio.fail_after(GUARD):
        await ch.send(b"still served")
        assert await ch.receive() == b"still served"
    await ch.aclose()
    await wait_for(lambda: at_low.closed and lost.closed,
                   "the loser closes with its last channel")
    assert not won.closed


async def test_an_idle_losing_link_closes_after_the_grace_on_both_ends(mesh: Mesh) -> None:
    low, high = await ordered(mesh)
    lost = await high.manager.connect(low.addr)
    await wait_for(lambda: any(lk.peer_public == high.key for lk in low.manager.live),
                   "low accepted high's link")
    started = trio.current_time()
    won = await low.manager._dial(high.addr)
    await wait_for(lambda: lost.closed, "the idle loser closes", guard=DRAIN_GRACE + GUARD)
    assert trio.current_time() - started >= DRAIN_GRACE * 0.9  # not at once
    assert not won.closed and high.manager.links[low.addr].initiator_id == \
        low.manager.identity.node_id


async def test_a_new_link_that_loses_at_once_still_closes_when_idle(mesh: Mesh) -> None:
    # the accepted link that loses is registered before it runs: its grace starts with it
    low, high = await ordered(mesh)
    won = await low.manager.connect(high.addr)
    await wait_for(lambda: any(lk.peer_public == low.key for lk in high.manager.live),
                   "high accepted low's link")
    lost = await high.manager._dial(low.addr)  # high's own dial loses on both ends
    await wait_for(lambda: lost.closed, "the idle new loser closes",
                   guard=DRAIN_GRACE + GUARD)
    assert not won.closed
    assert sum(1 for lk in low.manager.live if not lk.closed) == 1


async def test_draining_a_link_whose_tasks_ended_does_nothing(mesh: Mesh) -> None:
    # a link can be ending (its nursery closed, `closed` not set yet) when another task
    # drains it: that must not raise into that task (it took a daemon down once)
    low, high = await ordered(mesh)
    link = await high.manager.connect(low.addr)
    await link.aclose()
    await wait_for(lambda: link not in high.manager.live, "the link ended")
    assert link._nursery is not None and link._nursery._closed  # its tasks are over
    link.closed = False  # the moment between its nursery's end and _mark_closed
    for grace in (DRAIN_GRACE, 0.0):
        link.close_when_idle_after(grace)
    assert link._drain_grace == 0.0
