"""The broker with real daemons on loopback: fan-out, wildcards, queue groups, slow
subscribers, durable topics (kill -9 of a subscriber and of the publishing node),
redelivery, dead letters, delays, typed subscribers, bad input and the CLI.

Most tests share one three-node cluster (module scope) and use topics of their own; the
tests that kill a node start their own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.errors import MeshError
from meshd_sdk import Client, Service

from .cluster import Cluster, Lines, control, wait_for, wait_for_async

FAST = {"MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1", "MESHD_STORE_SYNC_INTERVAL": "1"}


def sock(d: Any) -> Path:
    return d.data_dir / "meshd.sock"


def ready(*daemons: Any) -> None:
    n = len(daemons)
    wait_for(lambda: all(len([m for m in d.members().values() if m["status"] == "alive"]) == n
                         for d in daemons), 20, f"{n} alive")
    wait_for(lambda: all(len(control(d.data_dir, "auth.rules.list")) == 3 for d in daemons),
             15, "auth state everywhere")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("broker"))
    try:
        a = c.add("a", env=FAST)
        b = c.add("b", join=[a.addr], env=FAST)
        d = c.add("c", join=[a.addr], env=FAST)
        ready(a, b, d)
        yield c
    finally:
        c.close()


def cli(daemon: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args, "--data-dir",
                           str(daemon.data_dir)], capture_output=True, text=True, timeout=30,
                          input=stdin)


async def sees(client: Client, node: str, pattern: str, queue: str | None = None,
               durable: str | None = None, count: int = 1, ns: str | None = None) -> None:
    """Wait until `client`'s daemon knows `node` has `count` subscribers of the pattern."""
    async def check() -> bool:
        rows = (await client.topics(namespace=ns))["interest"]
        return any(r["node"] == node and r["pattern"] == pattern and r["queue"] == queue
                   and r["durable"] == durable and r["subscribers"] >= count for r in rows)
    await wait_for_async(check, 15, f"interest of {node} in {pattern} ({queue}, {durable})")


async def durable_known(client: Client, topic: str) -> None:
    """Wait until the client's own node has the topic's definition."""
    async def check() -> bool:
        view = await client.topics()
        return any(t["topic"] == topic and view["node"] in t["nodes"]
                   for t in view["durable"])
    await wait_for_async(check, 15, f"durable topic {topic} known")


async def take(sub: Any, n: int, timeout: float = 15) -> list[Any]:
    out = []
    with trio.fail_after(timeout):
        while len(out) < n:
            out.append(await sub.receive())
    return out


async def nothing_more(sub: Any, wait: float = 0.5) -> list[Any]:
    """What else arrives within `wait` seconds (for "and nothing else" checks made after a
    sentinel proved the pipe is flushed)."""
    extra = []
    with trio.move_on_after(wait):
        while True:
            extra.append(await sub.receive())
    return extra


async def stat(client: Client, name: str) -> int:
    return int((await client.topics())["stats"][name])


# --- core delivery ---------------------------------------------------------------------


async def test_fan_out_to_three_nodes_with_wildcards_one_copy_per_node(mesh):
    a, b, c = (mesh.daemons[n] for n in "abc")
    ca, cb, cc = Client(sock(a)), Client(sock(b)), Client(sock(c))
    async with cb.subscribe("fan.orders.*") as b_one, \
            cb.subscribe("fan.*.created") as b_star, \
            cc.subscribe("fan.orders.>") as c_rest, \
            cc.subscribe("fan.other") as c_other, \
            ca.subscribe("fan.orders.created") as a_exact:
        for node, pattern in (("b", "fan.orders.*"), ("b", "fan.*.created"),
                              ("c", "fan.orders.>"), ("c", "fan.other")):
            await sees(ca, node, pattern)
        b_in = await stat(cb, "broker_copies_in")
        first = await ca.publish("fan.orders.created", {"n": 1})
        assert first["nodes"] == 3  # a (local), b and c: one copy each
        await ca.publish("fan.orders.eu.created", {"n": 2})
        await ca.publish("fan.orders.zz", {"n": 3})
        await ca.publish("fan.other", {"n": 4})
        assert [m.body["n"] for m in await take(b_one, 2)] == [1, 3]
        assert [m.body["n"] for m in await take(b_star, 1)] == [1]
        assert [m.body["n"] for m in await take(c_rest, 3)] == [1, 2, 3]
        assert [m.body["n"] for m in await take(c_other, 1)] == [4]
        assert [m.body["n"] for m in await take(a_exact, 1)] == [1]
        for sub in (b_one, b_star, c_rest, c_other, a_exact):
            assert await nothing_more(sub, 0.3) == []
        # b holds two matching subscriptions for message 1 and one for message 3: two
        # copies reached it for those, not three (a node gets one copy however many match)
        assert await stat(cb, "broker_copies_in") - b_in == 2


async def test_message_fields_and_publisher_identity(mesh):
    a, b = mesh.daemons["a"], mesh.daemons["b"]
    ca, cb = Client(sock(a)), Client(sock(b))
    async with cb.subscribe("fields.x") as sub:
        await sees(ca, "b", "fields.x")
        sent = await ca.publish("fields.x", {"k": [1, 2]}, headers={"trace": "t1"},
                                id="my-id-1")
        (got,) = await take(sub, 1)
    assert got.id == "my-id-1" == sent["id"]
    assert got.topic == "fields.x" and got.body == {"k": [1, 2]}
    assert got.headers == {"trace": "t1"}
    assert got.publisher == "node:a"  # who the publisher's daemon identified
    assert abs(got.published_at - time.time()) < 60


async def test_a_queue_group_across_two_nodes_takes_1000_messages_exactly_once(mesh):
    a, b, c = (mesh.daemons[n] for n in "abc")
    ca, cb, cc = Client(sock(a)), Client(sock(b)), Client(sock(c))
    got: dict[str, list[int]] = {"b1": [], "b2": [], "c1": [], "c2": []}
    plain: list[int] = []
    total = 1000

    def count() -> int:
        return sum(len(v) for v in got.values())

    async def drain(sub: Any, into: list[int], done: trio.Event) -> None:
        async for msg in sub:
            into.append(msg.body["i"])
            if count() >= total and len(plain) >= total:
                done.set()

    # two members of the group on b and on c (with different patterns)
    async with cb.subscribe("work.jobs", queue="workers", policy="block") as qb1, \
            cb.subscribe("work.>", queue="workers", policy="block") as qb2, \
            cc.subscribe("work.*", queue="workers", policy="block") as qc1, \
            cc.subscribe("work.jobs", queue="workers", policy="block") as qc2, \
            ca.subscribe("work.jobs", policy="block") as everything:
        await sees(ca, "b", "work.jobs", queue="workers")
        await sees(ca, "b", "work.>", queue="workers")
        await sees(ca, "c", "work.*", queue="workers")
        await sees(ca, "c", "work.jobs", queue="workers")
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            for sub, into in ((qb1, got["b1"]), (qb2, got["b2"]), (qc1, got["c1"]),
                              (qc2, got["c2"]), (everything, plain)):
                nursery.start_soon(drain, sub, into, done)
            async with ca.publisher() as pub:
                for i in range(total):
                    await pub.publish("work.jobs", {"i": i})
            with trio.fail_after(30):
                await done.wait()
            await trio.sleep(0.3)  # anything extra (a duplicate) would arrive by now
            nursery.cancel_scope.cancel()
    together = sorted(v for values in got.values() for v in values)
    assert together == list(range(total)), "each message exactly once within the group"
    for name, values in got.items():  # each member sees its share in publish order
        assert values == sorted(values), name
    for node in "bc":  # whichever node the group's messages went to shares them out
        one, two = got[node + "1"], got[node + "2"]
        if len(one) + len(two) >= 2:
            assert one and two, f"{node}'s two members share what {node} is given"
    assert plain == list(range(total)), "a plain subscriber gets every message, in order"


async def test_drop_policies_count_what_they_drop(mesh):
    a = mesh.daemons["a"]
    ca = Client(sock(a))
    async with ca.subscribe("slow.x", buffer=10, policy="drop-newest") as newest, \
            ca.subscribe("slow.x", buffer=10, policy="drop-oldest") as oldest:
        # nothing is read while 30 messages arrive: the daemon sends each subscriber as
        # many as its credit (by default its buffer: 10), its inbox holds 10 more
        for i in range(30):
            await ca.publish("slow.x", {"i": i})
        rows = {r["policy"]: r for r in (await ca.topics())["local"]
                if r["pattern"] == "slow.x"}
        assert rows["drop-newest"]["dropped"] == 10
        assert rows["drop-oldest"]["dropped"] == 10
        assert [m.body["i"] for m in await take(newest, 20)] == list(range(20))
        assert [m.body["i"] for m in await take(oldest, 20)] == [*range(10), *range(20, 30)]
        assert newest.dropped == 10 and oldest.dropped == 10  # each subscriber is told
        assert await nothing_more(newest, 0.2) == [] and await nothing_more(oldest, 0.2) == []


async def test_block_policy_holds_the_publisher_back_across_nodes(mesh):
    a, b = mesh.daemons["a"], mesh.daemons["b"]
    ca, cb = Client(sock(a)), Client(sock(b))
    body = "x" * 60_000
    async with cb.subscribe("bp.x", buffer=5, policy="block") as sub:
        await sees(ca, "b", "bp.x")
        published = 0
        blocked = False
        async with trio.open_nursery() as nursery:
            async def publisher() -> None:
                nonlocal published
                for i in range(3000):  # bounded: back-pressure must stop it well before
                    await ca.publish("bp.x", {"i": i, "pad": body})
                    published += 1

            nursery.start_soon(publisher)
            last = -1
            while True:  # wait until the publisher makes no progress for 2 s
                await trio.sleep(2)
                if published == last:
                    blocked = True
                    break
                last = published
                if published >= 3000:
                    break
            assert blocked, "the publisher was never held back"
            assert published < 3000
            held = published
            # now read: everything published arrives, in order, nothing dropped, and the
            # publisher moves again
            seen = 0
            with trio.fail_after(60):
                while seen < held + 10:
                    msg = await sub.receive()
                    assert msg.body["i"] == seen
                    seen += 1
            assert published > held
            nursery.cancel_scope.cancel()
    rows = [r for r in (await cb.topics())["local"] if r["pattern"] == "bp.x"]
    assert rows == [] or rows[0]["dropped"] == 0


# --- durable topics ----------------------------------------------------------------------


async def create(client: Client, topic: str, **settings: Any) -> dict[str, Any]:
    return await client._request("broker.topics.create", topic=topic, **settings)


async def test_redelivery_after_ack_wait_then_dead_letter_with_the_reason(mesh):
    a, c = mesh.daemons["a"], mesh.daemons["c"]
    ca, cc = Client(sock(a)), Client(sock(c))
    await create(ca, "jobs.poison", max_deliver=3, ack_wait=0.5)
    await durable_known(cc, "jobs.poison")
    async with cc.subscribe("jobs.poison", durable="p") as sub, \
            cc.subscribe("jobs.poison.dead", durable="dl") as dead:
        await sees(ca, "c", "jobs.poison", durable="p")
        await ca.publish("jobs.poison", {"bad": True})
        first = (await take(sub, 1))[0]
        assert first.attempt == 1 and first.origin == "a" and first.seq == 1
        # not acked: it comes again after ack_wait
        second = (await take(sub, 1))[0]
        assert second.attempt == 2 and second.id == first.id
        await second.nak(delay=0)  # a nak: again at once
        third = (await take(sub, 1))[0]
        assert third.attempt == 3
        await third.nak(delay=0)  # the last attempt: dead
        (letter,) = await take(dead, 1)
        await letter.ack()
    assert letter.body == {"bad": True}
    assert "not acked after 3 deliveries" in letter.headers["meshd-dead-reason"]
    assert letter.headers["meshd-dead-topic"] == "jobs.poison"
    rows = {t["topic"]: t for t in (await ca.topics())["durable"]}
    assert rows["jobs.poison"]["subscribers"]["p"]["dead"] == 1


async def test_delayed_delivery_waits_until_due(mesh):
    a, b = mesh.daemons["a"], mesh.daemons["b"]
    ca, cb = Client(sock(a)), Client(sock(b))
    await create(ca, "later.x")
    await durable_known(cb, "later.x")
    async with cb.subscribe("later.x", durable="l") as sub, \
            cb.subscribe("later.x") as core:
        await sees(ca, "b", "later.x", durable="l")
        await sees(ca, "b", "later.x")
        r = await ca.publish("later.x", {"when": "later"}, delay=1.5)
        await ca.publish("later.x", {"when": "now"})
        (now,) = await take(sub, 1)
        assert now.body == {"when": "now"}, "a delayed message does not hold back the next"
        await now.ack()
        (later,) = await take(sub, 1)
        arrived = time.time()
        await later.ack()
        # the core subscriber sees only the message that was not delayed
        assert [m.body for m in await take(core, 1)] == [{"when": "now"}]
        assert await nothing_more(core, 0.3) == []
    assert later.body == {"when": "later"} and later.id == r["id"]
    assert arrived >= later.published_at + 1.5 - 0.05  # same host clock


async def test_republishing_an_id_is_a_duplicate(mesh):
    a = mesh.daemons["a"]
    ca = Client(sock(a))
    await create(ca, "dedup.x")
    fast = (await ca.topics())["stats"]["broker_durable_fast"]
    one = await ca.publish("dedup.x", {"v": 1}, id="order-7")
    two = await ca.publish("dedup.x", {"v": 2}, id="order-7")
    assert not one["duplicate"] and two["duplicate"] and one["seq"] == two["seq"]
    three = await ca.publish("dedup.x", {"v": 3})  # an id made by the daemon: never a dup
    assert not three["duplicate"] and three["seq"] == one["seq"] + 1
    # the SDK's publishes were answered by the group commit (no task of their own)
    assert (await ca.topics())["stats"]["broker_durable_fast"] == fast + 3


@dataclass
class Order:
    id: int
    item: str


async def test_a_service_subscriber_gets_typed_events_acks_and_naks(mesh):
    a, b = mesh.daemons["a"], mesh.daemons["b"]
    ca = Client(sock(a))
    await create(ca, "orders.typed", ack_wait=0.5)
    await durable_known(Client(sock(b)), "orders.typed")
    seen: list[Order] = []
    fail_once = {7}
    service = Service("billing", addr=sock(b))

    @service.subscriber("orders.typed", durable="billing")
    async def on_order(event: Order) -> None:
        seen.append(event)
        if event.id in fail_once:
            fail_once.discard(event.id)
            raise RuntimeError("try again")

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await sees(ca, "b", "orders.typed", durable="billing")
        await ca.publish("orders.typed", {"id": 7, "item": "tea"})
        await ca.publish("orders.typed", {"id": 8, "item": "cake"})
        await wait_for_async(lambda: _true(len(seen) >= 3), 15, "three deliveries")
        nursery.cancel_scope.cancel()
    assert all(isinstance(o, Order) for o in seen)
    assert sorted(o.id for o in seen) == [7, 7, 8]  # 7 failed once: delivered again
    rows = {t["topic"]: t for t in (await ca.topics())["durable"]}
    await wait_for_async(lambda: _floor(ca, "orders.typed", "a", "billing", 2), 10, "acked")
    assert rows["orders.typed"]["subscribers"]["billing"]["dead"] == 0


async def _true(value: bool) -> bool:
    return value


async def _floor(client: Client, topic: str, origin: str, name: str, floor: int) -> bool:
    """Whether `origin`'s log of `topic` has `name`'s acks up to `floor`."""
    rows = {t["topic"]: t for t in (await client.topics())["durable"]}
    return rows[topic]["nodes"][origin]["subscribers"][name]["acked_floor"] >= floor


async def test_topics_sums_every_nodes_log_and_lists_every_subscription(mesh):
    a, b, c = (mesh.daemons[n] for n in "abc")
    ca, cb, cc = Client(sock(a)), Client(sock(b)), Client(sock(c))
    await create(ca, "view.x")
    await durable_known(cb, "view.x")
    await durable_known(cc, "view.x")
    async with cc.subscribe("view.x", durable="v") as sub, \
            cb.subscribe("view.*", buffer=7, policy="drop-newest"):
        await sees(ca, "c", "view.x", durable="v")
        await sees(cb, "c", "view.x", durable="v")
        for _ in range(2):
            await ca.publish("view.x", {"from": "a"})
        for _ in range(3):
            await cb.publish("view.x", {"from": "b"})
        await take(sub, 5)  # delivered, none acked: pending on their origins
        view = await cc.topics()
    row = {t["topic"]: t for t in view["durable"]}["view.x"]
    assert row["messages"] == 5 and row["subscribers"]["v"]["pending"] == 5
    assert {n: row["nodes"][n]["messages"] for n in "abc"} == {"a": 2, "b": 3, "c": 0}
    assert row["nodes"]["a"]["subscribers"]["v"]["pending"] == 2
    assert view["unanswered"] == []
    subs = {(s["node"], s["pattern"]): s for s in view["subscriptions"]}
    assert subs[("b", "view.*")]["buffer"] == 7 and subs[("b", "view.*")]["policy"] == \
        "drop-newest"
    assert subs[("c", "view.x")]["durable"] == "v"


async def test_a_pipelined_publisher_reports_the_first_failure_and_lets_errors_through(mesh):
    ca = Client(sock(mesh.daemons["a"]))
    async with ca.subscribe("pipe.ok") as sub:
        with pytest.raises(MeshError) as err:
            async with ca.publisher() as pub:
                await pub.publish("pipe.ok", 1)
                await pub.publish("pipe..bad", 2)  # refused by the daemon: said at flush
                await pub.publish("pipe.ok", 3)
        assert err.value.status == 400 and "empty token" in err.value.detail
        assert [m.body for m in await take(sub, 2)] == [1, 3]  # the others went out
    with pytest.raises(KeyError):  # the block's own error comes out as itself
        async with ca.publisher():
            raise KeyError("mine")


# --- bad input -------------------------------------------------------------------------


async def test_bad_input_is_a_clear_error_and_disturbs_nothing(mesh):
    a = mesh.daemons["a"]
    ca = Client(sock(a))
    cases = [
        (ca.publish("a..b", {}), 400, "topic"),
        (ca.publish("a.*", {}), 400, "topic"),
        (ca.publish("big.x", "x" * (1 << 20)), 400, "limit"),
        (ca.publish("core.only", {}, delay=5), 404, "durable topic"),
        (ca.publish("x.y", {}, delay=-1), 400, "delay"),
        (ca._request("broker.topics.delete", topic="never.made"), 404, "no durable topic"),
        (ca._request("broker.topics.create", topic="bad..name"), 400, "topic"),
        (ca._request("broker.topics.create", topic="ok.name", max_msgs=0), 400, "max_msgs"),
    ]
    for call, status, words in cases:
        with pytest.raises(MeshError) as err:
            await call
        assert err.value.status == status, (err.value, words)
        assert words in err.value.detail, (err.value.detail, words)
    for kwargs, status, words in [
            ({"pattern": "a.>.b"}, 400, "'>'"),
            ({"pattern": "a.b", "queue": "durable:x"}, 400, "durable:"),
            ({"pattern": "a.b", "policy": "lose-all"}, 400, "policy"),
            ({"pattern": "a.b", "buffer": 0}, 400, "buffer"),
            ({"pattern": "no.such.durable", "durable": "d"}, 404, "no durable topic")]:
        with pytest.raises(MeshError) as err:
            async with ca.subscribe(**kwargs):
                pass
        assert err.value.status == status and words in err.value.detail, err.value
    # the daemon still serves
    async with ca.subscribe("still.ok") as sub:
        await ca.publish("still.ok", 1)
        assert [m.body for m in await take(sub, 1)] == [1]


async def test_publish_and_subscribe_need_permission(mesh):
    a = mesh.daemons["a"]
    admin = Client(sock(a))
    await admin._request("auth.rules.create", id="pub-perm", resource="topic:perm.*:publish",
                         scope="pub", access="granted", priority=20)
    await admin._request("auth.accounts.create", id="pubber", secret="pubber-secret-1",
                         scopes=["pub"])
    token = (await admin._request("auth.token.create", account="pubber", ttl=600))["token"]
    user = Client(sock(a), token=token)
    async with admin.subscribe("perm.x") as sub:
        await user.publish("perm.x", {"ok": True})
        assert [m.publisher for m in await take(sub, 1)] == ["pubber"]
    with pytest.raises(MeshError) as err:
        await user.publish("other.x", {})
    assert err.value.status == 403
    with pytest.raises(MeshError) as err:
        async with user.subscribe("perm.x"):
            pass
    assert err.value.status == 403
    with pytest.raises(MeshError) as err:
        await user._request("broker.topics.create", topic="perm.y")
    assert err.value.status == 403


# --- CLI -------------------------------------------------------------------------------


def test_cli_publish_subscribe_topics(mesh):
    a, b = mesh.daemons["a"], mesh.daemons["b"]
    proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", "subscribe", "cli.*", "--json",
                             "--data-dir", str(b.data_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc.stdout)
        wait_for(lambda: any(r["node"] == "b" and r["pattern"] == "cli.*" for r in
                             control(a.data_dir, "broker.topics")["interest"]), 15,
                 "interest of the CLI subscriber")
        out = cli(a, "publish", "cli.x", '{"hello": "world"}', "--header", "k=v")
        assert out.returncode == 0 and out.stdout.startswith("published "), out
        out = cli(a, "publish", "cli.y", stdin='"from stdin"')
        assert out.returncode == 0, out.stderr
        lines.wait(lambda s: "from stdin" in s, 15, "second message")
        got = [json.loads(s) for s in lines.text().splitlines() if s.strip()]
    finally:
        proc.terminate()
        proc.wait(5)
    assert set(got[0]) >= {"topic", "id", "headers", "body", "published_at"}
    assert got[0]["topic"] == "cli.x" and got[0]["body"] == {"hello": "world"}
    assert got[0]["headers"] == {"k": "v"} and got[1]["body"] == "from stdin"
    bad = cli(a, "publish", "cli.x", "not json")
    assert bad.returncode == 1 and bad.stderr.startswith("400 bad request: BODY is not valid JSON")
    bad = cli(a, "publish", "cli.x", "1", "--delay", "soon")
    assert bad.returncode == 1 and "--delay 'soon' is not a duration" in bad.stderr
    made = cli(a, "topics", "create", "cli.durable", "--durable", "--max-age", "1h",
               "--max-msgs", "100", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["max_age"] == 3600.0
    listed = json.loads(cli(a, "topics", "--json").stdout)
    topics = {t["topic"]: t for t in listed["durable"]}
    assert topics["cli.durable"]["settings"]["max_msgs"] == 100 and "cli.durable.dead" in topics
    pub = cli(a, "publish", "cli.durable", "5", "--delay", "1m")
    assert pub.returncode == 0 and "as #1 on a" in pub.stdout, pub
    gone = cli(a, "topics", "delete", "cli.durable")
    assert gone.returncode == 0 and "deleted durable topic cli.durable" in gone.stdout
    again = cli(a, "topics", "delete", "cli.durable")
    assert again.returncode == 1 and again.stderr.startswith("404")


# --- kill -9 -------------------------------------------------------------------------------


def two_nodes_with(c: Cluster, topic: str) -> tuple[Any, Any]:
    """Daemons a and b of a new cluster, with durable `topic` known on both."""
    a = c.add("a", env=FAST)
    b = c.add("b", join=[a.addr], env=FAST)
    ready(a, b)
    assert cli(a, "topics", "create", topic, "--durable").returncode == 0
    wait_for(lambda: any(t["topic"] == topic and "b" in t["nodes"] for t in
                         control(b.data_dir, "broker.topics")["durable"]), 15, "topic on b")
    return a, b


def test_durable_subscriber_killed_mid_stream_resumes_after_its_last_ack(tmp_path):
    c = Cluster(tmp_path)
    try:
        a, b = two_nodes_with(c, "kill.x")

        def start() -> tuple[subprocess.Popen[str], Lines]:
            p = subprocess.Popen([sys.executable, "-m", "meshd_cli", "subscribe", "kill.x",
                                  "--durable", "w", "--json", "--data-dir", str(b.data_dir)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            return p, Lines(p.stdout)

        first, lines1 = start()
        wait_for(lambda: any(r["durable"] == "w" for r in
                             control(a.data_dir, "broker.topics")["interest"]), 15, "w seen")
        for i in range(40):
            control(a.data_dir, "broker.publish", topic="kill.x", body=i)
        lines1.wait(lambda s: '"body": 20' in s, 20, "half the stream")
        first.kill()  # kill -9
        first.wait(5)
        before = [json.loads(s) for s in lines1.text().splitlines() if s.strip()]
        floor = {t["topic"]: t for t in control(a.data_dir, "broker.topics")["durable"]}[
            "kill.x"]["nodes"]["a"]["subscribers"]["w"]["acked_floor"]
        for i in range(40, 80):
            control(a.data_dir, "broker.publish", topic="kill.x", body=i)
        second, lines2 = start()
        try:
            lines2.wait(lambda s: '"body": 79' in s, 30, "the rest")
        finally:
            second.terminate()
            second.wait(5)
        after = [json.loads(s) for s in lines2.text().splitlines() if s.strip()]
    finally:
        c.close()
    bodies = [m["body"] for m in before + after]
    assert set(bodies) == set(range(80)), "every message delivered, none lost"
    again = [m for m in after if m["seq"] <= floor]
    assert again == [], "messages acked before the kill were delivered again"
    dupes = len(bodies) - len(set(bodies))
    assert dupes <= len(before) - floor  # only what the killed one had not acked


def test_the_publishing_node_restarted_after_kill_9_resumes_after_the_last_ack(tmp_path):
    """Durable state lives on the origin: after kill -9 and restart it delivers what was
    published (and acknowledged) before the kill and never repeats what was acked."""
    c = Cluster(tmp_path)
    try:
        a, b = two_nodes_with(c, "crash.x")

        async def saved() -> bool:
            rows = {t["topic"]: t for t in (await Client(sock(b)).topics())["durable"]}
            return rows["crash.x"]["nodes"]["b"]["subscribers"].get("w", {}).get(
                "saved_floor", 0) >= 1

        async def first() -> None:
            async with Client(sock(a)) as client, \
                    client.subscribe("crash.x", durable="w") as sub:
                await sees(client, "a", "crash.x", durable="w")
                await Client(sock(b)).publish("crash.x", {"n": 1})
                (msg,) = await take(sub, 1)
                await msg.ack()
                await wait_for_async(saved, 10, "the ack saved on b")
        trio.run(first)
        out = cli(b, "publish", "crash.x", '{"n": 2}', "--json")
        assert out.returncode == 0, out.stderr
        acked = json.loads(out.stdout)
        assert acked["node"] == "b" and acked["seq"] == 2
        b.kill9()  # right after the acknowledgement
        b.start(join=[a.addr])
        ready(a, b)

        async def receive(name: str, n: int) -> list[Any]:
            async with Client(sock(a)) as client, \
                    client.subscribe("crash.x", durable=name) as sub:
                msgs = await take(sub, n, timeout=30)
                for m in msgs:
                    await m.ack()
                return msgs + await nothing_more(sub, 0.5)
        resumed = trio.run(receive, "w", 1)
        fresh = trio.run(receive, "new", 2)
    finally:
        c.close()
    assert [m.body for m in resumed] == [{"n": 2}], "w resumes after its last ack"
    assert resumed[0].id == acked["id"] and resumed[0].origin == "b"
    assert [m.body for m in fresh] == [{"n": 1}, {"n": 2}], "a new subscriber gets all"


def test_replicas_hold_copies_and_deliver_them_while_the_origin_is_down(tmp_path):
    c = Cluster(tmp_path)
    try:
        a = c.add("a", env=FAST)
        b = c.add("b", join=[a.addr], env=FAST)
        d = c.add("c", join=[a.addr], env=FAST)
        ready(a, b, d)
        assert cli(a, "topics", "create", "rep.x", "--durable", "--replicas", "2").returncode == 0
        assert cli(a, "topics", "create", "rep.three", "--durable", "--replicas", "4"
                   ).returncode == 0
        for x in (a, b, d):
            wait_for(lambda x=x: sum(x.name in t["nodes"] for t in control(
                x.data_dir, "broker.topics")["durable"]) == 4, 15, "topics everywhere")
        out = cli(b, "publish", "rep.x", '{"n": 1}', "--json")
        assert out.returncode == 0, out.stderr
        acked = json.loads(out.stdout)
        holders = [x.name for x in (a, d) if {t["topic"]: t for t in control(
            x.data_dir, "broker.topics")["durable"]}["rep.x"]["nodes"][x.name]["copies"].get(
            "b") == 1]
        assert len(holders) == 1, "one other node holds a copy when the publish is acked"
        # four replicas cannot be held by three nodes: the publish says so (and is on b)
        short = cli(b, "publish", "rep.three", "1")
        assert short.returncode == 1 and short.stderr.startswith("408"), short
        assert "only 3 of 4 nodes hold" in short.stderr
        b.kill9()
        wait_for(lambda: a.status_of("b") == "dead" and d.status_of("b") == "dead", 30,
                 "b declared dead")

        async def first() -> Any:
            async with Client(sock(a)) as client, \
                    client.subscribe("rep.x", durable="w") as sub:
                (msg,) = await take(sub, 1, timeout=20)
                await msg.ack()
                return msg
        got = trio.run(first)
        assert got.body == {"n": 1} and got.id == acked["id"] and got.origin == "b"
        b.start(join=[a.addr])
        ready(a, b, d)
        wait_for(lambda: {t["topic"]: t for t in control(b.data_dir, "broker.topics")[
            "durable"]}["rep.x"]["nodes"]["b"]["subscribers"].get("w", {}).get(
            "acked_floor") == 1, 20,
            "b learns what was acked while it was down")

        async def again() -> list[Any]:
            async with Client(sock(a)) as client, \
                    client.subscribe("rep.x", durable="w") as sub:
                await Client(sock(b)).publish("rep.x", {"n": 2})
                msgs = await take(sub, 1, timeout=20)
                for m in msgs:
                    await m.ack()
                return msgs + await nothing_more(sub, 0.5)
        later = trio.run(again)
    finally:
        c.close()
    assert [m.body for m in later] == [{"n": 2}], "the message acked meanwhile came again"
