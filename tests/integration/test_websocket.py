"""A node reachable only over WebSocket links joins a TCP/UDP cluster and serves."""

from __future__ import annotations

import socket
import time

import trio

from sdk import Client

from .cluster import control, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_websocket_only_node_joins_and_serves(cluster):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    ws_port = free_port()
    c = cluster.add("c", join=[a.addr], extra=("--ws-listen", f"127.0.0.1:{ws_port}",
                                               "--advertise", f"ws://127.0.0.1:{ws_port}"))
    assert c.addr == f"ws://127.0.0.1:{ws_port}"
    names = ["a", "b", "c"]
    wait_for(lambda: all(d.status_of(n) == "alive" for d in (a, b, c) for n in names), 20,
             "mixed cluster alive")
    cluster.service(c)
    wait_for(lambda: len(control(a.data_dir, "services")) == 1, 10, "service on c visible")

    async def go():
        async with Client(a.data_dir / "meshd.sock") as client:
            return await client.call("testsvc", "Test.Whoami", {"text": ""})

    assert trio.run(go)["text"].startswith("c:")
    time.sleep(3)  # probes keep flowing: still alive, and c never used UDP
    assert all(d.status_of("c") == "alive" for d in (a, b))
    stats = control(c.data_dir, "status")["stats"]
    assert stats["udp_in"] == 0 and stats["udp_out"] == 0
    assert control(a.data_dir, "members")  # a still serves its operator
