"""Attack suite, the broker channel: a rogue member (cluster secret, identity of its own)
sends malformed and forged broker items to a node; the node keeps serving, counts what it
refused, and a legitimate durable subscriber loses nothing: a member cannot ack away
messages that were delivered to someone else.

The rogue speaks the link protocol from the test process (tests/integration/attacks.py).
"""

from __future__ import annotations

import cbor2
import trio

from meshd.secure.keyring import parse_secret
from meshd_sdk import Client

from .attacks import RoguePeer
from .cluster import control, wait_for
from .test_broker import FAST, cli, ready, sock, take
from .test_tunnel import free_port


async def attack(secret: bytes, a_addr: str) -> None:
    rogue = RoguePeer(secret, claim=f"127.0.0.1:{free_port()}")
    await rogue.connect(a_addr)
    assert await rogue.join("rogue"), "the rogue is a member: it acts as a node"
    good_msg = {"id": "x1", "topic": "atk.x", "headers": {}, "body": 1,
                "published_at": 1.0, "publisher": "mallory"}
    items = [
        # forged settles of a's messages: never delivered to the rogue
        {"t": "ack", "ns": "default", "topic": "atk.x", "durable": "w", "seqs": [1, 2, 3]},
        {"t": "nak", "ns": "default", "topic": "atk.x", "durable": "w", "seqs": [1],
         "delay": 1e8},
        # malformed items of every kind
        {"t": "ack", "ns": "default", "topic": "atk.x", "durable": "w", "seqs": "all"},
        {"t": "copy", "ns": "NOT A NS", "msg": good_msg, "plain": True, "groups": []},
        {"t": "copy", "ns": "default", "msg": {**good_msg, "topic": "a..b"}, "plain": True,
         "groups": []},
        {"t": "deliver", "ns": "default", "topic": "atk.x", "durable": "w", "seq": -1,
         "attempt": 1, "msg": good_msg},
        {"t": "replicate", "ns": "default", "topic": "atk.x", "seq": 1, "set": "x"},
        {"t": "absorb", "ns": "default", "topic": "atk.x", "durable": "w",
         "state": {"floor": "x", "acked": []}},
        {"t": "what"},
        "not a map",
    ]
    cid = await rogue.open("broker")
    await rogue.send(cid, cbor2.dumps({"t": "batch", "items": items}))
    await rogue.send(cid, b"\xff\xff not cbor")
    for record in ({"x": 1}, {"v": 1, "ts": [1, 0, "a"], "subs": [["default", "a..b", None,
                                                                     1]]}):
        cid2 = await rogue.open("broker")
        await rogue.send(cid2, cbor2.dumps({"t": "interest", "records": {"a": record}}))
    await trio.sleep(1)
    await rogue.aclose()


def test_a_rogue_member_cannot_ack_away_anothers_messages_or_crash_the_node(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    ready(a, b)
    assert cli(a, "topics", "create", "atk.x", "--durable", "--ack-wait", "1h").returncode == 0
    wait_for(lambda: any(t["topic"] == "atk.x" and "b" in t["nodes"] for t in
                         control(b.data_dir, "broker.topics")["durable"]), 15, "topic on b")

    async def scenario() -> list:
        async with Client(sock(b)) as client, \
                client.subscribe("atk.x", durable="w") as sub:
            await wait_for_interest(a)
            await Client(sock(a)).publish("atk.x", {"n": 1})
            (first,) = await take(sub, 1)  # delivered to b, not acked yet
            await attack(parse_secret(cluster.secret), a.addr)
            await first.nak(delay=0)  # b's own nak is honoured: it comes again
            (again,) = await take(sub, 1)
            await again.ack()
            return [first, again]
    first, again = trio.run(scenario)
    assert again.id == first.id and again.attempt == 2
    stats = control(a.data_dir, "status")["stats"]
    assert stats["broker_settles_refused"] >= 4  # 3 forged acks and 1 forged nak
    assert stats["broker_bad_messages"] >= 10  # 8 bad items, garbage, 2 bad records
    assert stats["interest_refused"] >= 1
    for d in (a, b):
        d.assert_running()
    rows = {t["topic"]: t for t in control(a.data_dir, "broker.topics")["durable"]}
    wait_for(lambda: {t["topic"]: t for t in control(a.data_dir, "broker.topics")[
        "durable"]}["atk.x"]["nodes"]["a"]["subscribers"]["w"]["acked_floor"] == 1, 10,
        "the real ack")
    assert rows["atk.x"]["subscribers"]["w"]["dead"] == 0


async def wait_for_interest(a) -> None:
    client = Client(sock(a))
    with trio.fail_after(15):
        while not any(r["durable"] == "w" for r in (await client.topics())["interest"]):
            await trio.sleep(0.1)
