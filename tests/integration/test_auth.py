"""Auth with real daemons: rules enforced at the callee, tokens, revocation everywhere,
key rotation without failed calls, restart keeps accounts and rules, service identity."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio

from meshd.errors import MeshError
from sdk import Auth, Client

from .cluster import control, wait_for

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
    out = subprocess.run([sys.executable, "-m", "cli", "auth", "bootstrap", "--data-dir",
                          str(a.data_dir)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 1 and out.stderr.startswith("409")
    who = subprocess.run([sys.executable, "-m", "cli", "--token", token, "auth", "whoami",
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
