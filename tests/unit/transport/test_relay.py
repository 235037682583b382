"""Relay channels and routed links, in process: several LinkManagers on loopback, a fake
routing table (tests/unit/transport/mesh.py), no namespaces and no root needed."""

from __future__ import annotations

import itertools
import os

import pytest
import trio

from meshd import wire
from meshd.transport.links import (
    CHUNK,
    MAX_HOPS,
    RELAY,
    WINDOW_BYTES,
    Channel,
    ChannelClosed,
    LinkError,
)

from .mesh import GUARD, Echo, Mesh, Node, RelayTap, open_channels, relay_tasks, wait_for


async def line(mesh: Mesh, *names: str) -> list[Node]:
    """Nodes in a chain: the first reaches the last through every node in between."""
    nodes = [await mesh.add(name) for name in names]
    dest = nodes[-1]
    mesh.routes[nodes[0].name][dest.addr] = (nodes[1].addr, dest.name)
    for hop, onward in itertools.pairwise(nodes[1:]):
        mesh.next_hops[hop.name][dest.name] = onward.addr
    return nodes


async def round_trip(ch: Channel, message: bytes) -> None:
    with trio.fail_after(GUARD):
        await ch.send(message)
        assert await ch.receive() == message


async def assert_still_serves(src: Node, dst: Node) -> None:
    """dst still answers channels from src (what a dropped relay must not break)."""
    echo = Echo()
    dst.manager.handlers["still"] = echo
    async with await src.manager.open_channel(dst.addr, "still") as ch:
        await round_trip(ch, b"still serving")
    assert echo.received == [b"still serving"]


async def test_relayed_link_carries_channels_both_ways_and_the_relay_sees_only_ciphertext(
        mesh: Mesh) -> None:
    a, b, c = await line(mesh, "a", "b", "c")
    at_c, at_a, at_b = Echo(), Echo(), Echo()
    c.manager.handlers["echo"] = at_c
    a.manager.handlers["echo"] = at_a
    b.manager.handlers["echo"] = at_b  # the relay has the service too: it must not get it
    tap = RelayTap(b)
    marker = b"PLAINTEXT-" + os.urandom(8).hex().encode()
    sent = [marker, marker * 100, b"x" + marker * 2000]  # one frame, one frame, several

    async with await a.manager.open_channel(c.addr, "echo") as ch:
        assert ch.link.relayed
        assert a.manager.links[c.addr] is ch.link
        assert ch.peer_public == c.key
        for message in sent:
            await round_trip(ch, message)
        # C answers back over the same relayed link (it files it under A's address)
        async with await c.manager.open_channel(a.addr, "echo") as back:
            assert back.link.relayed
            assert back.peer_public == a.key
            await round_trip(back, marker + b"-back")

    assert at_c.received == sent
    assert at_a.received == [marker + b"-back"]
    served = at_c.calls[0]
    assert served.link.relayed
    assert served.peer_public == a.key and served.peer_node == "a"
    assert a.stats["links_relayed"] == 1
    assert b.stats["relay_sessions"] == 1
    assert c.stats["relay_sessions"] == 0
    # B carried every byte of it (so the tap saw the traffic) but never the plaintext
    plaintext = 2 * sum(map(len, sent)) + 2 * len(marker + b"-back")
    assert tap.total > plaintext
    assert not any(marker in part for part in tap.carried)
    assert marker not in b"".join(tap.carried)
    assert at_b.calls == []


async def test_two_relays_carry_a_link_end_to_end(mesh: Mesh) -> None:
    a, b, c, d = await line(mesh, "a", "b", "c", "d")
    at_d, at_b, at_c = Echo(), Echo(), Echo()
    d.manager.handlers["echo"] = at_d
    b.manager.handlers["echo"] = at_b
    c.manager.handlers["echo"] = at_c
    tap_b, tap_c = RelayTap(b), RelayTap(c)
    marker = b"TWO-HOPS-" + os.urandom(8).hex().encode()
    async with await a.manager.open_channel(d.addr, "echo") as ch:
        assert ch.link.relayed and ch.peer_public == d.key
        await round_trip(ch, marker)
    assert at_d.received == [marker]
    assert at_d.calls[0].peer_node == "a"
    assert (b.stats["relay_sessions"], c.stats["relay_sessions"]) == (1, 1)
    assert at_b.calls == at_c.calls == []
    for tap in (tap_b, tap_c):
        assert tap.total > 2 * len(marker)
        assert marker not in b"".join(tap.carried)


async def test_hop_limit_stops_a_routing_loop_without_hanging_or_leaking(mesh: Mesh) -> None:
    a, b, c, d = await line(mesh, "a", "b", "c", "d")
    mesh.next_hops["c"]["d"] = b.addr  # B sends D's traffic to C, C back to B
    at_d = Echo()
    d.manager.handlers["echo"] = at_d
    with trio.fail_after(GUARD), pytest.raises(LinkError) as failed:
        await a.manager.connect(d.addr)
    # the loop was cut by the hop budget, not by the handshake timeout
    assert "did not answer" not in str(failed.value)
    assert str(failed.value) == "connection closed by peer"
    assert b.stats["relay_sessions"] + c.stats["relay_sessions"] == MAX_HOPS - 1
    assert d.stats["links_accepted"] == 0 and at_d.calls == []
    assert d.addr not in a.manager.links
    # every relay channel and pump of the loop ends
    await wait_for(lambda: not relay_tasks() and open_channels(a, b, c, d) == 0,
                   "the looped relay channels and their pumps end")
    await assert_still_serves(a, b)
    await assert_still_serves(b, c)


async def test_a_relay_does_not_honour_a_hop_budget_above_max_hops(mesh: Mesh) -> None:
    a, b, c, _ = await line(mesh, "a", "b", "c", "d")
    mesh.next_hops["c"]["d"] = b.addr  # a routing loop between B and C
    async with await a.manager.open_channel(b.addr, RELAY) as ch:
        await ch.send(wire.dumps({"dest": "d", "hops": 64}))
        with trio.fail_after(GUARD), pytest.raises(ChannelClosed):
            await ch.receive()  # the looped chain collapses back to us
    assert b.stats["relay_sessions"] + c.stats["relay_sessions"] <= MAX_HOPS - 1


@pytest.mark.parametrize("unset", [False, True], ids=["no-route-for-dest", "no-route-hook"])
async def test_a_relay_without_a_route_drops_the_relay_and_the_dial_fails_cleanly(
        mesh: Mesh, unset: bool) -> None:
    a, b, c = await line(mesh, "a", "b", "c")
    if unset:
        b.manager.next_hop_for = None
    else:
        del mesh.next_hops["b"]["c"]
    with trio.fail_after(GUARD), pytest.raises(LinkError, match="connection closed by peer"):
        await a.manager.connect(c.addr)
    assert b.stats["relay_sessions"] == 0
    assert b.stats["channel_handler_errors"] == 0
    assert c.stats["links_accepted"] == 0
    assert c.addr not in a.manager.links
    await wait_for(lambda: open_channels(a, b) == 0 and not relay_tasks(),
                   "the dropped relay channel ends at both ends")
    await assert_still_serves(a, b)
    # with a route again, the same relay carries the link
    mesh.next_hops["b"]["c"] = c.addr
    b.manager.next_hop_for = lambda dest: mesh.next_hops["b"].get(dest)
    c.manager.handlers["echo"] = Echo()
    async with await a.manager.open_channel(c.addr, "echo") as ch:
        assert ch.link.relayed
        await round_trip(ch, b"routed now")
    assert b.stats["relay_sessions"] == 1


BAD_HEADERS = {
    "not-cbor": b"\xff\xfe\xfd not cbor",
    "empty": b"",
    "truncated": wire.dumps({"dest": "c", "hops": 3})[:-2],
    "a-list": wire.dumps(["c", 3]),
    "a-string": wire.dumps("c"),
    "null": wire.dumps(None),
    "dest-not-a-string": wire.dumps({"dest": 5, "hops": 3}),
    "dest-null": wire.dumps({"dest": None, "hops": 3}),
    "hops-a-string": wire.dumps({"dest": "c", "hops": "3"}),
    "hops-a-float": wire.dumps({"dest": "c", "hops": 3.0}),
    "no-hops": wire.dumps({"dest": "c"}),
    "no-dest": wire.dumps({"hops": 3}),
    "too-deep": wire.dumps({"dest": "c", "hops": 3, "x": [[[[[[1]]]]]]}),
    "over-1-KiB": wire.dumps({"dest": "c" * 2000, "hops": 3}),
    "huge": wire.dumps({"dest": "c", "hops": 3, "pad": b"\0" * (3 << 20)}),
    "cbor-tag": bytes([0xC1, 0x1A, 0, 0, 0, 1]),  # tag 1 (epoch date) refused by wire
}


@pytest.mark.parametrize("header", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
async def test_a_malformed_relay_header_is_dropped_without_harming_the_relay(
        mesh: Mesh, header: bytes) -> None:
    a, b, c = await line(mesh, "a", "b", "c")
    # B would forward anything that passed its checks (so a check that let one through
    # would show as a relay session)
    b.manager.next_hop_for = lambda dest: c.addr
    c.manager.handlers["echo"] = Echo()
    link = await a.manager.connect(b.addr)
    async with await a.manager.open_channel(b.addr, RELAY) as ch:
        await ch.send(header)
        with trio.fail_after(GUARD), pytest.raises(ChannelClosed):
            await ch.receive()  # B closed the channel: the relay was dropped
    assert b.stats["relay_sessions"] == 0
    assert b.stats["channel_handler_errors"] == 0  # dropped by its checks, not by a crash
    assert b.stats["links_dropped_bad_frames"] == 0
    assert c.stats["links_accepted"] == 0
    assert not link.closed and a.manager.links[b.addr] is link
    await assert_still_serves(a, b)
    assert a.manager.links[b.addr] is link  # the same link carried on
    # and B still relays a proper link
    async with await a.manager.open_channel(c.addr, "echo") as routed:
        assert routed.link.relayed
        await round_trip(routed, b"after the bad header")
    assert b.stats["relay_sessions"] == 1


async def test_large_messages_cross_a_relay_intact_on_parallel_channels(mesh: Mesh) -> None:
    a, b, c = await line(mesh, "a", "b", "c")
    c.manager.handlers["echo"] = Echo()
    messages = [os.urandom(5 << 20) for _ in range(3)]
    links = set()

    async def one(message: bytes) -> None:
        async with await a.manager.open_channel(c.addr, "echo") as ch:
            links.add(ch.link)
            await ch.send(message)
            assert await ch.receive() == message

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for message in messages:
                nursery.start_soon(one, message)
    assert len(links) == 1 and next(iter(links)).relayed
    assert b.stats["relay_sessions"] == 1


async def test_a_slow_reader_across_a_relay_stops_its_writer_at_the_window(
        mesh: Mesh) -> None:
    """Flow control holds end to end: the writer stops when the far reader's window is full
    (the relay does not soak up the rest), other channels on the relayed link still flow,
    and everything arrives in order once the reader reads."""
    a, b, c = await line(mesh, "a", "b", "c")
    go = trio.Event()
    got: list[bytes] = []
    done = trio.Event()

    async def slow(ch: Channel) -> None:
        await go.wait()
        for _ in range(6):
            got.append(await ch.receive())
        done.set()

    c.manager.handlers["slow"] = slow
    c.manager.handlers["echo"] = Echo()
    messages = [bytes([i]) * (1 << 20) for i in range(6)]
    sent = 0

    async def writer(ch: Channel) -> None:
        nonlocal sent
        for message in messages:
            await ch.send(message)
            sent += 1

    ch = await a.manager.open_channel(c.addr, "slow")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, ch)
        # 4 MiB window: four 1 MiB messages go, the fifth waits for window
        await wait_for(lambda: sent == WINDOW_BYTES >> 20 and ch._send_window < CHUNK,
                       "the writer used up the reader's window")
        assert b.manager.buffered < WINDOW_BYTES  # the relay holds no backlog
        async with await a.manager.open_channel(c.addr, "echo") as other:
            assert other.link is ch.link
            await round_trip(other, b"not blocked by the slow channel")
        assert sent == WINDOW_BYTES >> 20  # still waiting: nothing was granted
        go.set()
        with trio.fail_after(GUARD):
            await done.wait()
    assert got == messages
    await ch.aclose()


async def test_a_relay_hop_dying_ends_the_link_at_both_ends_and_a_redial_goes_around(
        mesh: Mesh) -> None:
    a, b, c = await line(mesh, "a", "b", "c")
    b2 = await mesh.add("b2")
    mesh.next_hops["b2"]["c"] = c.addr
    ended = trio.Event()
    at_c = Echo()

    async def echo_until_closed(ch: Channel) -> None:
        try:
            await at_c(ch)
        finally:
            ended.set()

    c.manager.handlers["echo"] = echo_until_closed
    ch = await a.manager.open_channel(c.addr, "echo")
    await round_trip(ch, b"before")
    old = ch.link
    served = at_c.calls[0]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mesh.kill, b)
            with pytest.raises(ChannelClosed):
                await ch.receive()  # A's end
            await ended.wait()  # C's end: its handler's receive raised ChannelClosed
    assert old.closed and served.link.closed
    with pytest.raises(ChannelClosed):
        await ch.send(b"after")
    with pytest.raises(ChannelClosed):
        await served.send(b"after")
    assert c.addr not in a.manager.links
    # the routes now go through B2: the next channel is carried by a new relayed link
    mesh.routes["a"][c.addr] = (b2.addr, "c")
    ended = trio.Event()
    async with await a.manager.open_channel(c.addr, "echo") as again:
        assert again.link.relayed and again.link is not old
        await round_trip(again, b"around")
    assert b2.stats["relay_sessions"] == 1
    assert at_c.received == [b"before", b"around"]


async def switch_to_route(mesh: Mesh) -> tuple[Node, Node, Node, Echo]:
    """A, B, C with C reached directly; the caller then makes A's routes go through B."""
    a, b, c = [await mesh.add(name) for name in ("a", "b", "c")]
    mesh.next_hops["b"]["c"] = c.addr
    at_c = Echo()
    c.manager.handlers["echo"] = at_c
    return a, b, c, at_c


async def test_a_route_through_a_relay_replaces_the_direct_link_and_back(mesh: Mesh) -> None:
    a, b, c, at_c = await switch_to_route(mesh)
    direct = await a.manager.connect(c.addr)
    assert not direct.relayed
    old = await direct.open_channel("echo")  # a call in flight when the routes change
    await round_trip(old, b"direct")

    mesh.routes["a"][c.addr] = (b.addr, "c")
    relayed = await a.manager.connect(c.addr)
    assert relayed.relayed and relayed is not direct
    assert direct.draining and direct not in a.manager.links.values()
    assert a.manager.links[c.addr] is relayed
    assert b.stats["relay_sessions"] == 1
    ch = await a.manager.open_channel(c.addr, "echo")
    assert ch.link is relayed
    await round_trip(ch, b"relayed")
    await round_trip(old, b"the old call finishes on the old link")
    await old.aclose()
    await wait_for(lambda: direct.closed, "the drained direct link closes with its last channel")

    # the routes go direct again: once the relayed link is gone, connect dials directly
    del mesh.routes["a"][c.addr]
    await relayed.aclose()
    again = await a.manager.connect(c.addr)
    assert not again.relayed and again is not direct and again is not relayed
    async with await again.open_channel("echo") as ch2:
        await round_trip(ch2, b"direct again")
    assert b.stats["relay_sessions"] == 1  # nothing more went through B
    assert a.stats["links_relayed"] == 1
    assert at_c.received == [b"direct", b"relayed", b"the old call finishes on the old link",
                             b"direct again"]
    assert [ch.link.relayed for ch in at_c.calls] == [False, True, False]


async def test_an_idle_direct_link_dropped_for_a_route_is_closed(mesh: Mesh) -> None:
    a, b, c, _ = await switch_to_route(mesh)
    direct = await a.manager.connect(c.addr)
    mesh.routes["a"][c.addr] = (b.addr, "c")
    relayed = await a.manager.connect(c.addr)
    assert relayed.relayed and direct.draining and not direct.channels
    await wait_for(lambda: direct.closed, "the idle dropped direct link closes", guard=1.0)


async def test_a_relayed_link_that_replaced_a_direct_one_outlives_its_first_channel(
        mesh: Mesh) -> None:
    a, b, c, at_c = await switch_to_route(mesh)
    await a.manager.connect(c.addr)
    mesh.routes["a"][c.addr] = (b.addr, "c")
    relayed = await a.manager.connect(c.addr)
    async with await relayed.open_channel("echo") as first:
        await round_trip(first, b"first")
    served = at_c.calls[0].link  # C's end of the relayed link
    assert served.relayed
    await wait_for(lambda: not served.channels, "C's end of the first channel is gone")
    second = await relayed.open_channel("echo")
    await round_trip(second, b"second")
    assert a.manager.links[c.addr] is relayed and not relayed.closed
