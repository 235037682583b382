"""Attack suite, the rogue member: a host with the cluster secret and an identity of its own
tries items 7 and 8 of issue 11 against real daemons, one attempt after the other, and the
nodes keep serving: status answers, calls go through, a new member is admitted.

The rogue speaks the link protocol from the test process (tests/integration/attacks.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import cbor2
import trio

from meshd.membership.messages import (
    ALIVE,
    Alive,
    MemberState,
    PushPull,
    alive_payload,
    encode_packet,
)
from meshd.secure.keyring import parse_secret
from meshd.transport.links import DATA, END, OPEN

from .attacks import RoguePeer, identity_below
from .cluster import control, wait_for
from .test_tunnel import free_port

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1", "MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1"}


def signed_state(rogue: RoguePeer, name: str, addr: str, inc: int) -> MemberState:
    tags = {"id": rogue.identity.node_id}
    key = rogue.identity.public_bytes
    sig = rogue.identity.sign(alive_payload(inc, name, addr, tags, key))
    return MemberState(name, addr, inc, ALIVE, tags, key, sig)


async def campaign(secret: bytes, a: dict, b: dict, instance: str,
                   refused: Callable[[], int]) -> dict:
    """Every attempt; returns what the rogue got back (nothing useful, we hope)."""
    got: dict = {}
    rogue = RoguePeer(secret, claim=f"127.0.0.1:{free_port()}",
                      identity=identity_below(min(a["id"], b["id"])))
    await rogue.connect(a["addr"])
    got["joined"] = await rogue.join("rogue")

    # item 7: take b's name with our key, move b to our address, forge b's alive
    mine = signed_state(rogue, "b", rogue.claim, 10_000)
    moved = MemberState("b", rogue.claim, 10_001, ALIVE, {"id": b["id"]}, b["key"],
                        mine.sig)
    cid = await rogue.open("membership")
    await rogue.send(cid, encode_packet([PushPull("rogue", False, False, [mine, moved])]))
    cid = await rogue.open("membership-dgram")
    await rogue.send(cid, encode_packet([Alive(10_002, "b", rogue.claim, {}, b["key"],
                                               b"\x00" * 64)]))

    # item 7: an RPC to b's service as "a" (metadata), over our own link to b
    to_b = RoguePeer(secret, claim=a["addr"], identity=rogue.identity)
    await to_b.connect(b["addr"])
    got["rpc"] = await to_b.request("rpc", cbor2.dumps(
        {"id": 1, "instance": instance, "endpoint": "Test.Caller", "body": {"text": ""},
         "meta": {"caller-node": "a"}, "timeout": 5}))

    # item 8: have claims signed, a service token for someone else's service, admin ops
    now = int(time.time())
    claims = {"sub": "rogue", "scopes": ["admin"], "iss": "a", "aud": a["cluster"],
              "iat": now, "nbf": now, "exp": now + 600, "jti": "r" * 24, "typ": "access"}
    got["sign"] = await rogue.request("auth", cbor2.dumps({"op": "sign", "claims": claims}))
    got["service"] = await rogue.request("auth", cbor2.dumps({"op": "service",
                                                              "service": "testsvc"}))
    got["admin"] = await rogue.request("auth", cbor2.dumps(
        {"op": "admin", "name": "rules.create", "token": "v4.public.x.y",
         "args": {"id": "open", "resource": "*:*:*", "scope": "", "access": "granted"}}))

    # item 8: write auth records through store replication: unsigned, forged, self-rooted
    ts = [int(time.time() * 1000), 0, "rogue"]
    rule = json.dumps({"resource": "*:*:*", "scope": "", "access": "granted",
                       "priority": 99}).encode()
    account = json.dumps({"type": "user", "scopes": ["admin"], "metadata": {},
                          "secret": "scrypt$AAAA"}).encode()
    from meshd.auth import records
    from meshd.auth.tokens import new_signing_key

    kid, private, public = new_signing_key()
    priv = records.load_private(private)
    key_value = json.dumps({"public": public.decode(), "signer": "rogue",
                            "created": 1.0}).encode()
    entries = [
        ["auth", "rules", "open", {"lww": [ts, rule, {}, None]}],
        ["auth", "accounts", "mallory", {"lww": [ts, account, {"kid": "x",
                                                               "sig": b"s" * 64}, None]}],
        ["auth", "keys", kid, {"lww": [ts, key_value, records.sign(
            kid, priv, "keys", kid, ts, key_value, None), None]}],
        ["auth", "accounts", "trudy", {"lww": [ts, account, records.sign(
            kid, priv, "accounts", "trudy", ts, account, None), None]}],
    ]
    cid = await rogue.open("store")
    await rogue.send(cid, cbor2.dumps({"t": "batch", "e": entries, "fwd": True}))
    with trio.fail_after(10):  # handled before the link goes down below
        while await trio.to_thread.run_sync(refused) < len(entries):
            await trio.sleep(0.1)

    # and hostile frames on the authenticated link: empty DATA, too many channels
    got["empty_frames_sent"] = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        cid = await rogue.open("rpc")
        for _ in range(100):  # the first one is a protocol fault: the link is closed
            await rogue.send_frame(DATA, cid, b"")
            got["empty_frames_sent"] += 1
            await trio.sleep(0.01)
    await rogue.aclose()
    flood = RoguePeer(secret, claim=rogue.claim, identity=rogue.identity)
    await flood.connect(a["addr"])
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for i in range(9000):
            await flood.send_frame(OPEN, 2 * i + 1, b"store")
        await flood.send_frame(END, 1, b"\xff")
        await trio.sleep(1)
    await flood.aclose()
    await to_b.aclose()
    return got


def test_a_rogue_member_gets_nothing_and_the_cluster_keeps_serving(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    cluster.service(b)
    wait_for(lambda: len(control(a.data_dir, "describe", service="testsvc")["instances"]) == 1,
             10, "service on b visible on a")
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3, 10, "auth on b")
    info = {}
    for name, d in (("a", a), ("b", b)):
        st = control(d.data_dir, "status")
        info[name] = {"id": st["id"], "addr": d.addr}
    from meshd.identity import Identity

    info["b"]["key"] = Identity.load_or_create(b.data_dir).public_bytes
    info["a"]["cluster"] = ""  # the signer refuses before it would matter
    instance = control(b.data_dir, "describe", service="testsvc")["instances"][0]["id"]

    def refused() -> int:
        return control(a.data_dir, "status")["stats"]["store_refused"]

    got = trio.run(campaign, parse_secret(cluster.secret), info["a"], info["b"], instance,
                   refused)

    assert got["joined"], "the rogue is a member: it acts as a node"
    assert got["empty_frames_sent"] < 100, "an empty DATA frame closes the link"
    # refused while b does not know the rogue yet; once it does, the call is the rogue's
    # own (node:rogue, which the default rule lets call): never taken for a's
    rpc = got["rpc"]
    if rpc["ok"]:
        assert rpc["body"] == {"text": "node:rogue"}, rpc
    else:
        assert rpc["error"]["status"] in (401, 403), rpc
    for what in ("sign", "service", "admin"):
        reply = got[what]
        assert isinstance(reply, dict) and reply.get("ok") is False, (what, reply)
    time.sleep(1.5)
    for d in (a, b):
        assert d.proc.poll() is None
        st = control(d.data_dir, "status")
        assert st["name"] == d.name
        members = {m["name"]: m for m in control(d.data_dir, "members")}
        assert members["b"]["id"] == info["b"]["id"] and members["b"]["address"] == b.addr
        assert {"mallory", "trudy"}.isdisjoint(
            x["id"] for x in control(d.data_dir, "auth.accounts.list"))
        assert "open" not in {r["id"] for r in control(d.data_dir, "auth.rules.list")}
    assert control(a.data_dir, "status")["stats"]["store_refused"] >= 4
    r = control(a.data_dir, "rpc.call", service="testsvc", endpoint="Test.Caller",
                body={"text": ""})
    assert r == {"text": "node:a"}
    c = cluster.add("c", join=[a.addr], env=FAST)
    wait_for(lambda: a.status_of("c") == "alive" and c.status_of("b") == "alive", 15,
             "a new member admitted")
    wait_for(lambda: len(control(c.data_dir, "auth.rules.list")) == 3, 15, "auth on c")
    assert "mallory" not in {x["id"] for x in control(c.data_dir, "auth.accounts.list")}


def test_a_member_that_fills_windows_and_never_reads_loses_its_link(cluster):
    """Each channel may hold a 4 MiB window of unread data; a member that opens many and
    never lets them drain (the node's echo replies go unread) is cut off at the link's
    budget (128 MiB) instead of growing the node without bound."""
    a = cluster.add("a", env=FAST)
    secret = parse_secret(cluster.secret)
    blob = b"\x00" * 1_000_000

    async def attack() -> int:
        rogue = RoguePeer(secret, claim=f"127.0.0.1:{free_port()}")
        await rogue.connect(a.addr)
        sent = 0
        try:
            for _ in range(100):  # 400 MB if nothing stopped it
                cid = await rogue.open("ping")
                for _ in range(4):
                    await rogue.send(cid, blob)
                    sent += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await rogue.aclose()
        return sent

    sent = trio.run(attack)
    assert sent < 400, "the node kept taking unread data"
    st = control(a.data_dir, "status")
    assert st["stats"]["links_dropped_bad_frames"] >= 1
    assert a.proc.poll() is None


def test_authenticated_links_from_one_host_cannot_fill_the_link_listener(cluster):
    """A holder of the secret completes handshakes with throwaway identities from one
    address (127.0.0.2) and keeps the links: it gets its share of the listener and no more,
    so a real node (from 127.0.0.1) still joins; the links of keys that never become
    members are closed after a grace period."""
    limited = ["bash", "-c", 'ulimit -n 256 && exec "$@"', "limited"]
    a = cluster.add("a", prefix=limited, env=FAST)
    secret = parse_secret(cluster.secret)

    async def attack(task_status=trio.TASK_STATUS_IGNORED) -> None:
        rogues, refused = [], 0
        for i in range(90):
            r = RoguePeer(secret, claim=f"127.0.0.2:{20000 + i}")
            try:
                await r.connect(a.addr, local_address="127.0.0.2")
                rogues.append(r)
            except Exception:  # refused: closed before the handshake
                refused += 1
        task_status.started((len(rogues), refused))
        await trio.sleep_forever()

    async def main() -> tuple[int, int]:
        async with trio.open_nursery() as nursery:
            got = await nursery.start(attack)
            await trio.to_thread.run_sync(lambda: cluster.add("b", join=[a.addr], env=FAST))
            await trio.to_thread.run_sync(lambda: wait_for(
                lambda: a.status_of("b") == "alive", 15, "b admitted"))
            nursery.cancel_scope.cancel()
        return got

    held, refused = trio.run(main)
    assert refused > 0 and held < 90, (held, refused)
    stats = control(a.data_dir, "status")["stats"]
    assert stats["link_tcp_refused_source"] > 0


def test_a_member_cannot_end_a_service_with_a_body_nested_too_deep(cluster):
    """A call body a service could not decode (nested past its frame decoder's 32 levels)
    ended the service's session, and so the service, when it came from another node (links
    decode 64 deep): the callee's daemon now refuses it with a 400 and the service serves
    on. (Found by the gateway's fuzz, where JSON bodies could reach 32 levels.)"""
    a = cluster.add("a")
    cluster.service(a)
    wait_for(lambda: len(control(a.data_dir, "describe", service="testsvc")["instances"])
             == 1, 10, "testsvc")
    instance = control(a.data_dir, "describe", service="testsvc")["instances"][0]["id"]
    deep: object = {"text": "x"}
    for _ in range(40):
        deep = [deep]

    async def go() -> tuple[object, object]:
        rogue = RoguePeer(parse_secret(cluster.secret), claim=f"127.0.0.1:{free_port()}")
        await rogue.connect(a.addr)
        assert await rogue.join("rogue")
        bad = await rogue.request("rpc", cbor2.dumps(
            {"id": 1, "instance": instance, "endpoint": "Test.Echo", "body": deep,
             "meta": {}, "timeout": 5}))
        good = await rogue.request("rpc", cbor2.dumps(
            {"id": 2, "instance": instance, "endpoint": "Test.Echo", "body": {"text": "ok"},
             "meta": {}, "timeout": 5}))
        return bad, good

    bad, good = trio.run(go)
    assert isinstance(bad, dict) and bad["error"]["status"] == 400, bad
    assert isinstance(good, dict) and good.get("body") == {"text": "ok"}, good
    assert control(a.data_dir, "rpc.call", service="testsvc", endpoint="Test.Echo",
                   body={"text": "still"}) == {"text": "still"}
