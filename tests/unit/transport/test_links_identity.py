"""Who is at the other end of a link (issue 11), over relays and direct: a dialed link must
prove the key `expected_key(addr)` names, so neither a relay nor a node answering at someone
else's address can terminate a link meant for another member."""

from __future__ import annotations

import re

import pytest
import trio

from meshd.identity import Identity
from meshd.transport.links import KEY_PREFIX, ChannelClosed, LinkError

from .mesh import GUARD, Echo, Mesh, wait_for


def mismatch(addr: str, answered: str, expected: str) -> str:
    return re.escape(f"{addr} answered as node {answered}, not the member known at that "
                     f"address ({expected})")


async def test_a_relay_answering_for_the_destination_cannot_terminate_the_link(
        mesh: Mesh) -> None:
    a = await mesh.add("a")
    b = await mesh.add("b", my_name="c")  # the relay takes the relayed handshake itself
    c = await mesh.add("c")
    mesh.routes["a"][c.addr] = (b.addr, "c")
    mesh.next_hops["b"]["c"] = c.addr
    at_b, at_c = Echo(), Echo()
    b.manager.handlers["echo"] = at_b
    c.manager.handlers["echo"] = at_c
    for _ in range(2):  # refused every time, not only the first
        with trio.fail_after(GUARD), pytest.raises(
                LinkError, match=mismatch(c.addr, b.short, c.short)):
            await a.manager.open_channel(c.addr, "echo")
    assert a.stats["links_refused_identity"] == 2
    assert c.addr not in a.manager.links
    assert at_b.calls == [] and at_c.calls == []
    # B's end of each relayed handshake failed (A never confirmed): only the direct link
    # from A was accepted, and B relayed nothing on to C
    await wait_for(lambda: b.stats["handshakes_failed"] == 2,
                   "B's ends of the refused handshakes fail")
    assert b.stats["links_accepted"] == 1
    assert b.stats["relay_sessions"] == 0 and c.stats["links_accepted"] == 0


@pytest.mark.parametrize("member", [True, False], ids=["a-member", "not-a-member"])
async def test_a_relay_routing_to_a_node_with_another_key_cannot_deliver(
        mesh: Mesh, member: bool) -> None:
    a, b, c = await mesh.add("a"), await mesh.add("b"), await mesh.add("c")
    x = await mesh.add("x", my_name="c", member=member)  # answers relays meant for "c"
    mesh.routes["a"][c.addr] = (b.addr, "c")
    mesh.next_hops["b"]["c"] = x.addr  # a wrong (or lying) route toward C
    at_x, at_c = Echo(), Echo()
    x.manager.handlers["echo"] = at_x
    c.manager.handlers["echo"] = at_c
    with trio.fail_after(GUARD), pytest.raises(
            LinkError, match=mismatch(c.addr, x.short, c.short)):
        await a.manager.open_channel(c.addr, "echo")
    assert at_x.calls == [] and c.addr not in a.manager.links
    assert b.stats["relay_sessions"] == 1  # B relayed: the end decided, not the relay
    # once the route leads to the real C, the same dial succeeds with C's key
    mesh.next_hops["b"]["c"] = c.addr
    async with await a.manager.open_channel(c.addr, "echo") as ch:
        assert ch.link.relayed and ch.peer_public == c.key
        await ch.send(b"the real c")
        assert await ch.receive() == b"the real c"
    assert at_x.calls == [] and len(at_c.calls) == 1


async def test_a_node_answering_at_another_members_address_is_refused(mesh: Mesh) -> None:
    a, c, x = await mesh.add("a"), await mesh.add("c"), await mesh.add("x")
    at_x = Echo()
    x.manager.handlers["echo"] = at_x
    c.manager.handlers["echo"] = Echo()
    # membership says C lives at X's address (X squats it, or C moved there and died)
    mesh.keys[x.addr] = c.key
    with trio.fail_after(GUARD), pytest.raises(
            LinkError, match=mismatch(x.addr, x.short, c.short)):
        await a.manager.open_channel(x.addr, "echo")
    assert at_x.calls == [] and x.addr not in a.manager.links
    # an existing link is reused only while its key is still the one expected there
    link = await a.manager.connect(c.addr)
    assert link.peer_public == c.key
    mesh.keys[c.addr] = Identity.generate().public_bytes  # C's address changed hands
    with trio.fail_after(GUARD), pytest.raises(LinkError, match="answered as node"):
        await a.manager.connect(c.addr)
    assert a.manager.links.get(c.addr) is not link
    assert a.stats["links_refused_identity"] == 2


async def test_a_revoked_key_is_refused_through_a_relay_both_ways(mesh: Mesh) -> None:
    a, b, c = await mesh.add("a"), await mesh.add("b"), await mesh.add("c")
    mesh.routes["a"][c.addr] = (b.addr, "c")
    mesh.next_hops["b"]["c"] = c.addr
    at_c = Echo()
    c.manager.handlers["echo"] = at_c
    # A revoked C: A refuses the relayed link C answers with
    a.manager.is_revoked = lambda key: key == c.key
    with trio.fail_after(GUARD), pytest.raises(LinkError, match=f"node {c.short} is revoked"):
        await a.manager.connect(c.addr)
    assert a.stats["links_refused_revoked"] == 1
    # C revoked A: C refuses the relayed link after A's confirm; nothing reaches C's handler
    a.manager.is_revoked = None
    c.manager.is_revoked = lambda key: key == a.key
    with trio.fail_after(GUARD), pytest.raises((LinkError, ChannelClosed)):
        ch = await a.manager.open_channel(c.addr, "echo")
        await ch.send(b"let me in")
        await ch.receive()
    assert c.stats["links_refused_revoked"] >= 1  # (>= : open_channel retries once)
    assert at_c.calls == []


async def test_a_relayed_link_claiming_another_members_address_serves_only_its_own_channels(
        mesh: Mesh) -> None:
    a, b, c = await mesh.add("a"), await mesh.add("b"), await mesh.add("c")
    x = await mesh.add("x")
    x.manager.advertise = a.addr  # X claims A's address in its handshake
    mesh.routes["x"][c.addr] = (b.addr, "c")
    mesh.next_hops["b"]["c"] = c.addr
    at_c, at_a, at_x = Echo(), Echo(), Echo()
    c.manager.handlers["echo"] = at_c
    a.manager.handlers["echo"] = at_a
    x.manager.handlers["echo"] = at_x
    async with await x.manager.open_channel(c.addr, "echo") as ch:
        assert ch.link.relayed
        await ch.send(b"from x")
        assert await ch.receive() == b"from x"
    served = at_c.calls[0]
    # C serves X's channel, filed under an address that reaches nothing else
    assert served.peer_node == "x" and served.peer_public == x.key
    assert served.peer_addr == KEY_PREFIX + x.manager.identity.node_id
    assert c.stats["links_refused_identity"] == 1
    # C's calls for A's address go to the real A, never to X
    async with await c.manager.open_channel(a.addr, "echo") as back:
        assert back.peer_public == a.key and back.link is not served.link
        await back.send(b"for a")
        assert await back.receive() == b"for a"
    assert at_a.received == [b"for a"] and at_x.calls == []
