"""Registry and RPC with real daemons and real service processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

from meshd.errors import MeshError
from meshd_sdk import Client

from .cluster import SERVICES, control, control_stream, wait_for

ROOT = Path(__file__).resolve().parents[2]
FAST = {"MESHD_RPC_INSTANCE_TTL": "2", "MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1"}


def three_nodes(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    c = cluster.add("c", join=[a.addr], env=FAST)
    wait_for(lambda: all(len([m for m in d.members().values() if m["status"] == "alive"]) == 3
                         for d in (a, b, c)), 20, "3 alive")
    return a, b, c


def instances_everywhere(daemons, service, count) -> bool:
    """Whether every daemon lists `count` instances of `service`. "None" is only the 404
    that says so; a daemon that has exited fails at once, other errors are raised."""
    for d in daemons:
        d.assert_running()
        try:
            rows = control(d.data_dir, "describe", service=service)["instances"]
        except MeshError as exc:
            if (exc.status, exc.detail) != (404, f"service {service!r} has no instances"):
                raise
            rows = []
        if len(rows) != count:
            return False
    return True


def sdk_call(daemon, service, endpoint, body, **kw):
    async def go():
        async with Client(daemon.data_dir / "meshd.sock") as client:
            return await client.call(service, endpoint, body, **kw)
    return trio.run(go)


def cli(daemon, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args, "--data-dir",
                           str(daemon.data_dir)], capture_output=True, text=True, timeout=20,
                          input=stdin)


def test_greeter_on_a_called_from_b_and_c_by_cli_and_sdk(cluster):
    a, b, c = three_nodes(cluster)
    cluster.service(a, "greeter", script=ROOT / "examples" / "greeter" / "main.py")
    wait_for(lambda: instances_everywhere([a, b, c], "greeter", 1), 10, "greeter everywhere")
    out = cli(b, "call", "greeter", "Greeter.Hello", '{"name": "Ada"}', "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"msg": "Hello Ada"}
    # the README's exact answer to a field of the wrong type
    wrong = cli(b, "call", "greeter", "Greeter.Hello", '{"name": 5}')
    assert (wrong.returncode, wrong.stdout, wrong.stderr) == (
        1, "", "400 bad request: field 'name': expected string, got integer\n")
    piped = cli(c, "call", "greeter", "Greeter.Hello", "--json", stdin='{"name": "Bob"}')
    assert json.loads(piped.stdout) == {"msg": "Hello Bob"}
    assert sdk_call(c, "greeter", "Greeter.Hello", {"name": "Cy"}) == {"msg": "Hello Cy"}
    desc = json.loads(cli(c, "describe", "greeter", "--json").stdout)
    ep = desc["instances"][0]["endpoints"][0]
    assert ep["name"] == "Greeter.Hello"
    assert ep["request"]["properties"] == {"name": {"type": "string"}}
    assert ep["response"]["properties"] == {"msg": {"type": "string"}}
    services = json.loads(cli(b, "services", "--json").stdout)
    assert services == [{"name": "greeter", "instances": 1, "nodes": ["a"],
                         "versions": ["1.0.0"], "namespace": "default", "tags": []}]
    health = json.loads(cli(b, "health", "greeter", "--json").stdout)
    assert [h["status"] for h in health] == ["ok"]


def test_three_instances_share_calls_and_a_killed_one_leaves(cluster):
    a, b, c = three_nodes(cluster)
    svcs = [cluster.service(d) for d in (a, b, c)]
    wait_for(lambda: instances_everywhere([a, b, c], "testsvc", 3), 10, "3 instances")
    seen = Counter(sdk_call(a, "testsvc", "Test.Whoami", {"text": ""})["text"].split(":")[0]
                   for _ in range(60))
    assert set(seen) == {"a", "b", "c"}, seen
    assert min(seen.values()) >= 5, seen
    svcs[1].kill9()  # the instance on b dies without a word
    wait_for(lambda: instances_everywhere([a, b, c], "testsvc", 2), 2 + 3, "b's instance gone")
    for _ in range(20):
        who = sdk_call(c, "testsvc", "Test.Whoami", {"text": ""})["text"]
        assert not who.startswith("b:")


def test_killed_node_takes_its_instances_away(cluster):
    a, b, c = three_nodes(cluster)
    cluster.service(c)
    cluster.service(b)
    wait_for(lambda: instances_everywhere([a, b, c], "testsvc", 2), 10, "2 instances")
    c.kill9()
    wait_for(lambda: instances_everywhere([a, b], "testsvc", 1), 20, "c's instance gone")
    assert sdk_call(a, "testsvc", "Test.Echo", {"text": "x"}) == {"text": "x"}


def test_bad_input_answers(cluster):
    a, b, _ = three_nodes(cluster)
    svc = cluster.service(b)
    wait_for(lambda: instances_everywhere([a, b], "testsvc", 1), 10, "service up")

    def err(*call, **kw) -> MeshError:
        with pytest.raises(MeshError) as info:
            sdk_call(a, *call, **kw)
        return info.value

    e = err("nope", "X.Y", {})
    assert (e.status, e.detail) == (404, "service 'nope' has no instances")
    e = err("testsvc", "Test.Nope", {})
    assert e.status == 404 and "Test.Echo" in e.detail and "Test.Boom" in e.detail
    e = err("testsvc", "Test.Echo", {"text": 5})
    assert e.status == 400 and "'text'" in e.detail
    e = err("testsvc", "Test.Echo", {"txt": "x"})
    assert e.status == 400 and "'text'" in e.detail
    e = err("testsvc", "Test.Boom", {"text": "bad day"})
    assert e.status == 500 and "boom: bad day" in e.detail
    assert sdk_call(a, "testsvc", "Test.Echo", {"text": "still"}) == {"text": "still"}
    start = time.monotonic()
    e = err("testsvc", "Test.Sleep", {"seconds": 30}, timeout=1.0)
    assert e.status == 408 and time.monotonic() - start < 3
    e = err("testsvc", "Test.Echo", {"text": "x" * (2 << 20)})
    assert e.status == 400 and "exceeds the limit" in e.detail
    bad_json = cli(a, "call", "testsvc", "Test.Echo", "{not json")
    assert bad_json.returncode == 1
    assert bad_json.stderr.startswith("400 bad request") and "column" in bad_json.stderr
    missing = cli(a, "call", "ghost", "X.Y", "{}")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "404 not found: service 'ghost' has no instances"
    # the service process dies in the middle of a call: 503, not a hang
    e = err("testsvc", "Test.Die", {"text": ""})
    assert e.status == 503
    svc.proc.wait(5)
    assert a.proc.poll() is None and b.proc.poll() is None


def test_watch_sees_create_and_delete(cluster):
    a, b, _ = three_nodes(cluster)

    async def main():
        async with control_stream(a.data_dir, "services.watch") as events:
            # a registry record of our own (a tunnel is one) shows the watch is live
            await trio.to_thread.run_sync(lambda: control(
                a.data_dir, "tunnel.expose", name="probe", to="127.0.0.1:9"))
            await events.next(lambda e: e["instance"].get("service") == "tunnel:probe", 10,
                              "the probe")
            svc = cluster.service(b)
            created = await events.next(lambda e: e["instance"].get("service") == "testsvc",
                                        15, "testsvc's instance")
            svc.kill9()
            deleted = await events.next(lambda e: e["key"] == created["key"]
                                        and e["kind"] == "delete", 15, "the delete")
            return events.seen, created, deleted

    seen, created, deleted = trio.run(main)
    about = [e["kind"] for e in seen if e["key"] == created["key"]]
    assert about[0] == "create" and about[-1] == "delete", about
    assert created["instance"]["node"] == "b" and created["key"].startswith("b/")
    assert deleted["instance"]["id"] == created["instance"]["id"]


def test_sdk_without_daemon_fails_at_once(tmp_path):
    env = {**os.environ, "MESHD_ADDR": str(tmp_path / "none.sock")}
    code = ("import trio\nfrom sdk import Client\n"
            "async def main():\n    await Client().call('x', 'Y.z', {})\n"
            "trio.run(main)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode != 0
    assert "start one with `meshd up`" in out.stderr
    assert time.monotonic() - start < 5


def test_server_and_bidirectional_streams_across_nodes(cluster):
    a, b, _ = three_nodes(cluster)
    cluster.service(b)
    wait_for(lambda: instances_everywhere([a, b], "testsvc", 1), 10, "service up")

    async def go():
        async with Client(a.data_dir / "meshd.sock") as client:
            async with client.stream("testsvc", "Test.Count", {"n": 500}) as s:
                got = [m["text"] async for m in s]
            assert got == [str(i) for i in range(500)]
            async with client.stream("testsvc", "Test.Upper") as s:
                for word in ("ada", "bob"):
                    await s.send({"text": word})
                    assert (await s.receive()) == {"text": word.upper()}
                await s.close_send()
                assert [m async for m in s] == []
            with pytest.raises(MeshError) as info:
                async with client.stream("testsvc", "Test.Upper") as s:
                    await s.send({"text": 5})
                    await s.receive()
            assert info.value.status == 400

    trio.run(go)
    out = cli(a, "stream", "testsvc", "Test.Count", '{"n": 3}', "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(x) for x in out.stdout.splitlines()] == [{"text": "0"}, {"text": "1"},
                                                            {"text": "2"}]


def test_stream_backpressure_slow_reader_bounds_the_pipeline(cluster):
    a, b, _ = three_nodes(cluster)
    cluster.service(b)
    wait_for(lambda: instances_everywhere([a, b], "testsvc", 1), 10, "service up")
    total, pad = 3000, 10_000  # 30 MB if nothing pushed back

    async def go():
        async with Client(a.data_dir / "meshd.sock") as client, \
                client.stream("testsvc", "Test.Count", {"n": total, "pad": pad}) as s:
            first = await s.receive()
            # stop reading: the producer must stall. Wait until its count stops moving (the
            # same for a second), however fast or slow this machine is: without
            # backpressure it stops only at `total`
            counts: list[int] = []
            with trio.fail_after(60):
                while len(counts) < 5 or len(set(counts[-5:])) > 1:
                    counts.append((await client.call("testsvc", "Test.Produced",
                                                     {"text": ""}))["n"])
                    await trio.sleep(0.25)
            during = counts[-1]
            rest = 0
            async for _ in s:
                rest += 1
            return first, during, rest

    first, during, rest = trio.run(go)
    assert first["text"].startswith("0.") and rest == total - 1
    assert during < total / 2, f"producer ran ahead by {during} messages: no backpressure"
    print(f"producer stalled after {during} of {total} messages")


def test_calls_retry_on_another_instance_when_a_node_is_unreachable(cluster):
    a, b, c = three_nodes(cluster)
    cluster.service(b)
    cluster.service(c)
    wait_for(lambda: instances_everywhere([a, b, c], "testsvc", 2), 10, "2 instances")
    [on_c] = [i["id"] for i in control(a.data_dir, "describe", service="testsvc")["instances"]
              if i["node"] == "c"]
    # warm the mux to c, then kill c's daemon: its instance is still listed for a while
    for _ in range(10):
        sdk_call(a, "testsvc", "Test.Echo", {"text": "warm"})
    c.kill9()
    assert len(control(a.data_dir, "describe", service="testsvc")["instances"]) == 2
    answers = [sdk_call(a, "testsvc", "Test.Whoami", {"text": ""})["text"] for _ in range(30)]
    assert all(x.startswith("b:") for x in answers)
    # b answered because the calls that picked c's instance were retried on b's
    assert f"not delivered to {on_c}" in a.log.read_text(), "no call was tried on c at all"


def test_local_calls_take_the_fast_path_and_answer_as_the_ordinary_one(cluster):
    """A call to a service whose instances all run on the caller's node is answered from
    callbacks (RpcService.call_fast): the same replies and errors as the ordinary path."""
    a = cluster.add("a", env=FAST)
    svc = cluster.service(a)
    wait_for(lambda: instances_everywhere([a], "testsvc", 1), 10, "service up")

    def fast_calls() -> int:
        return control(a.data_dir, "status")["stats"]["rpc_fast_calls"]

    def err(*call, **kw) -> MeshError:
        with pytest.raises(MeshError) as info:
            sdk_call(a, *call, **kw)
        return info.value

    before = fast_calls()
    assert sdk_call(a, "testsvc", "Test.Echo", {"text": "hi"}) == {"text": "hi"}
    got = sdk_call(a, "testsvc", "Test.Meta", {"text": "x-user"},
                   meta={"x-user": "ada", "trace-id": "t-9"})
    assert got == {"trace": "t-9", "caller": "a", "user": "ada"}
    e = err("testsvc", "Test.Boom", {"text": "bad day"})
    assert e.status == 500 and "boom: bad day" in e.detail
    e = err("testsvc", "Test.Echo", {"text": 5})
    assert e.status == 400 and "'text'" in e.detail
    start = time.monotonic()
    e = err("testsvc", "Test.Sleep", {"seconds": 30}, timeout=0.5)
    assert (e.status, e.detail) == (408, "call to testsvc.Test.Sleep did not finish within "
                                         "0.5 s")
    assert 0.5 <= time.monotonic() - start < 3
    assert fast_calls() - before == 5
    # what the fast path does not take runs the ordinary way, with its answers
    e = err("testsvc", "Test.Nope", {})
    assert e.status == 404 and "Test.Echo" in e.detail
    e = err("testsvc", "Test.Echo", {"text": "x" * (2 << 20)})
    assert e.status == 400 and "exceeds the limit" in e.detail
    e = err("testsvc", "Test.Echo", {"text": "x"}, timeout=7200)
    assert e.status == 400 and "timeout" in e.detail
    assert fast_calls() - before == 5
    e = err("testsvc", "Test.Die", {"text": ""})  # the process dies mid-call: 503
    assert e.status == 503 and fast_calls() - before == 6
    svc.proc.wait(5)
    assert a.proc.poll() is None


def test_metadata_trace_and_caller_reach_the_handler_and_roundrobin_is_even(cluster):
    a, b, c = three_nodes(cluster)
    for d in (a, b, c):
        cluster.service(d)
    wait_for(lambda: instances_everywhere([a, b, c], "testsvc", 3), 10, "3 instances")
    got = sdk_call(a, "testsvc", "Test.Meta", {"text": "x-user"},
                   meta={"x-user": "ada", "trace-id": "t-123"})
    assert got == {"trace": "t-123", "caller": "a", "user": "ada"}
    auto = sdk_call(a, "testsvc", "Test.Meta", {"text": "none"})
    assert len(auto["trace"]) == 32
    seen = Counter(sdk_call(b, "testsvc", "Test.Whoami", {"text": ""},
                            selector="roundrobin")["text"].split(":")[0] for _ in range(30))
    assert seen == {"a": 10, "b": 10, "c": 10}
    near = Counter(sdk_call(b, "testsvc", "Test.Whoami", {"text": ""},
                            selector="nearest")["text"].split(":")[0] for _ in range(10))
    assert near == {"b": 10}, "the local instance is the nearest"


def test_hung_service_process_misses_its_ttl_and_leaves(cluster):
    import signal

    a, b, _ = three_nodes(cluster)
    svc = cluster.service(b)
    wait_for(lambda: instances_everywhere([a, b], "testsvc", 1), 10, "service up")
    svc.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
    try:
        took = wait_for(lambda: instances_everywhere([a, b], "testsvc", 0), 2 + 5,
                        "the hung instance dropped")
        assert took < 2 + 3
    finally:
        svc.proc.send_signal(signal.SIGCONT)


def test_typeddict_formats_are_published_and_checked_on_the_way_in(cluster):
    """README: request and response types are dataclasses or TypedDicts, published in the
    registry and checked on the way in."""
    a, b, _ = three_nodes(cluster)
    cluster.service(b, "orders", script=SERVICES / "typedsvc.py")
    wait_for(lambda: instances_everywhere([a, b], "orders", 1), 10, "orders on a and b")
    [inst] = control(a.data_dir, "describe", service="orders")["instances"]
    ep = {e["name"]: e for e in inst["endpoints"]}["Orders.Place"]
    assert ep["request"] == {"type": "object", "title": "Order", "properties": {
        "item": {"type": "string"}, "qty": {"type": "integer"}, "note": {"type": "string"}},
        "required": ["item", "qty"], "additionalProperties": False}
    assert ep["response"] == {"type": "object", "title": "Receipt", "properties": {
        "item": {"type": "string"}, "total": {"type": "integer"}, "note": {"type": "string"},
        "request_type": {"type": "string"}}, "required": ["item", "note", "request_type",
                                                         "total"], "additionalProperties": False}
    assert sdk_call(a, "orders", "Orders.Place", {"item": "pen", "qty": 2}) == {
        "item": "pen", "total": 6, "note": "", "request_type": "dict"}
    assert sdk_call(a, "orders", "Orders.Place", {"item": "pen", "qty": 1, "note": "gift"})[
        "note"] == "gift"
    for body, detail in [
            ({"item": "pen", "qty": "2"}, "field 'qty': expected integer, got string"),
            ({"item": "pen"}, "field 'qty': missing"),
            ({"item": "pen", "qty": 1, "note": 7}, "field 'note': expected string, got integer"),
            ({"item": "pen", "qty": 1, "colour": "red"},
             "field 'colour': unknown field (known: item, qty, note)"),
            (["pen"], "field 'request': expected object, got array")]:
        with pytest.raises(MeshError) as info:
            sdk_call(a, "orders", "Orders.Place", body)
        assert (info.value.status, info.value.detail) == (400, detail), body
    out = cli(a, "call", "orders", "Orders.Place", '{"item": 5, "qty": 1}')
    assert (out.returncode, out.stderr) == (
        1, "400 bad request: field 'item': expected string, got integer\n")
