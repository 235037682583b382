"""The membership shell's cap on push-pull requests served at once (memberlist's
maxPushPullRequests; memberlist#158), on loopback."""

from __future__ import annotations

import trio

from meshd.membership.service import MAX_PUSH_PULLS
from meshd.secure.keyring import new_secret

from .test_service_leave import start_node


async def test_push_pulls_past_the_cap_are_refused_and_counted_then_served_again():
    secret = new_secret()
    async with trio.open_nursery() as nursery:
        a, _ = await start_node(nursery, "a", secret)
        b, _ = await start_node(nursery, "b", secret)
        a.stats["push_pulls_serving"] = MAX_PUSH_PULLS  # as if that many were being served
        ok, errors = await b.join([a.core.me.addr])
        assert ok == 0 and errors, "a join push-pull past the cap was served"
        assert a.stats["push_pulls_refused"] == 1 and "b" not in a.core.members
        a.stats["push_pulls_serving"] = 0
        assert await b.join([a.core.me.addr]) == (1, [])
        assert "b" in a.core.members and "a" in b.core.members
        assert a.stats["push_pulls_serving"] == 0  # the served one was counted out again
        nursery.cancel_scope.cancel()
