"""Store and config with real daemons on loopback."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import trio

from meshd.errors import MeshError
from meshd_sdk import Config, Store

from .cluster import Daemon, Lines, control, wait_for, wait_for_async

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1"}


def three(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    c = cluster.add("c", join=[a.addr], env=FAST)
    wait_for(lambda: all(len([m for m in d.members().values() if m["status"] == "alive"]) == 3
                         for d in (a, b, c)), 20, "3 alive")
    return a, b, c


def value_at(d, key, db="default", table="store"):
    """The value of `key` on daemon `d`, or None when it has none (a 404). Any other error
    fails, and so does a daemon that is no longer running (not "no value")."""
    d.assert_running()
    try:
        rows = control(d.data_dir, "store.read", database=db, table=table, key=key)
    except MeshError as exc:
        if exc.status == 404:
            return None
        raise
    return rows[0]["value"]


def cli(daemon, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args, "--data-dir",
                           str(daemon.data_dir)], capture_output=True, text=True, timeout=20,
                          input=stdin)


def test_write_on_a_read_on_c_and_every_kind(cluster):
    a, b, c = three(cluster)
    out = cli(a, "store", "write", "greeting", "hello", "--meta", "lang=en")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: value_at(c, "greeting") == b"hello", 5, "greeting on c")
    rec = json.loads(cli(c, "store", "read", "greeting", "--json").stdout)
    assert rec["value"] == "hello" and rec["metadata"] == {"lang": "en"}
    assert rec["written_by"] == "a"

    async def kinds():
        sa, sb = Store(addr=a.data_dir / "meshd.sock"), Store(addr=b.data_dir / "meshd.sock")
        assert await sa.incr("hits", 5) == 5
        await sb.incr("hits", -2)
        assert await sa.add("tags", "x") == ["x"]
        await sb.add("tags", "y")

        async def merged() -> bool:
            return (await sa.incr("hits", 0) == 3 and await sb.incr("hits", 0) == 3
                    and await sa.members("tags") == ["x", "y"]
                    and await sb.members("tags") == ["x", "y"])

        await wait_for_async(merged, 10, "counter 3 and set {x, y} on a and b")
        ttl = 3.0
        written = time.time()
        await sa.write("session:1", b"s", ttl=ttl)
        assert await sa.get("session:1") == b"s"

        async def on_b() -> bool:
            return await sb.get("session:1") == b"s"

        await wait_for_async(on_b, ttl, "the record on b before its ttl ran out")

        async def expired() -> bool:
            return await sa.get("session:1") is None and await sb.get("session:1") is None

        await wait_for_async(expired, ttl + 10, "the record expired on a and b")
        # gone only once the ttl had passed (the expiry is in ms from the write's clock)
        assert time.time() >= written + ttl - 0.002, "expired before its ttl"
        await sa.aclose()
        await sb.aclose()

    trio.run(kinds)
    # an expired record is gone from listings too
    keys = json.loads(cli(b, "store", "list", "--json").stdout)
    assert keys == ["greeting", "hits", "tags"]
    assert json.loads(cli(b, "store", "databases", "--json").stdout) == [
        {"name": "default", "backend": "embedded"}]
    assert json.loads(cli(b, "store", "tables", "--json").stdout) == ["store"]
    assert cli(a, "store", "delete", "greeting").returncode == 0
    wait_for(lambda: value_at(c, "greeting") is None, 5, "delete on c")


def test_replicas_option_waits_for_other_nodes(cluster):
    a, b, c = three(cluster)
    r = control(a.data_dir, "store.write", key="k", value=b"v", replicas=3)
    assert r["value"] == b"v"
    # right after the acknowledged write both others already hold it
    assert value_at(b, "k") == b"v" and value_at(c, "k") == b"v"


def test_kill9_right_after_acknowledged_writes_loses_nothing(cluster):
    a = cluster.add("solo", env=FAST)

    async def burst():
        store = Store(addr=a.data_dir / "meshd.sock")
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.write, f"k{i:03d}", f"v{i}".encode())
        await store.aclose()

    trio.run(burst)  # every write returned: each was acknowledged
    a.kill9()
    a.start()
    rows = control(a.data_dir, "store.read", prefix="k")
    assert len(rows) == 200
    assert {r["key"]: r["value"] for r in rows} == {f"k{i:03d}": f"v{i}".encode()
                                                    for i in range(200)}


async def watch_into(agen, seen: list) -> None:
    async for item in agen:
        seen.append(item)


async def until_seen(seen: list, match, timeout: float, what: str, nudge=None) -> int:
    """Wait until an item of `seen` matches; returns its index. `nudge()`, when given, runs
    before each look (e.g. a marker write repeated until a new watch shows it)."""
    found: list[int] = []

    async def check() -> bool:
        if nudge is not None:
            await nudge()
        found[:] = [i for i, x in enumerate(seen) if match(x)][:1]
        return bool(found)

    await wait_for_async(check, timeout, what)
    return found[0]


def test_config_watch_fires_on_b_when_set_on_a_with_layers(cluster, tmp_path):
    a, b, _ = three(cluster)
    seen: list = []
    cfg_file = tmp_path / "app.json"
    cfg_file.write_text(json.dumps({"db": {"pool": 10}}))

    async def go():
        cfg_b = Config("app", addr=b.data_dir / "meshd.sock", file=cfg_file,
                       env_prefix="MESHDTEST_")
        cfg_a = Config("app", addr=a.data_dir / "meshd.sock")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_into, cfg_b.watch("db"), seen)
            marks = iter(range(1, 1000))

            async def mark() -> None:
                await cfg_a.set("db.mark", next(marks))

            # set a marker on a until the watch on b shows one: from then on it sees all
            await until_seen(seen, lambda v: "mark" in v, 10, "the watch on b live", mark)
            last = next(marks) - 1  # once b shows the last marker, older ones change nothing
            await until_seen(seen, lambda v: v.get("mark") == last, 10, "the last marker")
            await cfg_a.delete("db.mark")  # SDK Config.delete, seen on b
            await until_seen(seen, lambda v: v == {"pool": 10}, 10, "db.mark deleted on b")
            ready = len(seen)
            await cfg_a.set("db.host", "db1")
            # one change at a time: the next set waits until b has shown this one
            await until_seen(seen, lambda v: v.get("host") == "db1", 10, "db1 on b")
            await cfg_a.set("db", {"host": "db2", "port": 5432})
            await until_seen(seen, lambda v: v.get("host") == "db2", 10, "db2 on b")
            nursery.cancel_scope.cancel()
        with pytest.raises(MeshError) as info:
            await cfg_a.delete("db.mark")
        assert (info.value.status, info.value.detail) == (
            404, "no config at 'db.mark' in namespace 'app'")
        os.environ["MESHDTEST_DB__PORT"] = "6543"
        try:
            assert await cfg_b.get("db.port") == 6543  # env over store
            assert await cfg_b.get("db.pool") == 10  # file
            assert await cfg_b.get("db.host") == "db2"  # store
            assert await cfg_b.get("nope", "dflt") == "dflt"
        finally:
            del os.environ["MESHDTEST_DB__PORT"]
        await cfg_a.aclose()
        await cfg_b.aclose()
        return ready

    async def bounded():
        with trio.fail_after(40):
            return await go()

    ready = trio.run(bounded)
    assert seen[ready:] == [{"host": "db1", "pool": 10}, {"host": "db2", "port": 5432, "pool": 10}]
    out = cli(a, "config", "get", "db", "--namespace", "app", "--json")
    assert json.loads(out.stdout) == {"host": "db2", "port": 5432}


def test_cli_config_watch_and_del_across_nodes(cluster):
    """README: `meshd config set/get/watch --json`; `config del` deletes a path and
    everything below it, on every node."""
    a, b, _ = three(cluster)
    watch = subprocess.Popen([sys.executable, "-m", "meshd_cli", "config", "watch", "db", "--json",
                              "--data-dir", str(b.data_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines = Lines(watch.stdout)
    try:
        n = 0

        def marked() -> bool:  # set a marker until the watch shows one: it is live
            nonlocal n
            n += 1
            assert cli(a, "config", "set", "db.mark", str(n)).returncode == 0
            return any('"mark"' in x for x in lines.lines)

        wait_for(marked, 15, "`config watch` on b live")
        # once b shows the last marker, older ones arriving late change nothing
        wait_for(lambda: any(json.loads(x)["value"] == {"mark": n} for x in lines.lines), 10,
                 "the last marker on b")
        start = len(lines.lines)
        steps = [(("set", "db.host", '"db1"'), {"mark": n, "host": "db1"}, "db.host"),
                 (("set", "db.port", "5432"), {"mark": n, "host": "db1", "port": 5432},
                  "db.port"),
                 (("del", "db.mark"), {"host": "db1", "port": 5432}, "db.mark"),
                 (("del", "db"), None, "db")]
        expected = []
        for args, value, key in steps:
            r = cli(a, "config", *args)
            assert r.returncode == 0, r.stderr
            event = {"path": "db", "value": value, "deleted": value is None,
                     "changed_key": key}
            expected.append(event)
            lines.wait(lambda x, e=event: json.loads(x) == e, 10, f"{event} on b")
        assert [json.loads(x) for x in lines.lines[start:]] == expected
    finally:
        watch.terminate()
        watch.wait(5)
    # `del db` removed what was below it on every node
    for d in (a, b):
        for path in ("db", "db.host", "db.port"):
            r = cli(d, "config", "get", path)
            assert (r.returncode, r.stderr.strip()) == (
                1, f"404 not found: no config at {path!r} in namespace 'default'"), (d.name, path)
    r = cli(a, "config", "del", "db")
    assert (r.returncode, r.stderr.strip()) == (
        1, "404 not found: no config at 'db' in namespace 'default'")
    # a path set after the delete comes back alone
    assert cli(a, "config", "set", "db.port", "6543").returncode == 0
    wait_for(lambda: json.loads(cli(b, "config", "get", "db", "--json").stdout or "null")
             == {"port": 6543}, 10, "db = {port: 6543} on b")


def test_sdk_store_watch_delete_and_set_remove_across_nodes(cluster):
    """README: Store(...).delete / remove / watch; `meshd store watch` prints each change."""
    a, b, _ = three(cluster)
    cli_watch = subprocess.Popen([sys.executable, "-m", "meshd_cli", "store", "watch", "--prefix",
                                  "cart:", "--json", "--data-dir", str(b.data_dir)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(cli_watch.stdout)
    seen: list = []

    async def go():
        sa, sb = Store(addr=a.data_dir / "meshd.sock"), Store(addr=b.data_dir / "meshd.sock")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_into, sb.watch(prefix="cart:"), seen)
            marks = iter(range(1, 1000))

            async def mark() -> None:
                await sa.write("cart:0", f"mark {next(marks)}")

            # write a marker until both watches (SDK and CLI) show one: both are live
            await until_seen(seen, lambda e: e["key"] == "cart:0", 15, "the SDK watch live",
                             mark)
            await wait_for_async(_async(lambda: any('"cart:0"' in x for x in lines.lines),
                                        mark), 15, "`store watch` live")
            start = len(seen)
            await sa.write("other:1", b"not under the prefix")
            await sa.write("cart:1", b"two apples", metadata={"by": "ada"})
            await until_seen(seen, lambda e: e["key"] == "cart:1", 10, "cart:1 on b")
            await sb.delete("cart:1")  # SDK delete on b
            await until_seen(seen, lambda e: e["key"] == "cart:1" and e["deleted"], 10,
                             "cart:1 deleted")
            async def gone_on_a() -> bool:
                return await sa.get("cart:1") is None

            await wait_for_async(gone_on_a, 10, "the delete replicated to a")
            with pytest.raises(MeshError) as info:
                await sa.delete("cart:1")
            assert (info.value.status, info.value.detail) == (
                404, "no key 'cart:1' in default/store")
            # sets: add on a, remove on b, both see the same members
            assert await sa.add("cart:tags", "x") == ["x"]
            assert await sa.add("cart:tags", "y") == ["x", "y"]

            async def both_on_b() -> bool:
                return await sb.members("cart:tags") == ["x", "y"]

            await wait_for_async(both_on_b, 10, "{x, y} on b")
            assert await sb.remove("cart:tags", "x") == ["y"]

            async def removed_on_a() -> bool:
                return await sa.members("cart:tags") == ["y"]

            await wait_for_async(removed_on_a, 10, "x removed on a")
            assert await sb.remove("cart:tags", "x") == ["y"]  # removing it again: no change
            nursery.cancel_scope.cancel()
        await sa.aclose()
        await sb.aclose()
        return start

    try:
        start = trio.run(go)
        wait_for(lambda: any('"cart:tags"' in x for x in lines.lines), 10,
                 "the set changes in `store watch`")
    finally:
        cli_watch.terminate()
        cli_watch.wait(5)
    mine = [e for e in seen[start:] if e["key"] != "cart:0"]  # markers may still trickle in
    events = [(e["key"], e["origin"], e["deleted"]) for e in mine]
    assert events[:2] == [("cart:1", "replica", False), ("cart:1", "local", True)]
    assert all(k != "other:1" for k, _, _ in events), "a key outside the prefix was watched"
    assert mine[0]["record"]["value"] == b"two apples"
    assert mine[0]["record"]["metadata"] == {"by": "ada"}
    assert ("cart:tags", "local", False) in events  # b's own remove
    printed = [json.loads(x) for x in lines.lines]
    cart1 = [(e["origin"], e["deleted"], e["record"].get("value")) for e in printed
             if e["key"] == "cart:1"]
    assert cart1 == [("replica", False, "two apples"), ("local", True, None)]
    assert not any(e["key"] == "other:1" for e in printed)
    assert all((e["database"], e["table"]) == ("default", "store") for e in printed)


def _async(fn, before=None):
    """An async check from a plain one (and an optional async nudge before it)."""
    async def check() -> bool:
        if before is not None:
            await before()
        return fn()
    return check


def test_bad_input(cluster):
    a = cluster.add("a", env=FAST)
    r = cli(a, "store", "read", "x", "--database", "nodb")
    assert r.returncode == 1 and r.stderr.strip() == "404 not found: no database 'nodb'"
    assert cli(a, "store", "write", "k", "v").returncode == 0
    r = cli(a, "store", "read", "x", "--table", "notable")
    assert r.stderr.strip() == "404 not found: database 'default' has no table 'notable'"
    r = cli(a, "store", "write", "big", "-", stdin="x" * (2 << 20))
    assert r.returncode == 1 and "exceeds the limit of 1048576 bytes" in r.stderr
    r = cli(a, "config", "set", "db.host", "{oops")
    assert r.returncode == 1 and "line 1 column 2" in r.stderr
    r = cli(a, "config", "get", "missing.path")
    assert r.returncode == 1 and r.stderr.startswith("404")


@pytest.mark.parametrize("content", ["garbage", "foreign-sqlite"])
def test_corrupt_or_foreign_store_file_refuses_to_start(cluster, content):
    d = Daemon(cluster.root, "bad", cluster.secret)
    d.data_dir.mkdir(parents=True)
    path = d.data_dir / "store.db"
    if content == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE mine (x)")
        conn.commit()
        conn.close()
    before = path.read_bytes()
    d.start(wait=False)
    d.proc.wait(10)
    err = d.log.read_text()
    assert d.proc.returncode == 1
    assert str(path) in err and "will not overwrite" in err
    assert path.read_bytes() == before


def test_export_import_round_trip(cluster, tmp_path):
    a = cluster.add("a", env=FAST)
    for i in range(5):
        assert cli(a, "store", "write", f"k{i}", f"v{i}", "--table", "t1").returncode == 0
    assert cli(a, "store", "counter", "c", "4", "--table", "t1").returncode == 0
    dump = cli(a, "store", "export", "--table", "t1").stdout
    assert len(dump.strip().splitlines()) == 6
    r = cli(a, "store", "import", "--table", "t2", stdin=dump)
    assert r.returncode == 0, r.stderr
    again = cli(a, "store", "export", "--table", "t2").stdout
    assert sorted(dump.splitlines()) == sorted(again.splitlines())
    bad = cli(a, "store", "import", "--table", "t3", stdin="not json\n")
    assert bad.returncode == 1 and "line 1" in bad.stderr


def test_config_history_and_keys_by_substring(cluster):
    """`meshd config history` lists every change at, above and below a path, newest first,
    with who made it, on every node (the history replicates like the tree); a change to a
    path a rule keeps from the caller is left out. `meshd store list --contains` finds keys
    by a substring."""
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3, 15, "auth on b")
    for args in (("set", "db.host", '"db1"'), ("set", "db.port", "5432"),
                 ("set", "db.host", '"db2"'), ("del", "db.port"), ("set", "web.port", "80")):
        out = cli(a, "config", *args)
        assert out.returncode == 0, out.stderr

    def history(d, path=""):
        out = cli(d, "config", "history", path, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    wait_for(lambda: len(history(b)) == 5, 10, "the history on b")
    rows = history(b, "db")
    assert [(r["path"], r["value"], r["deleted"]) for r in rows] == [
        ("db.port", None, True), ("db.host", "db2", False), ("db.port", 5432, False),
        ("db.host", "db1", False)]
    assert all(r["by"] == "admin" and r["node"] == "a" for r in rows), rows  # its token
    assert [r["path"] for r in history(b, "db.host")] == ["db.host", "db.host"]
    table = cli(b, "config", "history", "db.host")
    assert table.returncode == 0 and "db2" in table.stdout and "WHEN" in table.stdout
    # a reader whose rules deny db.* sees the rest of the history only
    control(a.data_dir, "auth.rules.create", id="no-db", resource="config:default:db.*",
            scope="ops", access="denied", priority=30)
    control(a.data_dir, "auth.rules.create", id="ops-config", resource="config:default:*",
            scope="ops", access="granted", priority=20)
    control(a.data_dir, "auth.accounts.create", id="olga", secret="olga-secret-1",
            scopes=["ops"])
    token = control(a.data_dir, "auth.token.create", account="olga", ttl=600)["token"]
    env = {**os.environ, "MESHD_TOKEN": token}
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "config", "history", "--json",
                          "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         timeout=20, env=env)
    assert out.returncode == 0, out.stderr
    assert [r["path"] for r in json.loads(out.stdout)] == ["web.port"]
    # keys by substring
    for key in ("user:ada", "user:bob", "order:bob", "order:1"):
        assert cli(a, "store", "write", key, "x").returncode == 0
    out = cli(a, "store", "list", "--contains", "bob", "--json")
    assert json.loads(out.stdout) == ["order:bob", "user:bob"]
    out = cli(a, "store", "list", "--contains", "bob", "--prefix", "user:", "--json")
    assert json.loads(out.stdout) == ["user:bob"]
    out = cli(a, "store", "list", "--contains", "zzz", "--json")
    assert json.loads(out.stdout) == []
