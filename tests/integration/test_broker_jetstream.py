"""Durable topics on NATS JetStream (issue 21) with real daemons and a real nats-server:
creating a topic with `--backend nats`, publishing on one node and a durable subscriber on
another, queue groups across nodes, nak and ack-timeout redelivery, dead letters with their
reason, delays, dedupe, a subscriber that comes back, NATS going away and coming back, and
the URL (a credential) never shown or logged.

One nats-server (with a user and a password that needs quoting in a URL) and two daemons
are shared by the module (each test has topics of its own); the test that stops NATS
starts it again before it ends. Skipped with the reason when nats-server is not installed
(CI installs it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio

from meshd.errors import MeshError
from meshd_sdk import Client

from .cluster import Cluster, control, wait_for, wait_for_async
from .engine_servers import nats, why_no_nats
from .test_broker import nothing_more, take

pytestmark = pytest.mark.skipif(why_no_nats() is not None, reason=why_no_nats() or "")

USER, PASSWORD = "meshd-user", "pa:ss@w/rd-9f3k"  # quoted in the URL file
FAST = {"MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1", "MESHD_STORE_SYNC_INTERVAL": "1"}


class Env:
    def __init__(self, root: Path, server: Any, cluster: Cluster) -> None:
        self.root = root
        self.server = server
        self.cluster = cluster
        self.a = cluster.daemons["a"]
        self.b = cluster.daemons["b"]
        self.url_file = root / "nats-url"
        self.url_file.write_text(f"nats://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:"
                                 f"{server.port}\n")

    def client(self, d: Any) -> Client:
        return Client(d.data_dir / "meshd.sock")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("jetstream")
    with nats(root / "nats", USER, PASSWORD) as server:
        c = Cluster(root)
        try:
            a = c.add("a", env=FAST, extra=("--log-level", "debug"))
            c.add("b", join=[a.addr], env=FAST, extra=("--log-level", "debug"))
            wait_for(lambda: all(len(control(d.data_dir, "auth.rules.list")) == 3
                                 for d in c.daemons.values()), 20, "auth state everywhere")
            yield Env(root, server, c)
        finally:
            c.close()


def cli(d: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args, "--data-dir",
                           str(d.data_dir)], capture_output=True, text=True, timeout=60)


async def create(env: Env, topic: str, *extra: str) -> None:
    """Create `topic` on NATS (through a's CLI) and wait until both nodes know it."""
    made = await trio.to_thread.run_sync(lambda: cli(
        env.a, "topics", "create", topic, "--durable", "--backend", "nats", "--url-file",
        str(env.url_file), *extra))
    assert made.returncode == 0, made.stderr
    assert f"created durable topic {topic}" in made.stdout
    assert f"on NATS at 127.0.0.1:{env.server.port}" in made.stdout
    for d in (env.a, env.b):
        client = env.client(d)

        async def known(client: Client = client, name: str = d.name) -> bool:
            return any(t["topic"] == topic and name in t["nodes"]
                       for t in (await client.topics())["durable"])
        await wait_for_async(known, 15, f"{topic} known on {d.name}")


async def sees(client: Client, node: str, pattern: str, durable: str | None) -> None:
    """Wait until `client`'s daemon knows `node` has a subscriber of `pattern` (durable
    NAME, or a core one with None)."""
    async def check() -> bool:
        return any(r["node"] == node and r["pattern"] == pattern and r["durable"] == durable
                   for r in (await client.topics())["interest"])
    await wait_for_async(check, 15, f"{node}'s subscriber {durable} on {pattern}")


async def row(client: Client, topic: str) -> dict[str, Any]:
    return {t["topic"]: t for t in (await client.topics())["durable"]}[topic]


# --- publish on one node, a durable subscriber on another ------------------------------------


async def test_publish_on_a_reaches_a_durable_subscriber_on_b_and_acks_hold(env):
    await create(env, "js.orders")
    ca, cb = env.client(env.a), env.client(env.b)
    sent = [await ca.publish("js.orders", {"n": i}) for i in range(3)]
    assert [s["seq"] for s in sent] == [1, 2, 3]  # JetStream's sequence: it acknowledged
    assert all(s["backend"] == "nats" and not s["duplicate"] for s in sent)
    async with cb.subscribe("js.orders", durable="w") as sub, \
            cb.subscribe("js.orders") as core:  # core pub/sub stays on the mesh
        await sees(ca, "b", "js.orders", "w")
        await sees(ca, "b", "js.orders", None)
        got = await take(sub, 3)
        assert [m.body["n"] for m in got] == [0, 1, 2]
        assert [(m.attempt, m.origin, m.durable) for m in got] == [(1, "nats", "w")] * 3
        assert got[0].publisher == "node:a"
        for m in got:
            await m.ack()
        await ca.publish("js.orders", {"n": 3})
        (three,) = await take(sub, 1)
        assert three.body["n"] == 3
        await three.ack()
        assert [m.body["n"] for m in await take(core, 1)] == [3]
    # a new session of the same durable subscriber starts after the acks: nothing again
    async with cb.subscribe("js.orders", durable="w") as sub:
        await ca.publish("js.orders", {"n": 4})
        assert [m.body["n"] for m in await take(sub, 1)] == [4]
        assert await nothing_more(sub, 1.0) == []
    view = await row(ca, "js.orders")
    assert view["messages"] == 5 and view["settings"]["backend"] == "nats"
    assert view["subscribers"]["w"]["waiting"] == 0


async def test_members_of_a_durable_name_on_two_nodes_share_messages_once(env):
    await create(env, "js.work")
    ca, cb = env.client(env.a), env.client(env.b)
    got: dict[str, list[int]] = {"a": [], "b": []}

    async def drain(sub: Any, into: list[int]) -> None:
        async for m in sub:
            into.append(m.body["i"])
            await m.ack()

    async with ca.subscribe("js.work", durable="g") as sa, \
            cb.subscribe("js.work", durable="g") as sb:
        await sees(ca, "a", "js.work", "g")
        await sees(ca, "b", "js.work", "g")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, sa, got["a"])
            nursery.start_soon(drain, sb, got["b"])
            # publish until both nodes have had messages (each binds to the consumer's
            # deliver group a moment after it sees its member), then 20 more
            sent = 0
            with trio.fail_after(30):
                while not (got["a"] and got["b"]) or sent < 20:
                    await ca.publish("js.work", {"i": sent})
                    sent += 1
                    await trio.sleep(0.02)
                while len(got["a"]) + len(got["b"]) < sent:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)  # a duplicate would arrive by now
            nursery.cancel_scope.cancel()
    together = sorted(got["a"] + got["b"])
    assert together == list(range(sent)), "each message to exactly one member"
    assert got["a"] and got["b"], "JetStream's deliver group spreads them over both nodes"


# --- redelivery and dead letters ---------------------------------------------------------------


async def test_nak_and_ack_timeout_redeliver_then_max_deliver_moves_to_dead(env):
    await create(env, "js.poison", "--max-deliver", "2", "--ack-wait", "1s")
    ca, cb = env.client(env.a), env.client(env.b)
    async with cb.subscribe("js.poison", durable="p") as sub, \
            ca.subscribe("js.poison.dead", durable="dl") as dead:
        await sees(ca, "b", "js.poison", "p")
        await sees(ca, "a", "js.poison.dead", "dl")
        await ca.publish("js.poison", {"k": "nakked"})
        await ca.publish("js.poison", {"k": "ignored"}, headers={"h": "1"})
        first = await take(sub, 2)
        assert [(m.body["k"], m.attempt) for m in first] == [("nakked", 1), ("ignored", 1)]
        await first[0].nak(0.1)  # comes again (attempt 2); "ignored" waits for its timeout
        again = await take(sub, 2)
        assert sorted((m.body["k"], m.attempt) for m in again) == [("ignored", 2),
                                                                   ("nakked", 2)]
        for m in again:
            if m.body["k"] == "nakked":
                await m.ack()
        # "ignored" is not acked after its second delivery either: a third would exceed
        # --max-deliver 2, so it goes to js.poison.dead with the reason instead
        (d,) = await take(dead, 1)
        assert d.body == {"k": "ignored"} and d.topic == "js.poison.dead"
        assert d.headers["meshd-dead-reason"].startswith("not acked after 2 deliveries")
        assert "'p'" in d.headers["meshd-dead-reason"]
        assert d.headers["meshd-dead-topic"] == "js.poison" and d.headers["h"] == "1"
        await d.ack()
        assert await nothing_more(sub, 1.5) == []  # neither comes again
    view = await row(ca, "js.poison")
    assert view["subscribers"]["p"]["dead"] == 1
    assert (await row(ca, "js.poison.dead"))["messages"] == 1


# --- delays and dedupe ------------------------------------------------------------------------


async def test_a_delayed_message_is_delivered_no_earlier_than_due(env):
    await create(env, "js.later")
    ca, cb = env.client(env.a), env.client(env.b)
    async with cb.subscribe("js.later", durable="l") as sub, \
            cb.subscribe("js.later") as core:
        await sees(ca, "b", "js.later", "l")
        await sees(ca, "b", "js.later", None)
        sent_at = time.time()
        await ca.publish("js.later", {"k": "later"}, delay=2)
        await ca.publish("js.later", {"k": "now"})
        first, second = await take(sub, 2)
        arrived = time.time()
        assert first.body == {"k": "now"}, "a delayed message holds nothing back"
        assert second.body == {"k": "later"} and second.attempt == 1
        assert arrived >= sent_at + 2, "delivered no earlier than due"
        for m in (first, second):
            await m.ack()
        assert [m.body for m in await take(core, 1)] == [{"k": "now"}]
        assert await nothing_more(core, 0.5) == [], "core subscribers never see delayed ones"
    assert (await row(ca, "js.later"))["messages"] == 2  # the delayed copy was moved


async def test_republishing_an_id_is_a_duplicate(env):
    await create(env, "js.dedupe")
    ca, cb = env.client(env.a), env.client(env.b)
    one = await ca.publish("js.dedupe", {"v": 1}, id="order-17")
    two = await cb.publish("js.dedupe", {"v": 2}, id="order-17")  # another node, same stream
    assert not one["duplicate"] and two["duplicate"] and two["seq"] == one["seq"]
    async with cb.subscribe("js.dedupe", durable="d") as sub:
        (m,) = await take(sub, 1)
        assert m.id == "order-17" and m.body == {"v": 1}
        await m.ack()
        assert await nothing_more(sub, 1.0) == []


async def test_a_message_that_is_not_meshd_s_is_terminated_and_counted(env):
    await create(env, "js.foreign")
    ca, cb = env.client(env.a), env.client(env.b)
    bad_before = (await cb.topics())["stats"]["broker_nats_bad"]

    def publish_raw() -> None:  # another NATS client writes to the topic's subject
        import nats as nats_py

        async def go() -> None:
            nc = await nats_py.connect(f"nats://127.0.0.1:{env.server.port}", user=USER,
                                       password=PASSWORD)
            await nc.jetstream().publish("meshd.default.m.js.foreign", b"not cbor \xff")
            await nc.close()
        asyncio.run(go())

    await trio.to_thread.run_sync(publish_raw)
    await ca.publish("js.foreign", {"ok": True})
    async with cb.subscribe("js.foreign", durable="f") as sub:
        (m,) = await take(sub, 1)
        assert m.body == {"ok": True}
        await m.ack()
    assert (await cb.topics())["stats"]["broker_nats_bad"] == bad_before + 1


# --- a subscriber that comes back, NATS that comes back ------------------------------------------


async def test_a_durable_subscriber_restarted_resumes_after_its_last_ack(env):
    await create(env, "js.resume")
    ca, cb = env.client(env.a), env.client(env.b)
    for i in range(5):
        await ca.publish("js.resume", {"i": i})
    async with cb.subscribe("js.resume", durable="r") as sub:
        got = await take(sub, 4)
        for m in got[:3]:
            await m.ack()
        assert got[3].body == {"i": 3}  # held, not acked, when the subscriber goes away
    async with cb.subscribe("js.resume", durable="r") as sub:
        again = await take(sub, 2)
        assert [m.body["i"] for m in again] == [3, 4]
        assert again[0].attempt == 1, "handed back by a member that left: not an attempt"
        for m in again:
            await m.ack()
        assert await nothing_more(sub, 1.0) == []


async def test_nats_down_publish_is_a_503_with_the_cause_and_both_resume(env):
    await create(env, "js.outage")
    ca, cb = env.client(env.a), env.client(env.b)
    async with cb.subscribe("js.outage", durable="o") as sub:
        await sees(ca, "b", "js.outage", "o")
        await ca.publish("js.outage", {"n": 1})
        (m,) = await take(sub, 1)
        await m.ack()
        env.server.stop()
        try:
            async def refused() -> bool:
                with trio.fail_after(20):  # never a hang
                    try:
                        await ca.publish("js.outage", {"n": "lost"})
                    except MeshError as exc:
                        assert exc.status == 503, exc
                        assert f"NATS at 127.0.0.1:{env.server.port}" in exc.detail
                        assert "unreachable" in exc.detail and PASSWORD not in exc.detail
                        return True
                return False
            await wait_for_async(refused, 20, "a publish refused while NATS is down")
        finally:
            env.server.start()

        async def accepted() -> bool:
            try:
                await ca.publish("js.outage", {"n": 2})
                return True
            except MeshError as exc:
                if exc.status != 503:
                    raise
                return False
        await wait_for_async(accepted, 30, "publishing again once NATS is back")
        got = [m.body for m in await take(sub, 1, timeout=30)]
        assert got == [{"n": 2}], "delivery resumed without restarting meshd"
    assert all(t.get("nats", {}).get("error") is None
               for t in (await ca.topics())["durable"] if t["topic"] == "js.outage")


# --- the URL is a credential --------------------------------------------------------------------


def test_a_bad_url_file_is_a_clear_cli_error(env):
    secretish = env.root / "not-a-url"
    secretish.write_text("hunter2-not-a-url\n")
    unreachable = env.root / "unreachable-url"
    unreachable.write_text("nats://someone:pw-unreach@127.0.0.1:9/\n")
    refused = env.root / "wrong-password-url"
    refused.write_text(f"nats://{USER}:pw-unreach@127.0.0.1:{env.server.port}\n")
    for args, expected in [
            (("--url-file", str(env.root / "missing")), "cannot read it"),
            (("--url-file", str(secretish)), "is not a NATS URL"),
            ((), "--backend nats needs --url-file"),
            (("--url-file", str(unreachable)), "503"),
            # the cause; on a loaded host the server's reset can overtake its -ERR line
            (("--url-file", str(refused)), ("Authorization Violation", "reset by peer")),
    ]:
        r = cli(env.a, "topics", "create", "js.bad", "--durable", "--backend", "nats", *args)
        assert r.returncode != 0, (args, r.stdout)
        out = r.stderr.strip()
        wanted = expected if isinstance(expected, tuple) else (expected,)
        assert any(w in out for w in wanted) and "Traceback" not in out, (args, out)
        assert len(out.splitlines()) == 1, out
        assert "hunter2" not in out and "pw-unreach" not in out
    r = cli(env.a, "topics", "create", "js.bad", "--durable", "--url-file", str(secretish))
    assert r.returncode != 0 and "--url-file is for --backend nats" in r.stderr
    assert not any(t["topic"] == "js.bad"
                   for t in control(env.a.data_dir, "broker.topics")["durable"])


async def test_the_url_never_appears_in_views_or_logs(env):
    """Last in the module: every test before it used the URL (including NATS going away)."""
    await create(env, "js.secret")
    listed = await trio.to_thread.run_sync(cli, env.b, "topics", "--json")
    assert listed.returncode == 0, listed.stderr
    table = await trio.to_thread.run_sync(cli, env.b, "topics")
    made = await trio.to_thread.run_sync(lambda: cli(
        env.a, "topics", "create", "js.secret", "--durable", "--backend", "nats",
        "--url-file", str(env.url_file), "--json"))
    assert made.returncode == 0, made.stderr
    view = json.loads(listed.stdout)
    settings = {t["topic"]: t for t in view["durable"]}["js.secret"]["settings"]
    assert settings["backend"] == "nats"
    assert settings["server"] == f"127.0.0.1:{env.server.port}" and "url" not in settings
    assert json.loads(made.stdout)["server"] == settings["server"]
    logs = json.dumps(await env.a.call("debug.logs"))
    files = "".join(d.log.read_text(errors="replace") for d in (env.a, env.b))
    assert "connected to NATS at 127.0.0.1" in files  # the logs do talk about NATS
    for text in (listed.stdout, table.stdout, made.stdout, logs, files):
        assert PASSWORD not in text and quote(PASSWORD, safe="") not in text
        assert f"{USER}:" not in text
