"""A node reachable only over WebSocket links joins a TCP/UDP cluster and serves."""

from __future__ import annotations

import socket

import trio

from meshd_sdk import Client

from .cluster import control, control_stream, wait_for


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

    async def watch() -> dict[str, list]:
        # probes keep flowing over WebSocket: for six probe rounds (0.5 s each on the local
        # profile) neither a nor b suspects c
        async with control_stream(a.data_dir, "members.watch") as on_a, \
                control_stream(b.data_dir, "members.watch") as on_b:
            await trio.sleep(3)
            return {"a": on_a.seen, "b": on_b.seen}

    seen = trio.run(watch)
    about_c = {k: [e["kind"] for e in v if e["name"] == "c" and e["kind"] in ("suspect", "dead")]
               for k, v in seen.items()}
    assert about_c == {"a": [], "b": []}
    assert all(d.status_of("c") == "alive" for d in (a, b))
    stats = control(c.data_dir, "status")["stats"]
    assert stats["udp_in"] == 0 and stats["udp_out"] == 0  # c never used UDP
    assert {m["name"]: m["status"] for m in control(a.data_dir, "members")} == {
        "a": "alive", "b": "alive", "c": "alive"}  # a still serves its operator
