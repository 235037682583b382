"""Debug across real daemons: a service's log line on one node read from another (and
followed), errors counted in stats, a call's trace gathered from every node it touched,
and a rogue member's malformed debug requests refused without harm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import cbor2
import trio

from meshd.secure.keyring import parse_secret
from meshd_sdk import Client

from .attacks import RoguePeer
from .cluster import control, control_stream, wait_for
from .test_broker import FAST, cli, ready, sees, sock
from .test_tunnel import free_port


def three(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    c = cluster.add("c", join=[a.addr], env=FAST)
    ready(a, b, c)
    cluster.service(a)
    wait_for(lambda: any(s["name"] == "testsvc" for s in control(c.data_dir, "services")),
             20, "testsvc seen from c")
    return a, b, c


def call(d, endpoint: str, text: str, meta: dict[str, str] | None = None) -> None:
    async def go() -> None:
        async with Client(sock(d)) as client:
            await client.call("testsvc", endpoint, {"text": text}, timeout=10, meta=meta)
    trio.run(go)


def logged(d, *args: str) -> list[dict]:
    r = cli(d, "logs", *args, "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_a_service_log_line_on_a_is_read_and_followed_from_c(cluster):
    _a, b, c = three(cluster)
    marker = f"hello-{os.getpid()}"
    call(c, "Test.Log", marker)
    wait_for(lambda: any(r["message"] == marker for r in logged(c, "testsvc")), 10,
             "the line in `meshd logs testsvc` on c")
    (rec,) = [r for r in logged(c, "testsvc") if r["message"] == marker]
    assert rec["node"] == "a" and rec["service"] == "testsvc" and rec["level"] == "info"
    assert rec["instance"].startswith("testsvc") and len(rec["trace_id"]) == 32
    # filters: another node's records only, a level above info, a window in the past
    assert not any(r["message"] == marker for r in logged(c, "testsvc", "--node", "b"))
    assert not any(r["message"] == marker for r in logged(c, "--level", "warning"))
    assert any(r["service"] == "meshd" and r["node"] == "b" for r in logged(c, "--node", "b"))
    # -f: a line logged after the command started arrives while it runs
    proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", "logs", "testsvc", "-f", "--json",
                             "-n", "1", "--data-dir", str(c.data_dir)],
                            stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())  # the newest record before following
        assert first["service"] == "testsvc"
        time.sleep(0.5)
        later = f"later-{os.getpid()}"
        call(b, "Test.Log", later)
        deadline = time.monotonic() + 15
        seen = []
        while time.monotonic() < deadline:
            seen.append(json.loads(proc.stdout.readline()))
            if seen[-1]["message"] == later:
                break
        assert seen[-1]["message"] == later and seen[-1]["node"] == "a"
    finally:
        proc.terminate()
        proc.wait(5)
    # a follow with `since` first gives what every node holds from then on, so a line
    # logged between a query and the follow is not lost (`logs -f` follows from just after
    # the last line it printed)
    before = time.time() - 0.001
    gap = f"gap-{os.getpid()}"
    call(b, "Test.Log", gap)
    wait_for(lambda: any(r["message"] == gap for r in logged(c, "testsvc")), 10, "the gap line")

    async def replayed() -> None:
        async with control_stream(c.data_dir, "debug.logs.follow", service="testsvc",
                                  since=before) as events:
            ev = await events.next(lambda r: r["message"] == gap, 10, "the gap line again")
            assert ev["node"] == "a"
    trio.run(replayed)


def test_errors_counted_and_traces_gathered_from_every_node(cluster):
    _a, _b, c = three(cluster)
    call(c, "Test.Echo", "fine")
    r = cli(c, "call", "testsvc", "Test.Boom", '{"text": "x"}')
    assert r.returncode == 1 and "500" in r.stderr
    r = cli(c, "stats", "testsvc", "--json")
    assert r.returncode == 0, r.stderr
    (node,) = json.loads(r.stdout)["nodes"]
    assert node["node"] == "a"
    (inst,) = node["instances"]
    assert inst["endpoints"]["Test.Boom"]["errors"] == 1
    assert inst["endpoints"]["Test.Echo"] == {**inst["endpoints"]["Test.Echo"],
                                             "count": 1, "errors": 0}
    assert inst["requests"] == 2 and inst["errors"] == 1 and inst["in_flight"] == 0
    r = cli(c, "stats", "--json")
    nodes = {n["node"]: n["sample"] for n in json.loads(r.stdout)["nodes"]}
    assert set(nodes) == {"a", "b", "c"}
    assert nodes["a"]["members"]["alive"] == 3 and nodes["a"]["services"] == 1
    assert all(s["rss_bytes"] > 10e6 and s["tasks"] > 5 for s in nodes.values())
    # an error is kept whatever the sampling rate (the default keeps 1 in 10)
    r = cli(c, "traces", "--errors", "--json")
    (failed,) = json.loads(r.stdout)["traces"]
    assert failed["status"] == 500 and failed["nodes"] == ["a", "c"]
    # --trace: sampled whatever the rate; the tree has c's call, a's serving and handler
    r = cli(c, "call", "testsvc", "Test.Echo", '{"text": "t"}', "--trace")
    assert r.returncode == 0, r.stderr
    trace_id = r.stderr.split()[-1]
    assert len(trace_id) == 32
    r = cli(c, "trace", trace_id, "--json")
    spans = {s["kind"]: s for s in json.loads(r.stdout)["spans"]}
    assert set(spans) == {"client", "server", "handler"}
    assert spans["client"]["node"] == "c" and spans["server"]["node"] == "a"
    assert spans["server"]["parent_id"] == spans["client"]["span_id"]
    assert spans["handler"]["parent_id"] == spans["server"]["span_id"]
    r = cli(c, "trace", trace_id)
    assert "serve testsvc/Test.Echo" in r.stdout and "handler Test.Echo" in r.stdout
    r = cli(c, "trace", "0" * 31 + "1")
    assert r.returncode == 1 and r.stderr.startswith("404")


def test_a_call_made_inside_a_handler_is_part_of_the_callers_trace(cluster):
    a = cluster.add("a", env=FAST)
    cluster.service(a)
    cluster.service(a, name="other")
    wait_for(lambda: {s["name"] for s in control(a.data_dir, "services")} >=
             {"testsvc", "other"}, 20, "both services")
    r = cli(a, "call", "testsvc", "Test.Relay", '{"text": "other"}', "--trace")
    assert r.returncode == 0, r.stderr
    spans = json.loads(cli(a, "trace", r.stderr.split()[-1], "--json").stdout)["spans"]
    handlers = {s["service"]: s for s in spans if s["kind"] == "handler"}
    assert set(handlers) == {"testsvc", "other"}
    inner = [s for s in spans if s["kind"] == "client" and s["service"] == "other"]
    assert inner and inner[0]["parent_id"] == handlers["testsvc"]["span_id"]


async def _rogue_debug(secret: bytes, addr: str) -> list:
    rogue = RoguePeer(secret, claim=f"127.0.0.1:{free_port()}")
    await rogue.connect(addr)
    assert await rogue.join("rogue")
    replies = []
    for message in (b"\xff not cbor", cbor2.dumps("not a map"), cbor2.dumps({"op": "nope"}),
                    cbor2.dumps({"op": "logs", "args": {"limit": "all"}}),
                    cbor2.dumps({"op": "trace", "args": {"trace_id": 5}}),
                    cbor2.dumps({"op": "logs", "args": {"level": ["info"]}}),
                    cbor2.dumps({"op": "logs", "args": {"level": "info"}})):
        replies.append(await rogue.request("debug", message, timeout=5))
    await rogue.aclose()
    return replies


def test_a_rogue_members_malformed_debug_requests_are_refused_and_the_node_serves_on(cluster):
    a = cluster.add("a", env=FAST)
    replies = trio.run(_rogue_debug, parse_secret(cluster.secret), a.addr)
    statuses = [r["error"]["status"] if isinstance(r, dict) and not r.get("ok") else r
                for r in replies[:6]]
    assert statuses[0] is None  # undecodable: the channel is closed, no answer
    assert statuses[1:] == [400, 400, 400, 400, 400]
    ok = replies[6]
    assert ok["ok"] and all(rec["node"] == "a" for rec in ok["result"])  # a member reads
    st = control(a.data_dir, "status")
    assert st["stats"]["debug_queries_refused"] >= 5
    assert control(a.data_dir, "debug.logs")["records"]  # and the node still serves


def test_a_traced_message_shows_who_published_and_who_got_it(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    ready(a, b)

    async def scenario() -> tuple[str, dict]:
        async with Client(sock(b)) as client, client.subscribe("traced.>") as sub:
            await sees(Client(sock(a)), "b", "traced.>")
            r = await trio.to_thread.run_sync(lambda: cli(a, "publish", "traced.x", "{}",
                                                          "--trace"))
            assert r.returncode == 0, r.stderr
            with trio.fail_after(10):
                msg = await sub.__anext__()
            return r.stderr.split()[-1], msg.headers
    trace_id, headers = trio.run(scenario)
    assert headers["traceparent"][3:35] == trace_id
    spans = {s["kind"]: s for s in json.loads(cli(b, "trace", trace_id, "--json")
                                              .stdout)["spans"]}
    assert spans["producer"]["node"] == "a" and spans["producer"]["name"] == "publish traced.x"
    assert spans["consumer"]["node"] == "b"
    assert spans["consumer"]["parent_id"] == spans["producer"]["span_id"]
    assert spans["consumer"]["attrs"]["subscribers"] == "1"


def test_spans_of_a_traced_call_reach_an_otlp_collector(cluster):
    """`--otlp-endpoint`: the daemons' spans of a traced call arrive at a collector (a test
    receiver decoding OTLP/HTTP protobuf), with the trace id, kinds and service names."""
    from tests.unit.debug.test_otlp import Receiver, attrs

    receiver = Receiver()
    try:
        env = {**FAST, "MESHD_DEBUG_OTLP_ENDPOINT": receiver.url}
        a = cluster.add("a", env=env)
        c = cluster.add("c", join=[a.addr], env=env)
        ready(a, c)
        cluster.service(a)
        wait_for(lambda: any(s["name"] == "testsvc" for s in control(c.data_dir, "services")),
                 20, "testsvc seen from c")
        r = cli(c, "call", "testsvc", "Test.Echo", '{"text": "otlp"}', "--trace")
        assert r.returncode == 0, r.stderr
        trace_id = bytes.fromhex(r.stderr.split()[-1])

        def got() -> dict[str, tuple[dict, object]]:
            return {s.name: (res, s) for res, s in receiver.spans()
                    if s.trace_id == trace_id}

        wait_for(lambda: len(got()) == 3, 15, "client, server and handler spans exported")
        spans = got()
        res, client = spans["call testsvc/Test.Echo"]
        assert res["service.name"] == "testsvc" and attrs(client.attributes)["meshd.node"] == "c"
        _, server = spans["serve testsvc/Test.Echo"]
        _, handler = spans["handler Test.Echo"]
        assert server.parent_span_id == client.span_id
        assert handler.parent_span_id == server.span_id
        assert control(a.data_dir, "status")["stats"]["otlp_export_failures"] == 0
    finally:
        receiver.close()
