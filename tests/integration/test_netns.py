"""Three hosts in three network namespaces: one is cut off by iptables, then comes back."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from .cluster import Daemon, control_stream, wait_for
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


def start_all(cluster, hosts: Hosts, env: dict[str, str]) -> list[Daemon]:
    """A daemon per host, all joining through h0; returns once everyone sees everyone."""
    daemons = []
    for i in range(len(hosts.ips)):
        d = Daemon(cluster.root, f"h{i}", cluster.secret, prefix=hosts.prefix(i), env=env)
        cluster.daemons[d.name] = d
        d.start(join=[f"{hosts.ips[0]}:7946"] if i else None, bind=f"{hosts.ips[i]}:7946")
        daemons.append(d)
    wait_for(lambda: all(x.status_of(y.name) == "alive" for x in daemons for y in daemons),
             20, f"{len(daemons)} alive")
    return daemons


def test_blocked_link_routes_through_the_middle_and_members_stay_alive(cluster):
    """h0 and h2 cannot reach each other; h1 reaches both: h2 stays alive on h0 (indirect
    probes through h1) and h0's route to h2 goes through h1."""
    hosts = Hosts(3)
    env = {"MESHD_MEMBERSHIP_PROBE_INTERVAL": "0.3"}
    try:
        daemons = start_all(cluster, hosts, env)
        h0, _, h2 = daemons
        hosts.block(0, 2)

        def routed_via_h1() -> bool:
            from .cluster import control

            routes = {r["destination"]: r for r in control(h0.data_dir, "routes")}
            r = routes.get("h2")
            return r is not None and r["path"] == ["h0", "h1", "h2"]

        wait_for(routed_via_h1, 60, "h0's route to h2 through h1")
        assert h0.status_of("h2") == "alive" and h2.status_of("h0") == "alive"

        async def watch() -> list:
            # ten probe rounds (0.3 s): indirect probes through h1 keep h2 alive on h0
            async with control_stream(h0.data_dir, "members.watch") as events:
                await trio.sleep(3)
                return events.seen

        trouble = [e for e in trio.run(watch) if e["name"] == "h2"
                   and e["kind"] in ("suspect", "dead")]
        assert trouble == [], "indirect probes must keep h2 alive"
        assert h0.status_of("h2") == "alive"
    finally:
        cluster.close()
        hosts.close()


def test_rpc_and_tunnel_cross_a_blocked_link_through_a_relay(cluster):
    """Clouds A, B, C: A and C cannot reach each other; traffic goes A -> B -> C, end to end
    encrypted, and again after the middle node restarts."""
    import hashlib
    import os
    import socket as socketlib

    from meshd_sdk import Client

    from .cluster import control
    from .test_tunnel import free_port

    hosts = Hosts(3)
    env = {"MESHD_MEMBERSHIP_PROBE_INTERVAL": "0.3", "MESHD_LOG_LEVEL": "debug"}
    try:
        daemons = {}
        for i in (1, 0, 2):  # the middle node first: the others join through it
            d = Daemon(cluster.root, f"h{i}", cluster.secret, prefix=hosts.prefix(i), env=env)
            cluster.daemons[d.name] = d
            d.start(join=[f"{hosts.ips[1]}:7946"] if i != 1 else None,
                    bind=f"{hosts.ips[i]}:7946")
            daemons[i] = d
        h0, h1, h2 = daemons[0], daemons[1], daemons[2]
        hosts.block(0, 2)
        cluster.service(h2)
        # a checksummed byte source on h2's side, exposed as a tunnel from h2
        script = cluster.root / "source.py"
        script.write_text(
            "import socket, sys\n"
            "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(4)\n"
            "print('listening', flush=True)\n"
            "data = bytes(range(256)) * 4096\n"
            "while True:\n"
            "    c, _ = s.accept()\n"
            "    for _ in range(100): c.sendall(data)\n"
            "    c.close()\n")
        src_port = free_port()
        import subprocess
        import sys as sysmod

        source = subprocess.Popen([*hosts.prefix(2), sysmod.executable, str(script),
                                   str(src_port)], stdout=subprocess.PIPE, text=True)
        try:
            assert source.stdout.readline() == "listening\n", "the byte source did not start"
            control(h2.data_dir, "tunnel.expose", name="src", to=f"127.0.0.1:{src_port}")

            def routed() -> bool:
                routes = {r["destination"]: r for r in control(h0.data_dir, "routes")}
                return routes.get("h2", {}).get("path") == ["h0", "h1", "h2"]

            wait_for(routed, 60, "h0 routes to h2 through h1")
            wait_for(lambda: control(h0.data_dir, "tunnel.list") != [], 20, "tunnel on h0")

            def rpc() -> str:
                async def go():
                    async with Client(h0.data_dir / "meshd.sock") as client:
                        return (await client.call("testsvc", "Test.Whoami", {"text": ""},
                                                  timeout=10))["text"]
                return trio.run(go)

            def tunnel_digest() -> str:
                port = free_port()
                proc = subprocess.Popen([*hosts.prefix(0), sysmod.executable, "-m", "meshd_cli",
                                         "tunnel", "connect", "src", "--listen",
                                         f"127.0.0.1:{port}", "--data-dir", str(h0.data_dir)],
                                        stdout=subprocess.PIPE, text=True)
                try:
                    assert "listening" in proc.stdout.readline()
                    out = subprocess.run(
                        [*hosts.prefix(0), sysmod.executable, "-c",
                         "import socket,hashlib,sys; s=socket.create_connection(('127.0.0.1',"
                         f"{port})); h=hashlib.sha256(); n=0\n"
                         "while True:\n d=s.recv(1<<20)\n if not d: break\n"
                         " h.update(d); n+=len(d)\n"
                         "print(n, h.hexdigest())"], capture_output=True, text=True, timeout=60)
                    return out.stdout.strip()
                finally:
                    proc.terminate()
                    proc.wait(5)

            expected = f"{100 * 256 * 4096} " + hashlib.sha256(
                (bytes(range(256)) * 4096) * 100).hexdigest()
            assert rpc().startswith("h2:")
            assert_traced_through_the_relay(h0, h1, h2)
            assert tunnel_digest() == expected
            assert control(h1.data_dir, "status")["stats"]["relay_sessions"] >= 1
            # restart the middle node: the relayed link breaks and is dialed again
            h1.kill9()
            h1.start(bind=f"{hosts.ips[1]}:7946")
            wait_for(routed, 60, "route through the restarted h1")
            wait_for(lambda: rpc().startswith("h2:"), 60, "rpc again after the restart")
            assert tunnel_digest() == expected
        finally:
            source.kill()
    finally:
        cluster.close()
        hosts.close()
        del os, socketlib


def assert_traced_through_the_relay(h0: Daemon, h1: Daemon, h2: Daemon) -> None:
    """A sampled call from h0 to h2's service through relay h1 is one trace: h0's client
    span, h1's relay spans (request and reply) under it, h2's server span under h0's and the
    handler's under h2's; `debug.trace` on h0 gathers them from all three nodes."""
    import os

    from meshd_sdk import Client

    from .cluster import control

    trace_id = os.urandom(16).hex()

    async def go() -> None:
        async with Client(h0.data_dir / "meshd.sock") as client:
            await client.call("testsvc", "Test.Whoami", {"text": ""}, timeout=10,
                              meta={"traceparent": f"00-{trace_id}-{'ab' * 8}-01"})
    trio.run(go)

    def spans() -> list[dict[str, Any]]:
        return control(h0.data_dir, "debug.trace", trace_id=trace_id)["spans"]

    wait_for(lambda: {s["node"] for s in spans()} == {"h0", "h1", "h2"}, 10,
             "spans from h0, the relay h1 and h2")
    got = spans()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for s in got:
        assert s["trace_id"] == trace_id
        by_kind.setdefault(s["kind"], []).append(s)
    client = by_kind["client"][0]
    assert client["node"] == "h0" and client["parent_id"] == "ab" * 8
    assert {s["node"] for s in by_kind["relay"]} == {"h1"}
    server = by_kind["server"][0]
    assert server["node"] == "h2" and server["parent_id"] == client["span_id"]
    assert any(s["parent_id"] == client["span_id"] for s in by_kind["relay"])  # the request
    assert any(s["parent_id"] == server["span_id"] for s in by_kind["relay"])  # the reply
    handler = by_kind["handler"][0]
    assert handler["node"] == "h2" and handler["parent_id"] == server["span_id"]
    assert handler["duration"] <= server["duration"] <= client["duration"]


@contextlib.contextmanager
def logs_on_failure(daemons: list[Any]) -> Iterator[None]:
    """On a failure, the end of each daemon's log goes into the test's output (a timing
    failure in a namespace test is otherwise not diagnosable after the fact)."""
    try:
        yield
    except AssertionError:
        for d in daemons:
            print(f"===== {d.name}: {d.log}")
            print(Path(d.log).read_text(errors="replace")[-4000:])
        raise


def test_chain_of_four_hosts_members_two_relays_away_stay_alive_and_answer(cluster):
    """h0 - h1 - h2 - h3 with only neighbours reaching each other: no single helper reaches
    both h0 and h3, so h3 stays alive on h0 only through probes that follow the route, and an
    RPC from h0 reaches a service on h3 through two relays."""
    from meshd_sdk import Client

    from .cluster import control

    hosts = Hosts(4, net=202)
    env: dict[str, str] = {}  # local profile timings: probes every 0.5 s
    try:
        daemons = start_all(cluster, hosts, env)
        h0, _, _, h3 = daemons
        for i, j in ((0, 2), (0, 3), (1, 3)):
            hosts.block(i, j)
        cluster.service(h3)

        seen: dict[str, object] = {}

        def chain_routes() -> bool:
            to_h3 = {r["destination"]: r for r in control(h0.data_dir, "routes")}.get("h3")
            to_h0 = {r["destination"]: r for r in control(h3.data_dir, "routes")}.get("h0")
            seen["h0 to h3"], seen["h3 to h0"] = to_h3, to_h0
            return (to_h3 is not None and to_h3["path"] == ["h0", "h1", "h2", "h3"]
                    and to_h0 is not None and to_h0["path"] == ["h3", "h2", "h1", "h0"])

        def state() -> str:
            """What each node sees when the routes do not form: its links and members."""
            out = [f"last routes: {seen}"]
            for d in daemons:
                try:
                    edges = control(d.data_dir, "graph")["edges"]
                    members = {m["name"]: (m["status"], m["reach"])
                               for m in control(d.data_dir, "members")}
                except Exception as exc:  # diagnostics only: report and go on
                    out.append(f"{d.name}: {exc}")
                    continue
                out.append(f"{d.name}: edges {edges} members {members}")
            return "\n".join(out)

        def reach() -> dict[str, str]:
            return {r["name"]: r["reach"] for r in control(h0.data_dir, "members")}

        with logs_on_failure(daemons):
            try:
                wait_for(chain_routes, 90, "routes along the chain both ways")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{state()}") from None
            # routes can form a moment before h0 finds h3 silent to a direct ping (P6)
            wait_for(lambda: reach()["h3"] == "via h1", 10, "h3 reached via h1")
            assert reach()["h1"] == "direct"
            # a probe of h3 that began before the route existed can still end in a
            # suspicion (h3 refutes it when the gossip reaches it, as it did in a CI run:
            # suspected 2 s after the routes formed); let such stragglers end, then both
            # must see each other alive, and stay so for 20 probe intervals
            time.sleep(2)  # 4 probe intervals
            wait_for(lambda: h0.status_of("h3") == "alive" and h3.status_of("h0") == "alive",
                     10, "h0 and h3 alive to each other")
            deadline = time.monotonic() + 10  # 20 probe intervals
            while time.monotonic() < deadline:
                assert h0.status_of("h3") == "alive" and h3.status_of("h0") == "alive", \
                    "a member two relays away must stay alive"
                time.sleep(0.2)

        async def whoami() -> str:
            async with Client(h0.data_dir / "meshd.sock") as client:
                return (await client.call("testsvc", "Test.Whoami", {"text": ""},
                                          timeout=10))["text"]

        assert trio.run(whoami).startswith("h3:")
    finally:
        cluster.close()
        hosts.close()
