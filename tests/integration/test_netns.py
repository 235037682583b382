"""Three hosts in three network namespaces: one is cut off by iptables, then comes back."""

from __future__ import annotations

import pytest

from .cluster import Daemon, wait_for
from .netns import Hosts, why_not_available

reason = why_not_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


def test_cut_off_host_is_dead_then_alive_again(cluster):
    hosts = Hosts(3)
    try:
        daemons = []
        for i in range(3):
            d = Daemon(cluster.root, f"h{i}", cluster.secret, prefix=hosts.prefix(i))
            cluster.daemons[d.name] = d
            join = [f"{hosts.ips[0]}:7946"] if i else None
            d.start(join=join, bind=f"{hosts.ips[i]}:7946")
            daemons.append(d)
        a, b, _ = daemons

        def view(d: Daemon, name: str) -> str | None:
            return d.status_of(name)

        wait_for(lambda: all(view(x, y.name) == "alive" for x in daemons for y in daemons),
                 20, "3 alive in 3 namespaces")
        hosts.cut(2)
        wait_for(lambda: view(a, "h2") == "dead" and view(b, "h2") == "dead", 30,
                 "h2 dead on h0 and h1")
        hosts.heal(2)
        wait_for(lambda: all(view(x, y.name) == "alive" for x in daemons for y in daemons),
                 40, "h2 alive again everywhere")
        assert a.members()["h2"]["incarnation"] >= 1, "h2 must have refuted its death"
    finally:
        cluster.close()
        hosts.close()
