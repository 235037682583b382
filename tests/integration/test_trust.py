"""Issue 11, items 7-10 and 15: a holder of the cluster secret acts as a node, never as
another node and never as admin; revoked nodes are shut out; tokens are judged by the
state of now; the control socket does not leak the auth database.

The attacker is a rogue peer in the test process (tests/integration/attacks.py): it holds
the cluster secret and an identity key of its own, dials real daemons, claims whatever
address it likes, and sends what the protocol lets it send.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import cbor2
import pytest
import trio

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd.secure.keyring import format_secret, new_secret, parse_secret

from .attacks import RogueListener, RoguePeer, identity_below, proxy_request
from .cluster import control, wait_for
from .test_tunnel import free_port

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1", "MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1"}


def as_token(d, op, token, **args):
    async def go():
        client = ControlClient(d.data_dir / "meshd.sock", token=token)
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()
    return trio.run(go)


def admin_token(d) -> str:
    return (d.data_dir / "admin.token").read_text().strip()


def node_id(d) -> str:
    return control(d.data_dir, "status")["id"]


def two_with_service(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    cluster.service(b)
    wait_for(lambda: len(control(a.data_dir, "describe", service="testsvc")["instances"]) == 1,
             10, "service on b visible on a")
    return a, b


# --- item 7: no member poses as another node ------------------------------------------------


def test_item7_a_link_claiming_a_members_address_gets_none_of_its_traffic(cluster):
    a, b = two_with_service(cluster)
    control(a.data_dir, "store.write", key="warm", value="up")  # a has a link to b
    secret = parse_secret(cluster.secret)
    rogue_id = identity_below(min(node_id(a), node_id(b)))

    async def attack() -> list[str]:
        rogue = RoguePeer(secret, claim=b.addr, identity=rogue_id)
        await rogue.connect(a.addr)
        opened: list[str] = []

        async def listen() -> None:
            try:
                while True:
                    ftype, _, payload = await rogue.receive(timeout=30)
                    if ftype == 1:  # OPEN
                        opened.append(payload.decode())
            except (trio.TooSlowError, EOFError, Exception):
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            for i in range(5):
                await trio.to_thread.run_sync(lambda i=i: control(
                    a.data_dir, "store.write", key=f"secret-{i}", value="for b only"))
                await trio.sleep(0.2)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        await rogue.aclose()
        return opened

    opened = trio.run(attack)
    assert opened == [], f"the rogue was sent channels meant for b: {opened}"
    wait_for(lambda: len(control(b.data_dir, "store.read", prefix="secret-")) == 5, 10,
             "b got every write")


def test_item7_a_dialer_refuses_a_node_that_is_not_the_member_it_meant(cluster):
    a, b = two_with_service(cluster)
    port = int(b.addr.rsplit(":", 1)[1])
    secret = parse_secret(cluster.secret)
    b.kill9()
    rogue = RogueListener(secret, port, claim=b.addr)

    async def attack() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(rogue.serve)
            with pytest.raises(MeshError):
                await trio.to_thread.run_sync(lambda: control(a.data_dir, "ping", node="b",
                                                              count=1))
            nursery.cancel_scope.cancel()

    trio.run(attack)
    assert rogue.hellos >= 1, "a did dial the squatted address"
    assert rogue.opened == [] and rogue.received == [], \
        f"a used a link to an impostor: {rogue.opened}"


def test_item7_caller_node_comes_from_the_link_never_from_metadata(cluster):
    proxy_port = free_port()
    a = cluster.add("a", env=FAST, extra=("--proxy-listen", f"127.0.0.1:{proxy_port}"))
    b = cluster.add("b", join=[a.addr], env=FAST)
    cluster.service(b)
    wait_for(lambda: len(control(a.data_dir, "describe", service="testsvc")["instances"]) == 1,
             10, "service on b visible on a")
    r = control(a.data_dir, "rpc.call", service="testsvc", endpoint="Test.Meta",
                body={"text": "x"}, meta={"caller-node": "evil"})
    assert r["caller"] == "a"
    reply = trio.run(proxy_request, f"ws://127.0.0.1:{proxy_port}", cbor2.dumps(
        {"op": "call", "token": admin_token(a), "service": "testsvc", "endpoint": "Test.Meta",
         "body": {"text": "x"}, "meta": {"caller-node": "evil"}}))
    assert reply["ok"] and reply["body"]["caller"] == "a"


def test_item7_an_rpc_from_a_non_member_claiming_a_members_address_is_anonymous(cluster):
    a, b = two_with_service(cluster)
    instance = control(b.data_dir, "describe", service="testsvc")["instances"][0]["id"]
    secret = parse_secret(cluster.secret)

    async def attack() -> dict:
        rogue = RoguePeer(secret, claim=a.addr)  # poses as a, is not a member
        await rogue.connect(b.addr)
        reply = await rogue.request("rpc", cbor2.dumps(
            {"id": 1, "instance": instance, "endpoint": "Test.Echo", "body": {"text": "x"},
             "meta": {"caller-node": "a"}, "timeout": 5}))
        await rogue.aclose()
        return reply

    reply = trio.run(attack)
    assert reply is not None and reply["ok"] is False
    assert reply["error"]["status"] == 401, reply


# --- item 8: the cluster secret is not admin ------------------------------------------------


def rogue_member(cluster, a, name="rogue"):
    """A rogue that joined as a member (own identity, the secret, its own signed alive)."""
    secret = parse_secret(cluster.secret)
    claim = f"127.0.0.1:{free_port()}"
    return RoguePeer(secret, claim=claim), name


def test_item8_a_member_cannot_have_arbitrary_claims_signed(cluster):
    a = cluster.add("a", env=FAST)
    rogue, name = rogue_member(cluster, a)

    async def attack() -> list:
        await rogue.connect(a.addr)
        await rogue.join(name)
        now = int(time.time())
        claims = {"sub": "service:x", "scopes": ["admin"], "iss": "a", "aud": "",
                  "iat": now, "nbf": now, "exp": now + 600, "jti": "x" * 24, "typ": "access"}
        replies = [await rogue.request("auth", cbor2.dumps({"op": "sign", "claims": claims})),
                   await rogue.request("auth", cbor2.dumps({"op": "service",
                                                            "service": "testsvc"})),
                   await rogue.request("auth", cbor2.dumps({
                       "op": "admin", "name": "accounts.create",
                       "args": {"id": "eve", "secret": "eve-secret-1", "scopes": ["admin"]}}))]
        await rogue.aclose()
        return replies

    replies = trio.run(attack)
    for reply in replies:
        assert not (isinstance(reply, dict) and (reply.get("token") or reply.get("ok"))), reply
    assert "eve" not in {x["id"] for x in control(a.data_dir, "auth.accounts.list")}


def test_item8_auth_records_from_a_member_are_refused_on_merge(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3, 10, "auth on b")
    rogue, name = rogue_member(cluster, a)
    ts = [int(time.time() * 1000) + 1000, 0, name]
    account = {"type": "user", "scopes": ["admin"], "metadata": {},
               "secret": "scrypt$AAAA"}
    rule = {"resource": "*:*:*", "scope": "", "access": "granted", "priority": 1000}
    entries = [["auth", "accounts", "eve", {"lww": [ts, json.dumps(account).encode(), {},
                                                    None]}],
               ["auth", "rules", "open-door", {"lww": [ts, json.dumps(rule).encode(),
                                                       {"kid": "k", "sig": b"s" * 64},
                                                       None]}]]

    async def attack() -> None:
        for target in (a, b):
            r = RoguePeer(parse_secret(cluster.secret), claim=rogue.claim,
                          identity=rogue.identity)
            await r.connect(target.addr)
            await r.join(name)
            cid = await r.open("store")
            await r.send(cid, cbor2.dumps({"t": "batch", "e": entries, "fwd": False}))
            await trio.sleep(1)
            await r.aclose()

    trio.run(attack)
    for d in (a, b):
        assert "eve" not in {x["id"] for x in control(d.data_dir, "auth.accounts.list")}
        assert "open-door" not in {x["id"] for x in control(d.data_dir, "auth.rules.list")}
        assert control(d.data_dir, "status")["stats"]["store_refused"] >= 2


# --- item 9: evicting a host ------------------------------------------------------------------


def test_item9_a_revoked_node_is_shut_out_and_gets_no_new_secret(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    c = cluster.add("c", join=[a.addr], env=FAST)
    wait_for(lambda: all(d.status_of(n) == "alive" for d in (a, b, c) for n in "abc"), 15,
             "3 alive")
    c_id = node_id(c)
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "nodes", "revoke", "c", "--json",
                          "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         timeout=15)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == c_id
    wait_for(lambda: a.status_of("c") == "dead" and b.status_of("c") == "dead", 15,
             "c evicted on a and b")
    with pytest.raises(MeshError):
        control(c.data_dir, "ping", node="a", count=1)
    listed = subprocess.run([sys.executable, "-m", "meshd_cli", "nodes", "revocations", "--json",
                             "--data-dir", str(b.data_dir)], capture_output=True, text=True,
                            timeout=15)
    assert c_id in {r["id"] for r in json.loads(listed.stdout)}
    time.sleep(2)
    assert a.status_of("c") == "dead", "a revoked node cannot refute its way back"
    # roll the secret: c does not get the new one and cannot come back
    new = format_secret(new_secret())
    old = cluster.secret
    for op in ("keys.install", "keys.use"):
        r = control(a.data_dir, op, secret=new)
        assert r["errors"] == [] and r["nodes"] == 2, r
    control(a.data_dir, "keys.remove", secret=old)
    keyring = json.loads((c.data_dir / "keyring.json").read_text())
    assert new not in keyring["keys"]
    c.stop()
    with pytest.raises(AssertionError):
        c.start(join=[a.addr])


# --- item 10: tokens are judged by the state of now -------------------------------------------


def test_item10_taking_a_scope_away_takes_effect_at_once(cluster):
    a = cluster.add("a", env=FAST)
    control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1",
            scopes=["admin"])
    token = control(a.data_dir, "auth.token.create", account="ops", ttl=600)["token"]
    assert "admin" in as_token(a, "auth.whoami", token)["scopes"]
    control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1", scopes=[])
    assert as_token(a, "auth.whoami", token)["scopes"] == []
    with pytest.raises(MeshError) as info:
        as_token(a, "auth.accounts.create", token, id="x", secret="x-secret-1", scopes=[])
    assert info.value.status == 403


def test_item10_a_retired_issuer_key_can_be_revoked_and_its_cached_tokens_stop(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3, 10, "auth on b")
    admin = admin_token(a)
    control(a.data_dir, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["x"])
    # b gets a key of its own (endorsed by a's), and signs a token with it
    as_token(b, "auth.keys.rotate", admin)
    wait_for(lambda: len(control(b.data_dir, "auth.keys.list")) == 2, 10, "b's key on b")
    b_kid = next(k["kid"] for k in control(b.data_dir, "auth.keys.list") if not k["root"])
    old = control(b.data_dir, "auth.token.create", account="ada", ttl=600)["token"]
    wait_for(lambda: any(k["kid"] == b_kid for k in control(a.data_dir, "auth.keys.list")),
             10, "b's key known on a")
    for d in (a, b):
        assert as_token(d, "auth.whoami", old)["id"] == "ada"  # verified and cached
    # a rotates in turn: b's key retires; then it is revoked, and what it signed stops
    control(a.data_dir, "auth.keys.rotate")
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "auth", "keys", "revoke", b_kid,
                          "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         timeout=15)
    assert out.returncode == 0, out.stderr
    new = control(a.data_dir, "auth.token.create", account="ada", ttl=600)["token"]

    def old_refused_everywhere() -> bool:
        for d in (a, b):
            try:
                as_token(d, "auth.whoami", old)
                return False
            except MeshError as exc:
                if exc.status != 401:
                    return False
        return True

    wait_for(old_refused_everywhere, 10, "tokens of the revoked key refused everywhere")
    wait_for(lambda: all(as_token(d, "auth.whoami", new)["id"] == "ada" for d in (a, b)), 10,
             "tokens of the current key accepted everywhere")
    # the root cannot be revoked: every chain of trust ends there
    root = next(k["kid"] for k in control(a.data_dir, "auth.keys.list") if k["root"])
    with pytest.raises(MeshError) as info:
        control(a.data_dir, "auth.keys.revoke", kid=root)
    assert info.value.status == 409
    c = cluster.add("c", join=[b.addr], env=FAST)
    wait_for(lambda: "ada" in {x["id"] for x in control(c.data_dir, "auth.accounts.list")},
             15, "a newcomer takes the state")
    assert as_token(c, "auth.whoami", new)["id"] == "ada"
    with pytest.raises(MeshError):
        as_token(c, "auth.whoami", old)


def test_item10_revoking_a_key_takes_down_what_it_endorsed_and_signed(cluster):
    """A stolen key (b's) endorsed another key and signed an account: after the admin
    revokes it, neither that key nor what they signed counts anywhere."""
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3, 10, "auth on b")
    as_token(b, "auth.keys.rotate", admin_token(a))  # b gets K1
    wait_for(lambda: len(control(b.data_dir, "auth.keys.list")) == 2, 10, "K1 on b")
    k1 = next(k["kid"] for k in control(b.data_dir, "auth.keys.list") if not k["root"])
    control(b.data_dir, "auth.keys.rotate")  # b's operator (holds K1) makes K2: endorsed by K1
    wait_for(lambda: len(control(b.data_dir, "auth.keys.list")) == 3, 10, "K2 on b")
    control(b.data_dir, "auth.accounts.create", id="mallory", secret="mallory-secret",
            scopes=["admin"])
    stolen = control(b.data_dir, "auth.token.create", account="mallory", ttl=600)["token"]
    wait_for(lambda: "mallory" in {x["id"] for x in control(a.data_dir, "auth.accounts.list")},
             10, "mallory replicated")
    assert as_token(a, "auth.whoami", stolen)["scopes"] == ["admin"]
    r = control(a.data_dir, "auth.keys.revoke", kid=k1)
    assert len(r["keys_untrusted"]) == 2 and "accounts/mallory" in r["records_dropped"]

    def gone_everywhere() -> bool:
        for d in (a, b):
            if "mallory" in {x["id"] for x in control(d.data_dir, "auth.accounts.list")}:
                return False
            keys = control(d.data_dir, "auth.keys.list")
            if [k["state"] for k in keys if k["kid"] == k1] != ["revoked"] or len(keys) != 2:
                return False  # K1 shown revoked, K2 not trusted at all
            try:
                as_token(d, "auth.whoami", stolen)
                return False
            except MeshError as exc:
                if exc.status != 401:
                    return False
        return True

    wait_for(gone_everywhere, 10, "K1, K2 and what they signed gone everywhere")
    with pytest.raises(MeshError) as info:  # and b may not revoke keys: the root does
        control(b.data_dir, "auth.keys.revoke", kid=k1)
    assert info.value.status in (403, 404)


def test_item8_extra_members_cannot_outvote_the_seed_on_the_auth_root(cluster):
    """A holder of the secret brings up its own cluster (its own auth root) and merges it
    with the real one: a node joining through a real seed still trusts the real root."""
    l1 = cluster.add("l1", env=FAST)
    l2 = cluster.add("l2", join=[l1.addr], env=FAST)
    x0 = cluster.add("x0", env=FAST)  # the attacker's: a first node makes its own root
    x1 = cluster.add("x1", join=[x0.addr], env=FAST)
    x2 = cluster.add("x2", join=[x0.addr], env=FAST)
    control(x0.data_dir, "join", peers=[l1.addr])
    wait_for(lambda: l1.status_of("x2") == "alive" and x0.status_of("l2") == "alive", 15,
             "the two merged")
    v = cluster.add("v", join=[l1.addr], env=FAST)
    wait_for(lambda: len(control(v.data_dir, "auth.rules.list")) == 3, 15, "auth on v")
    assert (v.data_dir / "auth-root").read_text() == (l1.data_dir / "auth-root").read_text()
    assert as_token(v, "auth.whoami", admin_token(l1))["scopes"] == ["admin"]
    with pytest.raises(MeshError):
        as_token(v, "auth.whoami", admin_token(x0))
    del l2, x1, x2
    invite = control(l1.data_dir, "invite")
    assert f"MESHD_AUTH_ROOT={invite['auth_root']}" in invite["command"]
    w = cluster.add("w", join=[x0.addr], env={**FAST, "MESHD_AUTH_ROOT": invite["auth_root"]})
    wait_for(lambda: len(control(w.data_dir, "auth.rules.list")) == 3, 15, "auth on w")
    assert as_token(w, "auth.whoami", admin_token(l1))["scopes"] == ["admin"]


# --- item 15: the control socket --------------------------------------------------------------


def test_item15_watching_every_database_leaves_the_auth_database_out(cluster):
    a = cluster.add("a", env=FAST)
    seen: list[dict] = []

    async def watch() -> None:
        client = ControlClient(a.data_dir / "meshd.sock")
        try:
            with trio.move_on_after(4):
                async for ev in client.stream("store.watch"):
                    seen.append(ev)
        finally:
            await client.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(lambda: control(
                a.data_dir, "auth.accounts.create", id="zed", secret="zed-secret-1",
                scopes=[]))
            await trio.to_thread.run_sync(lambda: control(a.data_dir, "store.write",
                                                          key="plain", value="v"))

    trio.run(main)
    assert {ev["database"] for ev in seen} == {"default"}, seen


def test_item15_login_limits_key_on_the_transport_not_on_what_the_client_says(cluster):
    a = cluster.add("a", env=FAST)
    statuses = []
    for i in range(30):
        try:
            control(a.data_dir, "auth.login", id=f"nobody-{i}", secret="wrong-secret",
                    source=f"spoofed-{i}")
        except MeshError as exc:
            statuses.append(exc.status)
    assert 429 in statuses, statuses


def test_item15_login_limit_tables_are_bounded():
    from meshd.buckets import TokenBuckets

    bucket = TokenBuckets(5, 0.1)
    for i in range(50_000):
        bucket.take(f"source-{i}", 1000.0 + i * 0.001)
    assert len(bucket.level) <= 10_000
