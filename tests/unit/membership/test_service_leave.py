"""The membership shell's leave: confirmed by every live member over streams, on loopback.

The nodes' UDP sockets are bound to other ports than the ones they advertise, so gossip
datagrams are lost and only the stream farewell can carry the leave: what these tests see
is that path alone.
"""

from __future__ import annotations

import random

import trio

from meshd.identity import Identity
from meshd.membership.core import Membership
from meshd.membership.messages import LEFT
from meshd.membership.service import MembershipService
from meshd.secure.keyring import Keyring, new_secret
from meshd.settings import membership_profile
from meshd.transport.links import LinkManager
from meshd.transport.udp import UdpTransport

# no probe during a test: a member that stops is still "alive" when we leave
SETTINGS = membership_profile("local", probe_interval=600.0, push_pull_interval=600.0)


async def start_node(nursery: trio.Nursery, name: str, secret: bytes
                     ) -> tuple[MembershipService, trio.CancelScope]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    addr = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    links = LinkManager(Identity.generate(), Keyring([secret]), addr)
    udp = UdpTransport(Keyring([secret]))
    await udp.bind("127.0.0.1", 0)
    core = Membership(name, addr, SETTINGS, random.Random(name), trio.current_time())
    svc = MembershipService(core, udp, links)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            try:
                async with trio.open_nursery() as inner:
                    await inner.start(links.run, listeners)
                    await inner.start(svc.run)
                    task_status.started()
            finally:
                udp.close()

    await nursery.start(run)
    return svc, scope


async def test_leave_returns_once_live_members_applied_it_and_counts_the_silent_one():
    secret = new_secret()
    async with trio.open_nursery() as nursery:
        a, _ = await start_node(nursery, "a", secret)
        b, _ = await start_node(nursery, "b", secret)
        c, stop_c = await start_node(nursery, "c", secret)
        assert await b.join([a.core.me.addr]) == (1, [])
        assert await c.join([a.core.me.addr]) == (1, [])
        assert {"b", "c"} <= set(a.core.members) and "a" in b.core.members
        stop_c.cancel()  # c stops without a word; a still counts it as live
        assert a.core.members["c"].state != LEFT

        confirmed, live = await a.leave(timeout=2.0)

        assert (confirmed, live) == (1, 2)
        assert a.core.me.state == LEFT
        # no waiting: leave returned only after b's core had applied the leave
        assert b.core.members["a"].state == LEFT
        nursery.cancel_scope.cancel()


async def test_leave_alone_returns_at_once_with_nothing_to_confirm():
    async with trio.open_nursery() as nursery:
        a, _ = await start_node(nursery, "a", new_secret())
        assert await a.leave() == (0, 0)
        assert a.core.me.state == LEFT
        nursery.cancel_scope.cancel()
