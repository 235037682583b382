"""Three hosts in three network namespaces: one is cut off by iptables, then comes back."""

from __future__ import annotations

import time

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


def test_blocked_link_routes_through_the_middle_and_members_stay_alive(cluster):
    """h0 and h2 cannot reach each other; h1 reaches both: h2 stays alive on h0 (indirect
    probes through h1) and h0's route to h2 goes through h1."""
    hosts = Hosts(3)
    env = {"MESHD_MEMBERSHIP_PROBE_INTERVAL": "0.3"}
    try:
        daemons = []
        for i in range(3):
            d = Daemon(cluster.root, f"h{i}", cluster.secret, prefix=hosts.prefix(i), env=env)
            cluster.daemons[d.name] = d
            d.start(join=[f"{hosts.ips[0]}:7946"] if i else None, bind=f"{hosts.ips[i]}:7946")
            daemons.append(d)
        h0, _, h2 = daemons
        wait_for(lambda: all(x.status_of(y.name) == "alive" for x in daemons for y in daemons),
                 20, "3 alive")
        hosts.block(0, 2)

        def routed_via_h1() -> bool:
            from .cluster import control

            routes = {r["destination"]: r for r in control(h0.data_dir, "routes")}
            r = routes.get("h2")
            return r is not None and r["path"] == ["h0", "h1", "h2"]

        wait_for(routed_via_h1, 60, "h0's route to h2 through h1")
        assert h0.status_of("h2") == "alive" and h2.status_of("h0") == "alive"
        time.sleep(3)
        assert h0.status_of("h2") == "alive", "indirect probes must keep h2 alive"
    finally:
        cluster.close()
        hosts.close()
