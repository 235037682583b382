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
from sdk import Client

from .cluster import control, wait_for

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
    for d in daemons:
        try:
            rows = control(d.data_dir, "describe", service=service)["instances"]
        except MeshError:
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
    return subprocess.run([sys.executable, "-m", "cli", *args, "--data-dir",
                           str(daemon.data_dir)], capture_output=True, text=True, timeout=20,
                          input=stdin)


def test_greeter_on_a_called_from_b_and_c_by_cli_and_sdk(cluster):
    a, b, c = three_nodes(cluster)
    cluster.service(a, "greeter", script=ROOT / "examples" / "greeter" / "main.py")
    wait_for(lambda: instances_everywhere([a, b, c], "greeter", 1), 10, "greeter everywhere")
    out = cli(b, "call", "greeter", "Greeter.Hello", '{"name": "Ada"}', "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"msg": "Hello Ada"}
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
                         "versions": ["1.0.0"]}]
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
    events = []

    async def watch():
        from meshd.control import ControlClient

        client = ControlClient(a.data_dir / "meshd.sock")
        with trio.move_on_after(12):
            async for ev in client.stream("services.watch"):
                events.append(ev)
                if ev["kind"] == "delete":
                    break
        await client.aclose()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(0.3)
            svc = cluster.service(b)
            await trio.sleep(2.5)
            svc.kill9()

    trio.run(main)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "create" and kinds[-1] == "delete"
    assert events[0]["instance"]["service"] == "testsvc"


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
            await trio.sleep(2)  # stop reading: the producer must stall
            during = (await client.call("testsvc", "Test.Produced", {"text": ""}))["n"]
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
    # warm the mux to c, then kill c's daemon: its instance is still listed for a while
    for _ in range(10):
        sdk_call(a, "testsvc", "Test.Echo", {"text": "warm"})
    c.kill9()
    assert len(control(a.data_dir, "describe", service="testsvc")["instances"]) == 2
    answers = [sdk_call(a, "testsvc", "Test.Whoami", {"text": ""})["text"] for _ in range(30)]
    assert all(x.startswith("b:") for x in answers)
    st = control(a.data_dir, "status")
    assert st["name"] == "a"


def test_metadata_trace_and_caller_reach_the_handler_and_roundrobin_is_even(cluster):
    a, b, c = three_nodes(cluster)
    for d in (a, b, c):
        cluster.service(d)
    wait_for(lambda: instances_everywhere([a, b, c], "testsvc", 3), 10, "3 instances")
    got = sdk_call(a, "testsvc", "Test.Meta", {"text": "x-user"},
                   meta={"x-user": "ada", "trace-id": "t-123"})
    assert got == {"trace": "t-123", "caller": "a", "user": "ada"}
    auto = sdk_call(a, "testsvc", "Test.Meta", {"text": "none"})
    assert len(auto["trace"]) == 16
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
