"""Auth with real daemons: rules enforced at the callee, tokens, revocation everywhere,
key rotation without failed calls, restart keeps accounts and rules, service identity;
rules on store and config, the admin-only system databases, token lifetimes (`--ttl`,
retired keys), `meshd auth login/logout`, MESHD_TOKEN and --token, refresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from meshd.auth.tokens import TokenError, Verifier, unverified_claims
from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd_sdk import Auth, Client, Store

from .cluster import control, control_stream, wait_for

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1", "MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1"}


def cluster3(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    c = cluster.add("c", join=[a.addr], env=FAST)
    wait_for(lambda: all(len([m for m in d.members().values() if m["status"] == "alive"]) == 3
                         for d in (a, b, c)), 20, "3 alive")
    wait_for(lambda: all(len(control(d.data_dir, "auth.rules.list")) == 3 for d in (b, c)),
             10, "auth state replicated")
    return a, b, c


def call(d, service, endpoint, body, token=None):
    async def go():
        async with Client(d.data_dir / "meshd.sock", token=token) as client:
            return await client.call(service, endpoint, body, timeout=5)
    return trio.run(go)


def admin(d, op, as_token=None, **args):
    async def go():
        from meshd.control import ControlClient

        c = ControlClient(d.data_dir / "meshd.sock", token=as_token)
        try:
            return await c.call(op, **args)
        finally:
            await c.aclose()
    return trio.run(go)


def services_ready(daemons, name, n):
    def ok():
        for d in daemons:
            try:
                if len(control(d.data_dir, "describe", service=name)["instances"]) != n:
                    return False
            except MeshError:
                return False
        return True
    return ok


def test_tightened_rules_tokens_and_revocation_everywhere(cluster):
    a, b, c = cluster3(cluster)
    cluster.service(a)
    wait_for(services_ready([a, b, c], "testsvc", 1), 10, "service everywhere")
    assert call(b, "testsvc", "Test.Echo", {"text": "x"}) == {"text": "x"}  # default rules
    # the operator tightens: nodes may no longer call testsvc; the dev scope may
    admin(a, "auth.rules.create", id="no-nodes-testsvc", resource="service:testsvc:*",
          scope="node", access="denied", priority=10)
    admin(a, "auth.rules.create", id="dev-testsvc", resource="service:testsvc:*",
          scope="dev", access="granted", priority=20)
    admin(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    admin(a, "auth.accounts.create", id="bob", secret="bob-secret-1", scopes=["ops"])

    def refused_without_token():
        try:
            call(b, "testsvc", "Test.Echo", {"text": "x"})
        except MeshError as exc:
            return exc.status == 401 and "no-nodes-testsvc" in exc.detail
        return False

    wait_for(refused_without_token, 10, "the tightened rule applied at the callee")
    wait_for(lambda: all({"ada", "bob"} <= {x["id"] for x in admin(d, "auth.accounts.list")}
                         for d in (b, c)), 10, "accounts replicated")

    async def login(d, who, secret):
        auth = Auth(d.data_dir / "meshd.sock")
        try:
            return (await auth.login(who, secret))["token"]
        finally:
            await auth.aclose()

    ada = trio.run(login, b, "ada", "ada-secret-1")
    bob = trio.run(login, c, "bob", "bob-secret-1")
    assert call(b, "testsvc", "Test.Caller", {"text": ""}, token=ada) == {"text": "ada"}
    assert call(c, "testsvc", "Test.Echo", {"text": "y"}, token=ada) == {"text": "y"}
    with pytest.raises(MeshError) as info:
        call(c, "testsvc", "Test.Echo", {"text": "y"}, token=bob)
    assert info.value.status == 403 and "bob" in info.value.detail
    with pytest.raises(MeshError) as info:
        call(b, "testsvc", "Test.Echo", {"text": "y"}, token=ada[:-5] + "AAAAA")
    assert info.value.status == 401 and info.value.detail == "invalid token"
    # revoke ada's token: refused on every node within a few seconds
    admin(c, "auth.token.revoke", token=ada)
    start = time.monotonic()

    def refused_everywhere():
        for d in (a, b, c):
            try:
                call(d, "testsvc", "Test.Echo", {"text": "z"}, token=ada)
                return False
            except MeshError as exc:
                if exc.status != 401:
                    return False
        return True

    wait_for(refused_everywhere, 10, "the revoked token refused on every node")
    took = time.monotonic() - start
    assert took < 5, f"revocation took {took:.1f} s to reach every node"
    assert "token revoked" in a.log.read_text()


def test_key_rotation_without_failed_calls_and_restart_keeps_state(cluster):
    a, b, c = cluster3(cluster)
    cluster.service(b)
    wait_for(services_ready([a, b, c], "testsvc", 1), 10, "service up")
    admin(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    admin(a, "auth.rules.create", id="dev-all", resource="*:*:*", scope="dev",
          access="granted")
    # the calls go from c to the service on b: both must hold the account and the rule
    wait_for(lambda: all(any(x["id"] == "ada" for x in admin(n, "auth.accounts.list"))
                         and any(r["id"] == "dev-all" for r in admin(n, "auth.rules.list"))
                         for n in (b, c)), 10, "account and rule replicated")
    old = admin(a, "auth.token.create", account="ada", ttl=600)["token"]
    failures = []

    async def calls_during_rotation():
        async with Client(c.data_dir / "meshd.sock", token=old) as client:
            for _ in range(60):
                try:
                    await client.call("testsvc", "Test.Echo", {"text": "r"}, timeout=5)
                except MeshError as exc:
                    failures.append(str(exc))
                await trio.sleep(0.03)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls_during_rotation)
            await trio.sleep(0.5)
            # b holds no issuer key: rotating there takes an admin token
            token = (a.data_dir / "admin.token").read_text()
            await trio.to_thread.run_sync(lambda: admin(b, "auth.keys.rotate", token))

    trio.run(main)
    assert failures == []
    new = admin(a, "auth.token.create", account="ada", ttl=600)["token"]
    assert new.split(".")[-1] != old.split(".")[-1], "new tokens come from the new key"
    assert call(a, "testsvc", "Test.Echo", {"text": "n"}, token=new) == {"text": "n"}
    assert call(a, "testsvc", "Test.Echo", {"text": "o"}, token=old) == {"text": "o"}
    # restart keeps accounts and rules
    c.kill9()
    c.start()
    assert any(x["id"] == "ada" for x in admin(c, "auth.accounts.list"))
    assert any(r["id"] == "dev-all" for r in admin(c, "auth.rules.list"))


def test_service_to_service_calls_carry_the_service_identity(cluster):
    a, b, _ = cluster3(cluster)
    cluster.service(a, "front")
    cluster.service(b, "back")
    wait_for(services_ready([a, b], "back", 1), 10, "back up")
    wait_for(services_ready([a, b], "front", 1), 10, "front up")
    assert call(a, "front", "Test.Relay", {"text": "back"}) == {"text": "service:front"}
    assert call(a, "back", "Test.Caller", {"text": ""}) == {"text": "node:a"}


def test_bootstrap_once_and_login_rate_limit(cluster):
    a = cluster.add("a", env=FAST)
    token = (a.data_dir / "admin.token").read_text()
    assert oct((a.data_dir / "admin.token").stat().st_mode & 0o777) == "0o600"
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "auth", "bootstrap", "--data-dir",
                          str(a.data_dir)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 1 and out.stderr.startswith("409")
    who = subprocess.run([sys.executable, "-m", "meshd_cli", "--token", token, "auth", "whoami",
                          "--json", "--data-dir", str(a.data_dir)], capture_output=True,
                         text=True, timeout=10)
    assert '"id": "admin"' in who.stdout
    statuses = []
    for _ in range(8):
        try:
            admin(a, "auth.login", id="admin", secret="wrong")
        except MeshError as exc:
            statuses.append(exc.status)
    assert statuses[:5] == [401] * 5 and 429 in statuses[5:]


def test_logins_through_a_node_without_a_key_are_limited_per_source(cluster):
    """b holds no issuer key and forwards logins to a signer, which limits them per account
    and per asking node only: b must apply its caller's per-source limit first (found by
    review: bad logins through b were limited by nothing per caller)."""
    _, b = pair(cluster)
    statuses: list[int] = []

    async def attempts() -> None:
        client = ControlClient(b.data_dir / "meshd.sock")
        try:
            # a fresh account id each time: only a limit per caller can stop them
            for n in range(100):
                try:
                    await client.call("auth.login", id=f"nobody-{n}", secret="wrong")
                except MeshError as exc:
                    statuses.append(exc.status)
                    if exc.status == 429:
                        assert exc.code == "too_many_requests"
                        assert exc.detail.startswith("too many login attempts"), exc
                        return
        finally:
            await client.aclose()

    trio.run(attempts)
    assert statuses[:20] == [401] * 20, statuses  # the source's burst, checked by the signer
    assert statuses[-1] == 429, statuses


def test_deleting_an_account_stops_its_tokens(cluster):
    a = cluster.add("a", env=FAST)
    admin(a, "auth.accounts.create", id="tmp", secret="tmp-secret-1", scopes=["admin"])
    token = admin(a, "auth.token.create", account="tmp", ttl=600)["token"]

    async def whoami():
        from meshd.control import ControlClient

        c = ControlClient(a.data_dir / "meshd.sock", token=token)
        try:
            return await c.call("auth.whoami")
        finally:
            await c.aclose()

    assert trio.run(whoami)["id"] == "tmp"
    admin(a, "auth.accounts.delete", id="tmp")
    with pytest.raises(MeshError) as info:
        trio.run(whoami)
    assert info.value.status == 401


# --- helpers for the tests below -----------------------------------------------------------

def op(d, name, token=None, /, **args):
    """One control operation on `d`, as its local operator or with `token`."""
    async def go():
        c = ControlClient(d.data_dir / "meshd.sock", token=token)
        try:
            return await c.call(name, **args)
        finally:
            await c.aclose()
    return trio.run(go)


def refused(d, name, token=None, /, **args) -> MeshError:
    with pytest.raises(MeshError) as info:
        op(d, name, token, **args)
    return info.value


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A controlled environment for `python -m meshd_cli`: no MESHD_* of the caller's, the token
    file in a temp dir (the user's config dir is never touched), this tree's code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
    env["MESHD_TOKEN_FILE"] = str(tmp_path / "config" / "token.json")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.update(extra)
    return env


def meshd(*args: str, env: dict[str, str], stdin: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    # a new session: no controlling terminal, so a secret prompt reads stdin
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args], capture_output=True,
                          text=True, timeout=30, env=env, input=stdin,
                          start_new_session=True)


def pair(cluster):
    """a (the first node: it holds the root issuer key) and b (holds no issuer key)."""
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    wait_for(lambda: all(len([m for m in d.members().values() if m["status"] == "alive"])
                         == 2 for d in (a, b)), 20, "2 alive")
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3, 10,
             "auth state replicated to b")
    return a, b


def login(d, account, secret):
    async def go():
        auth = Auth(d.data_dir / "meshd.sock")
        try:
            return await auth.login(account, secret)
        finally:
            await auth.aclose()
    return trio.run(go)


# --- rules on store and config ---------------------------------------------------------------

def test_store_and_config_rules_tighten_nodes_and_grant_a_scope(cluster, tmp_path):
    a, b = pair(cluster)
    # before any rule: b's local operator (scope node) uses the orders database freely
    op(b, "store.write", database="orders", table="carts", key="c0", value=b"0")
    rules = [("no-nodes-orders", "store:orders:*", "node", "denied", 10),
             ("dev-orders", "store:orders:*", "dev", "granted", 20),
             ("dev-no-audit", "store:orders:audit", "dev", "denied", 30),
             ("accounts-no-orders", "store:orders:*", "*", "denied", 5),
             ("no-nodes-payments", "config:payments:*", "node", "denied", 10),
             ("dev-payments", "config:payments:*", "dev", "granted", 20),
             ("dev-no-keys", "config:payments:keys*", "dev", "denied", 30)]
    for rid, resource, scope, access, priority in rules:
        op(a, "auth.rules.create", id=rid, resource=resource, scope=scope, access=access,
           priority=priority)
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    op(a, "auth.accounts.create", id="bob", secret="bob-secret-1", scopes=["ops"])
    wait_for(lambda: len(op(b, "auth.rules.list")) == 3 + len(rules)
             and {"ada", "bob"} <= {x["id"] for x in op(b, "auth.accounts.list")}, 10,
             "rules and accounts on b")

    # the node scope is denied every store operation on orders: 401 naming the rule
    for name, args in [("store.write", {"key": "c1", "value": b"1"}),
                       ("store.read", {"key": "c0"}), ("store.list", {}),
                       ("store.delete", {"key": "c0"}),
                       ("store.counter", {"key": "n", "delta": 1}),
                       ("store.set", {"key": "s", "op": "add", "member": "x"})]:
        err = refused(b, name, database="orders", table="carts", **args)
        assert err.status == 401, (name, err)
        assert err.detail == ("store:orders:carts needs a token with access (rule "
                              "'no-nodes-orders' denies it)"), (name, err)
    for name, args in [("config.set", {"path": "db.host", "value": "db1"}),
                       ("config.get", {"path": "db.host"}), ("config.del", {"path": "db"})]:
        err = refused(b, name, namespace="payments", **args)
        assert err.status == 401 and "'no-nodes-payments'" in err.detail, (name, err)
    # ...and nothing else changed for it
    op(b, "store.write", database="default", table="store", key="k", value=b"v")
    op(b, "config.set", namespace="default", path="db.host", value="db0")

    # ada (scope dev) reads and writes orders and payments, except what a rule keeps back
    ada = login(b, "ada", "ada-secret-1")["token"]

    async def as_ada():
        store = Store("orders", "carts", addr=b.data_dir / "meshd.sock", token=ada)
        try:
            await store.write("c1", b"two items")
            assert await store.get("c1") == b"two items"
            assert await store.get("c0") == b"0"  # the node's earlier write, now hers
            assert await store.incr("n", 2) == 2
        finally:
            await store.aclose()

    trio.run(as_ada)
    op(b, "config.set", ada, namespace="payments", path="db.host", value="db1")
    assert op(b, "config.get", ada, namespace="payments", path="db.host")["value"] == "db1"
    err = refused(b, "store.write", ada, database="orders", table="audit", key="x", value=b"")
    assert err.status == 403
    assert err.detail == "ada may not access store:orders:audit: rule 'dev-no-audit' denies it"
    err = refused(b, "config.set", ada, namespace="payments", path="keys.stripe", value="sk")
    assert err.status == 403 and "rule 'dev-no-keys' denies it" in err.detail, err
    # bob (scope ops): the any-account denial decides for orders; nothing grants payments
    bob = login(b, "bob", "bob-secret-1")["token"]
    err = refused(b, "store.read", bob, database="orders", table="carts", key="c1")
    assert err.status == 403
    assert err.detail == ("bob may not access store:orders:carts: rule 'accounts-no-orders' "
                          "denies it")
    err = refused(b, "config.get", bob, namespace="payments", path="db.host")
    assert err.status == 403
    assert err.detail == ("bob may not access config:payments:db.host in namespace "
                          "'payments': no rule grants it")

    # the CLI prints the same denials as one line and exits 1
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir))
    out = meshd("store", "read", "c1", "--database", "orders", "--table", "carts", env=env)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == ("401 unauthorized: store:orders:carts needs a token with "
                                  "access (rule 'no-nodes-orders' denies it)")
    out = meshd("store", "read", "c1", "--database", "orders", "--table", "carts", "--json",
                env={**env, "MESHD_TOKEN": ada})
    assert out.returncode == 0 and json.loads(out.stdout)["value"] == "two items", out.stderr
    out = meshd("config", "set", "keys.stripe", '"sk"', "--namespace", "payments",
                env={**env, "MESHD_TOKEN": ada})
    assert out.returncode == 1
    assert out.stderr.startswith("403 forbidden: ") and "'dev-no-keys'" in out.stderr


def test_a_refused_watch_ends_with_the_denial(cluster):
    a = cluster.add("a", env=FAST)
    op(a, "auth.rules.create", id="no-nodes-orders", resource="store:orders:*", scope="node",
       access="denied", priority=10)
    assert refused(a, "store.read", database="orders", table="t", key="k").status == 401
    got: list[object] = []

    async def watch():
        store = Store("orders", "t", addr=a.data_dir / "meshd.sock")
        with trio.move_on_after(5):  # the refusal is immediate: 5 s is generous
            try:
                async for ev in store.watch():
                    got.append(ev)
            except MeshError as exc:
                got.append(exc)

    trio.run(watch)
    assert len(got) == 1 and isinstance(got[0], MeshError), got
    assert got[0].status == 401 and "'no-nodes-orders'" in got[0].detail


async def test_reads_and_watches_leave_out_what_a_narrower_rule_denies(cluster):
    """A watch of every database (or of a database without a table) and a config get or
    watch of a parent path are checked for each table and path in what they return, not
    only for the name asked for (found by review: a narrower deny was bypassed)."""
    a = await trio.to_thread.run_sync(lambda: cluster.add("a", env=FAST))

    async def as_(token: str | None, name: str, **args: object) -> object:
        client = ControlClient(a.data_dir / "meshd.sock", token=token)
        try:
            return await client.call(name, **args)
        finally:
            await client.aclose()

    for rid, resource, access, priority in [
            ("dev-store", "store:*:*", "granted", 0),
            ("dev-no-cards", "store:orders:cards", "denied", 10),
            ("dev-no-plain-table", "store:orders:store", "denied", 10),
            ("dev-config", "config:*:*", "granted", 0),
            ("dev-no-password", "config:default:db.password", "denied", 10)]:
        await as_(None, "auth.rules.create", id=rid, resource=resource, scope="dev",
                  access=access, priority=priority)
    await as_(None, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    ada = (await as_(None, "auth.login", id="ada", secret="ada-secret-1"))["token"]

    # store: a table no rule names is hers; the denied ones are not, whatever she asks for
    await as_(None, "store.write", database="orders", table="store", key="plain", value=b"p")
    with pytest.raises(MeshError) as info:  # no table: table "store", checked as such
        await as_(ada, "store.read", database="orders", key="plain")
    assert info.value.status == 403 and "'dev-no-plain-table'" in info.value.detail
    async with control_stream(a.data_dir, "store.watch", token=ada) as every, \
            control_stream(a.data_dir, "store.watch", token=ada, database="orders") as orders:
        # written before the allowed write, so seen before it if it were seen at all
        await as_(None, "store.write", database="orders", table="cards", key="c1", value=b"4")
        await as_(ada, "store.write", database="orders", table="carts", key="k1", value=b"1")
        for events in (every, orders):
            ev = await events.next(lambda e: True, 15, "the first event")
            assert (ev["database"], ev["table"], ev["key"]) == ("orders", "carts", "k1"), \
                events.seen

    # config: a parent path's value leaves out the denied path below it
    await as_(None, "config.set", path="db.host", value="h1")
    await as_(None, "config.set", path="db.password", value="pw1")
    assert (await as_(ada, "config.get", path="db"))["value"] == {"host": "h1"}
    assert (await as_(ada, "config.get"))["value"] == {"db": {"host": "h1"}}
    with pytest.raises(MeshError) as info:
        await as_(ada, "config.get", path="db.password")
    assert info.value.status == 403
    async with control_stream(a.data_dir, "config.watch", token=ada, path="db") as changes:
        await as_(None, "config.set", path="db.password", value="pw2")  # not hers: no event
        await as_(None, "config.set", path="db.host", value="h2")
        ev = await changes.next(lambda e: True, 15, "the first config event")
        assert (ev["value"], ev["changed_key"]) == ({"host": "h2"}, "db.host"), changes.seen
    # a set or del of the parent would replace what she may not touch: refused
    for name, args in (("config.set", {"path": "db", "value": {"password": "mine"}}),
                       ("config.set", {"path": "db", "value": {"host": "h3"}}),
                       ("config.del", {"path": "db"})):
        with pytest.raises(MeshError) as info:
            await as_(ada, name, **args)
        assert info.value.status == 403 and "'dev-no-password'" in info.value.detail, name
    assert (await as_(None, "config.get", path="db"))["value"] == {"host": "h2",
                                                                   "password": "pw2"}
    await as_(ada, "config.set", path="db.host", value="h4")  # her own path: as before


def test_health_checks_call_the_instances_with_the_callers_token(cluster):
    """`health` reaches each instance's __health__ as the caller, not as the node (found by
    review: a token that may only list services made the node call them)."""
    a = cluster.add("a", env=FAST)
    cluster.service(a)
    wait_for(services_ready([a], "testsvc", 1), 15, "testsvc registered")
    root = (a.data_dir / "admin.token").read_text().strip()
    op(a, "auth.accounts.create", id="viewer", secret="viewer-secret-1", scopes=["viewer"])
    op(a, "auth.rules.create", id="viewers", resource="mesh:services", scope="viewer",
       access="granted")
    viewer = login(a, "viewer", "viewer-secret-1")["token"]
    # the local operator (as the node) and an admin: the instance answers
    assert [r["status"] for r in op(a, "health", service="testsvc")] == ["ok"]
    assert [r["status"] for r in op(a, "health", root, service="testsvc")] == ["ok"]
    # the viewer may list the services, not call them: the instance's daemon refuses it
    [row] = op(a, "health", viewer, service="testsvc")
    assert row["status"] == "failing", row
    assert "viewer may not access service:testsvc:__health__: no rule grants it" in \
        row["detail"], row


def test_system_databases_admins_read_nobody_writes_through_the_store(cluster, tmp_path):
    a, b = pair(cluster)
    admin_token = (a.data_dir / "admin.token").read_text().strip()
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    wait_for(lambda: any(x["id"] == "ada" for x in op(b, "auth.accounts.list")), 10,
             "ada on b")
    ada = login(b, "ada", "ada-secret-1")["token"]
    for db in ("auth", "routing"):
        # reads: b's operator is a member's operator, not an admin; ada is not an admin
        err = refused(b, "store.read", database=db, table="accounts", prefix="")
        assert err.status == 403 and "holds no issuer key" in err.detail, err
        err = refused(b, "store.read", ada, database=db, table="accounts", prefix="")
        assert (err.status, err.detail) == (403, "ada is not an admin")
    rows = op(b, "store.read", admin_token, database="auth", table="accounts", prefix="")
    assert {"admin", "ada"} <= {r["key"] for r in rows}
    assert {r["key"] for r in op(a, "store.read", database="auth", table="accounts",
                                 prefix="")} >= {"admin", "ada"}  # a holds the root key
    wait_for(lambda: {"a", "b"} <= {r["key"] for r in op(
        b, "store.read", admin_token, database="routing", table="links", prefix="")}, 10,
        "both nodes' link adverts readable by the admin")
    # writes through store operations: refused for everyone, admins included
    forged = json.dumps({"type": "user", "scopes": ["admin"], "metadata": {},
                         "secret": "x"}).encode()
    for d, token in ((a, None), (b, admin_token), (b, None), (b, ada)):
        for db in ("auth", "routing"):
            for name, args in [("store.write", {"key": "ada", "value": forged}),
                               ("store.delete", {"key": "ada"}),
                               ("store.counter", {"key": "ada", "delta": 1}),
                               ("store.set", {"key": "ada", "op": "add", "member": "x"})]:
                err = refused(d, name, token, database=db, table="accounts", **args)
                assert err.status == 403, (d.name, token is not None, db, name, err)
                assert f"the {db} database is written by meshd itself" in err.detail
    assert {x["id"]: x["scopes"] for x in op(b, "auth.accounts.list")}["ada"] == ["dev"]
    assert op(b, "auth.whoami", ada) == {"id": "ada", "scopes": ["dev"], "via": "token",
                                         "namespace": "default"}

    # `meshd auth ...` is what writes it: a signed record, readable by an admin everywhere
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir))
    out = meshd("auth", "accounts", "create", "eve", "--secret", "eve-secret-1", "--scope",
                "ops", env=env)
    assert out.returncode == 1 and "holds no issuer key" in out.stderr  # b: no admin
    out = meshd("auth", "accounts", "create", "eve", "--secret", "eve-secret-1", "--scope",
                "ops", env={**env, "MESHD_TOKEN": admin_token})
    assert out.returncode == 0 and out.stdout.strip() == "created account eve", out.stderr

    def eve_record():
        rows = op(a, "store.read", database="auth", table="accounts", key="eve")
        return rows[0] if rows else None

    wait_for(lambda: eve_record() is not None, 10, "eve's record on a")
    rec = eve_record()
    assert json.loads(rec["value"])["scopes"] == ["ops"]
    assert set(rec["metadata"]) >= {"kid", "sig"}  # signed by an issuer key

    # a watch of every database leaves the system databases out
    seen: list[dict] = []

    async def watch_all():
        watcher = ControlClient(a.data_dir / "meshd.sock")
        writer = ControlClient(a.data_dir / "meshd.sock")
        watching = trio.Event()

        async def collect(cancel_scope):
            async for ev in watcher.stream("store.watch", prefix=""):
                seen.append(ev)
                watching.set()
                if ev["key"] == "marker":
                    cancel_scope.cancel()

        try:
            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collect, nursery.cancel_scope)
                    while not watching.is_set():  # until the watch is surely in place
                        await writer.call("store.write", database="default", table="store",
                                          key="ready", value=b"r")
                        await trio.sleep(0.1)
                    await writer.call("auth.accounts.create", id="zed",
                                      secret="zed-secret-1", scopes=["ops"])
                    await writer.call("store.write", database="default", table="store",
                                      key="marker", value=b"m")
                    await trio.sleep_forever()
        finally:
            await watcher.aclose()
            await writer.aclose()

    trio.run(watch_all)
    assert seen[-1]["key"] == "marker"
    assert {(ev["database"], ev["key"]) for ev in seen} == {("default", "ready"),
                                                            ("default", "marker")}, seen
    assert any(x["id"] == "zed" for x in op(a, "auth.accounts.list"))  # it was written


# --- token lifetimes ---------------------------------------------------------------------------

def published_keys(d) -> dict[str, bytes]:
    """kid -> public PEM of every issuer key in the auth database (read as d's admin)."""
    return {r["key"]: json.loads(r["value"])["public"].encode()
            for r in op(d, "store.read", database="auth", table="keys", prefix="")}


def test_token_create_ttl_and_a_retired_keys_tokens_until_they_expire(cluster, tmp_path):
    """`token create --ttl` sets the token's life; after `auth keys rotate` the retired
    key's tokens keep working and new ones come from the new key. The daemon's verifier
    allows 60 s of clock skew past expiry, so waiting for the refusal itself takes over a
    minute: that is the soak test below; here the daemon's own keys and verifier rules
    judge the token at chosen times."""
    a = cluster.add("a", env=FAST)
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))  # the CLI uses a's admin.token
    out = meshd("auth", "token", "create", "--account", "ada", "--ttl", "5", "--json", env=env)
    assert out.returncode == 0, out.stderr
    short = json.loads(out.stdout)["token"]
    claims = unverified_claims(short)
    assert claims["exp"] - claims["iat"] == 5 and claims["sub"] == "ada"
    assert abs(claims["iat"] - time.time()) < 30
    default = meshd("auth", "token", "create", "--account", "ada", env=env)
    assert default.returncode == 0
    claims_default = unverified_claims(default.stdout.strip())
    assert claims_default["exp"] - claims_default["iat"] == 3600  # the documented default
    assert op(a, "auth.whoami", short)["id"] == "ada"
    too_short = meshd("auth", "token", "create", "--account", "ada", "--ttl", "0.5", env=env)
    assert too_short.returncode == 2 and "0.5" in too_short.stderr  # ttl >= 1 s
    err = refused(a, "auth.token.create", account="ada", ttl=31 * 86400)
    assert err.status == 400 and "ttl must be between" in err.detail

    [old_kid] = [k["kid"] for k in op(a, "auth.keys.list")]
    out = meshd("auth", "keys", "rotate", "--json", env=env)
    assert out.returncode == 0, out.stderr
    new_kid = json.loads(out.stdout)["kid"]
    states = {k["kid"]: k["state"] for k in op(a, "auth.keys.list")}
    assert states == {old_kid: "retired", new_kid: "current"}
    fresh = op(a, "auth.token.create", account="ada", ttl=600)["token"]
    assert Verifier._kid(fresh) == new_kid and Verifier._kid(short) == old_kid
    # the retired key's token still works on the daemon...
    assert op(a, "auth.whoami", short)["id"] == "ada"
    # ...until its expiry plus the 60 s leeway, judged with the keys the daemon publishes
    keys = published_keys(a)
    assert set(keys) == {old_kid, new_kid}
    cluster_id = json.loads(op(a, "store.read", database="auth", table="meta",
                               key="cluster")[0]["value"])["id"]
    assert claims["aud"] == cluster_id
    verifier = Verifier(cluster_id, lambda: keys, lambda jti: False)
    assert verifier.verify(short, now=claims["exp"] + 59)["sub"] == "ada"
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(short, now=claims["exp"] + 61)


@pytest.mark.soak
def test_soak_tokens_are_refused_once_ttl_and_leeway_have_passed(cluster, tmp_path):
    """End to end: 3 s tokens, one from a key retired meanwhile, stop working everywhere
    once their expiry plus the verifier's 60 s leeway has passed (a minute's wait)."""
    a, b = pair(cluster)
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    wait_for(lambda: any(x["id"] == "ada" for x in op(b, "auth.accounts.list")), 10,
             "ada on b")
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))

    def create(ttl: str) -> str:
        out = meshd("auth", "token", "create", "--account", "ada", "--ttl", ttl, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    retired = create("3")
    assert meshd("auth", "keys", "rotate", env=env).returncode == 0
    current, lasting = create("3"), create("600")
    assert Verifier._kid(retired) != Verifier._kid(current)
    wait_for(lambda: all(op(d, "auth.whoami", t)["id"] == "ada"
                         for d in (a, b) for t in (retired, current, lasting)), 10,
             "every token accepted on both nodes")
    expires = max(unverified_claims(t)["exp"] for t in (retired, current))
    time.sleep(max(0.0, expires + 60 + 2 - time.time()))
    for d in (a, b):
        for t in (retired, current):
            err = refused(d, "auth.whoami", t)
            assert (err.status, err.detail) == (401, "invalid token"), (d.name, err)
        assert op(d, "auth.whoami", lasting)["id"] == "ada"
    out = meshd("auth", "whoami", env={**env, "MESHD_TOKEN": current,
                                       "MESHD_DATA_DIR": str(b.data_dir)})
    assert out.returncode == 1 and out.stderr.strip() == "401 unauthorized: invalid token"
    assert "token expired" in a.log.read_text()


# --- login, the token file, MESHD_TOKEN and --token, refresh ----------------------------------

def test_cli_login_keeps_tokens_and_token_precedence(cluster, tmp_path):
    a, b = pair(cluster)
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    op(a, "auth.accounts.create", id="bob", secret="bob-secret-1", scopes=["ops"])
    wait_for(lambda: {"ada", "bob"} <= {x["id"] for x in op(b, "auth.accounts.list")}, 10,
             "accounts on b")
    token_file = tmp_path / "config" / "token.json"
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir))  # b keeps no admin.token

    def whoami(**extra: str) -> str:
        out = meshd(*extra.pop("args", ()), "auth", "whoami", "--json", env={**env, **extra})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["id"]

    assert whoami() == "node:b"
    wrong = meshd("auth", "login", "--id", "ada", "--secret", "nope-nope", env=env)
    assert wrong.returncode == 1 and wrong.stderr.startswith("401 unauthorized")
    assert not token_file.exists()
    # the secret is prompted for (read from stdin here: no terminal)
    out = meshd("auth", "login", "--id", "ada", env=env, stdin="ada-secret-1\n")
    assert out.returncode == 0, out.stderr
    assert f"logged in as ada (token kept in {token_file})" in out.stdout
    saved = json.loads(token_file.read_text())
    assert saved["account"] == "ada" and saved["token"] and saved["refresh_token"]
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    # later commands act as ada: whoami, and an admin-only read is now ada's 403
    assert whoami() == "ada"
    out = meshd("auth", "accounts", "list", env=env)
    assert out.returncode == 1 and out.stderr.strip() == "403 forbidden: ada is not an admin"
    # MESHD_TOKEN beats the saved token; --token beats MESHD_TOKEN (before or after the
    # command name)
    bob = login(b, "bob", "bob-secret-1")["token"]
    assert whoami(MESHD_TOKEN=bob) == "bob"
    assert whoami(MESHD_TOKEN=bob, args=("--token", saved["token"])) == "ada"
    out = meshd("auth", "whoami", "--json", "--token", bob, env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == "bob"
    # logout forgets the tokens: back to the local operator
    out = meshd("auth", "logout", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "logged out"
    assert not token_file.exists()
    assert whoami() == "node:b"


def test_refresh_gives_fresh_tokens_with_the_account_as_it_is_now(cluster):
    a, b = pair(cluster)
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev"])
    wait_for(lambda: any(x["id"] == "ada" for x in op(b, "auth.accounts.list")), 10,
             "ada on b")

    async def refresh(d, token):
        auth = Auth(d.data_dir / "meshd.sock")
        try:
            return await auth.refresh(token)
        finally:
            await auth.aclose()

    first = login(b, "ada", "ada-secret-1")  # b holds no key: a signs
    again = trio.run(refresh, b, first["refresh_token"])
    assert again["account"] == "ada" and again["scopes"] == ["dev"]
    assert again["token"] != first["token"] and again["refresh_token"]
    new_claims = unverified_claims(again["token"])
    assert new_claims["jti"] != unverified_claims(first["token"])["jti"]
    assert new_claims["typ"] == "access" and again["expires_in"] == 3600
    assert op(b, "auth.whoami", again["token"]) == {"id": "ada", "scopes": ["dev"],
                                                      "via": "token", "namespace": "default"}
    # each kind of token only does its own job
    with pytest.raises(MeshError) as info:
        trio.run(refresh, a, first["token"])
    assert (info.value.status, info.value.detail) == (401, "invalid token")
    assert refused(a, "auth.whoami", first["refresh_token"]).status == 401
    # a refresh carries the account's scopes of now, and stops with the account
    op(a, "auth.accounts.create", id="ada", secret="ada-secret-1", scopes=["dev", "ops"])
    wait_for(lambda: {x["id"]: x["scopes"] for x in op(b, "auth.accounts.list")}["ada"]
             == ["dev", "ops"], 10, "ada's new scopes on b")
    assert trio.run(refresh, b, again["refresh_token"])["scopes"] == ["dev", "ops"]
    op(a, "auth.accounts.delete", id="ada")
    with pytest.raises(MeshError) as info:
        trio.run(refresh, a, first["refresh_token"])
    assert info.value.status == 401


def test_only_a_token_this_cluster_signed_can_be_revoked(cluster):
    """Revoking is public (the token is the proof): a made-up token proves nothing and
    must not write a revocation (found by review: anyone could fill the auth database)."""
    import base64

    a = cluster.add("a")
    claims = json.dumps({"jti": "junk-1", "exp": 4e9}).encode()
    forged = "v4.public." + base64.urlsafe_b64encode(claims + bytes(64)).decode().rstrip("=")
    err = refused(a, "auth.token.revoke", token=forged)
    assert err.status == 403 and "only a token this cluster signed" in err.detail
    long_id = json.dumps({"jti": "j" * 65, "exp": 4e9}).encode()
    err = refused(a, "auth.token.revoke", token="v4.public." + base64.urlsafe_b64encode(
        long_id + bytes(64)).decode().rstrip("="))
    assert err.status == 400
    # a real one still works
    admin = (a.data_dir / "admin.token").read_text().strip()
    assert op(a, "auth.token.revoke", token=admin)["revoked"]
