"""Store and config per namespace with real daemons: `orders` in team-a and in team-b are two
databases (--namespace, MESHD_NAMESPACE, the SDK's namespace=), listings and watches show a
namespace's own databases under the caller's names only, config trees are per namespace,
names starting with '@' and invalid namespaces are 400 lines, and `meshd namespaces`
counts each namespace's keys."""

from __future__ import annotations

import json
import subprocess
import sys

import trio

from meshd_sdk import Config, Store

from .cluster import Lines, wait_for
from .test_cli import cli_env, meshd, ok


def _value(env, key, *args):
    rec = json.loads(ok("store", "read", key, "--database", "orders", "--json", *args,
                        env=env))
    return [rec["value"]]


def test_store_and_config_are_per_namespace(cluster, tmp_path):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    env_a = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    env_b = cli_env(tmp_path, MESHD_DATA_DIR=str(b.data_dir))

    ok("store", "write", "k1", "for-a", "--database", "orders", "--namespace", "team-a",
       env=env_a)
    ok("store", "write", "k1", "for-b", "--database", "orders", env={
        **env_a, "MESHD_NAMESPACE": "team-b"})
    ok("store", "write", "k1", "for-default", "--database", "orders", env=env_a)
    # each namespace reads its own value, on both nodes once replicated
    for env in (env_a, env_b):
        wait_for(lambda env=env: meshd("store", "read", "k1", "--database", "orders",
                                       "--namespace", "team-b", env=env).returncode == 0,
                 15, "team-b's write replicated")
        assert _value(env, "k1", "--namespace", "team-a") == ["for-a"]
        assert _value(env, "k1", "--namespace", "team-b") == ["for-b"]
        assert _value(env, "k1") == ["for-default"]

    # listings show the namespace's own databases, under the caller's names
    def databases(*args):
        rows = json.loads(ok("store", "databases", "--json", *args, env=env_a))
        assert all(r["backend"] == "embedded" for r in rows), rows
        return [r["name"] for r in rows]
    assert databases("--namespace", "team-a") == ["orders"]
    assert "orders" in databases() and not any(d.startswith("@") for d in databases())
    assert databases("--namespace", "nobody") == []  # unknown namespace: empty, not an error
    assert json.loads(ok("store", "tables", "--database", "orders", "--namespace", "team-b",
                         "--json", env=env_a)) == ["store"]

    # a delete in team-a leaves team-b's key alone
    ok("store", "delete", "k1", "--database", "orders", "--namespace", "team-a", env=env_a)
    gone = meshd("store", "read", "k1", "--database", "orders", "--namespace", "team-a",
                 env=env_a)
    assert gone.returncode == 1 and gone.stderr.startswith("404 not found"), gone.stderr
    assert _value(env_a, "k1", "--namespace", "team-b") == ["for-b"]

    # the kept names are not the caller's to use, and bad namespaces are 400 lines
    bad = meshd("store", "read", "k1", "--database", "@team-b/orders", env=env_a)
    assert bad.returncode == 1 and bad.stderr.startswith("400 bad request: database names "
                                                         "may not start with '@'"), bad.stderr
    for cmd in (("store", "read", "k1"), ("config", "get", "x"), ("store", "databases")):
        out = meshd(*cmd, "--namespace", "Team_A", env=env_a)
        assert out.returncode == 1 and out.stderr.startswith(
            "400 bad request: invalid namespace 'Team_A'"), (cmd, out.stderr)

    # config trees are per namespace
    ok("config", "set", "db.host", '"a-host"', "--namespace", "team-a", env=env_a)
    ok("config", "set", "db.host", '"b-host"', env={**env_a, "MESHD_NAMESPACE": "team-b"})
    for env in (env_a, env_b):
        wait_for(lambda env=env: meshd("config", "get", "db.host", "--namespace", "team-b",
                                       env=env).returncode == 0, 15, "team-b's config on b")
        assert json.loads(ok("config", "get", "db.host", "--namespace", "team-a",
                             "--json", env=env)) == "a-host"
        assert json.loads(ok("config", "get", "db.host", "--namespace", "team-b",
                             "--json", env=env)) == "b-host"
    nothing = meshd("config", "get", "db.host", env=env_a)
    assert nothing.returncode == 1 and nothing.stderr.startswith("404"), nothing.stderr

    # counts per namespace
    rows = {r["name"]: r for r in json.loads(ok("namespaces", "--json", env=env_a))}
    assert rows["team-b"]["store_keys"] == 1
    assert "team-a" not in rows, "team-a's only key was deleted: nothing is left to count"
    assert rows["default"]["store_keys"] >= 1


def test_a_watch_follows_its_namespace_only(cluster, tmp_path):
    a = cluster.add("a")
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    watch = subprocess.Popen([sys.executable, "-m", "meshd_cli", "store", "watch", "--namespace",
                              "team-a", "--database", "orders", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = Lines(watch.stdout)

        def write(ns, key):
            ok("store", "write", key, "v", "--database", "orders", "--namespace", ns, env=env)

        # the watch is live once a write of its own namespace shows (retried until it does)
        wait_for(lambda: (write("team-a", "probe"), any('"probe"' in x for x in lines.lines))[1],
                 15, "the watch started")
        write("team-b", "other-ns")
        write("default", "default-ns")
        write("team-a", "mine")
        seen = json.loads(lines.wait(lambda x: '"mine"' in x, 15, "team-a's write"))
        assert seen["database"] == "orders" and seen["key"] == "mine"
        keys = {json.loads(x)["key"] for x in lines.lines}
        assert "other-ns" not in keys and "default-ns" not in keys, lines.text()
        assert all(json.loads(x)["database"] == "orders" for x in lines.lines)
    finally:
        watch.terminate()
        watch.wait(10)


def test_sdk_store_and_config_take_a_namespace(cluster, monkeypatch):
    a = cluster.add("a")
    sock = a.data_dir / "meshd.sock"

    async def main() -> None:
        s_a = Store("orders", addr=sock, namespace="team-a")
        monkeypatch.setenv("MESHD_NAMESPACE", "team-b")
        s_b = Store("orders", addr=sock)  # MESHD_NAMESPACE
        await s_a.write("k", "from-a")
        await s_b.write("k", "from-b")
        assert await s_a.get("k") == b"from-a"
        assert await s_b.get("k") == b"from-b"
        c_a = Config("team-a", addr=sock)
        await c_a.set("x", 1)
        c_b = Config(addr=sock)  # MESHD_NAMESPACE
        assert c_b.namespace == "team-b"
        assert await c_b.get("x", None) is None
        assert await c_a.get("x") == 1
        for s in (s_a, s_b, c_a, c_b):
            await s.aclose()

    trio.run(main)


def test_a_token_of_another_namespace_cannot_read_or_write_its_store(cluster, tmp_path):
    a = cluster.add("a")
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    ok("store", "write", "secret", "team-a's", "--database", "orders", "--namespace", "team-a",
       env=env)
    ok("auth", "accounts", "create", "bob", "--secret", "bob-secret-1", "--scope", "dev",
       "--namespace", "team-b", env=env)
    ok("auth", "rules", "create", "dev-store", "--resource", "store:*:*", "--scope", "dev",
       "--access", "granted", "--namespace", "team-b", env=env)
    token = json.loads(ok("auth", "login", "--id", "bob", "--secret", "bob-secret-1",
                          "--namespace", "team-b", "--json", env=env))["token"]
    ok("auth", "logout", env=env)  # the local CLI acts as the node's admin again
    as_bob = {**env, "MESHD_TOKEN": token}
    # in its own namespace the rule lets bob in
    ok("store", "write", "mine", "bob's", "--database", "orders", "--namespace", "team-b",
       env=as_bob)
    assert _value(as_bob, "mine", "--namespace", "team-b") == ["bob's"]
    # team-a's store is another namespace's: 403 naming it, for reads and writes
    for cmd in (("store", "read", "secret"), ("store", "write", "x", "y"),
                ("store", "delete", "secret")):
        out = meshd(*cmd, "--database", "orders", "--namespace", "team-a", env=as_bob)
        assert out.returncode == 1 and out.stderr.startswith("403 forbidden: bob may not "
                                                             "access store:orders:"), out.stderr
        assert "in namespace 'team-a'" in out.stderr and "team-b:SCOPE" in out.stderr
    assert _value(env, "secret", "--namespace", "team-a") == ["team-a's"]


def test_the_config_database_is_not_reachable_through_the_store_api(cluster, tmp_path):
    """Every namespace's config tree lives in it: the store API would bypass each
    namespace's config rules (found by review)."""
    a = cluster.add("a")
    env = cli_env(tmp_path, MESHD_DATA_DIR=str(a.data_dir))
    ok("config", "set", "db.password", '"pw"', "--namespace", "team-b", env=env)
    for cmd in (("store", "read", "db.password", "--table", "team-b"),
                ("store", "write", "db.password", "owned", "--table", "team-b")):
        out = meshd(*cmd, "--database", "config", env=env)
        assert out.returncode == 1 and out.stderr.startswith(
            "403 forbidden: the config database holds every namespace's config tree"), \
            out.stderr
    assert json.loads(ok("config", "get", "db.password", "--namespace", "team-b", "--json",
                         env=env)) == "pw"
