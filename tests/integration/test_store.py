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
from sdk import Config, Store

from .cluster import Daemon, control, wait_for

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1"}


def three(cluster):
    a = cluster.add("a", env=FAST)
    b = cluster.add("b", join=[a.addr], env=FAST)
    c = cluster.add("c", join=[a.addr], env=FAST)
    wait_for(lambda: all(len([m for m in d.members().values() if m["status"] == "alive"]) == 3
                         for d in (a, b, c)), 20, "3 alive")
    return a, b, c


def value_at(d, key, db="default", table="store"):
    try:
        return control(d.data_dir, "store.read", database=db, table=table, key=key)[0]["value"]
    except MeshError:
        return None


def cli(daemon, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "cli", *args, "--data-dir",
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
        await sa.incr("hits", 5)
        await sb.incr("hits", -2)
        await sa.add("tags", "x")
        await sb.add("tags", "y")
        await sa.write("session:1", b"s", ttl=1.0)
        await trio.sleep(0.5)
        assert await sa.incr("hits", 0) == 3 and await sb.incr("hits", 0) == 3
        assert await sa.members("tags") == ["x", "y"]
        assert await sb.get("session:1") == b"s"
        await trio.sleep(1.0)
        assert await sb.get("session:1") is None, "ttl expired everywhere"
        await sa.aclose()
        await sb.aclose()

    trio.run(kinds)
    keys = json.loads(cli(b, "store", "list", "--json").stdout)
    assert keys == ["greeting", "hits", "tags"]
    assert json.loads(cli(b, "store", "databases", "--json").stdout) == ["default"]
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


def test_config_watch_fires_on_b_when_set_on_a_with_layers(cluster, tmp_path):
    a, b, _ = three(cluster)
    seen: list = []
    cfg_file = tmp_path / "app.json"
    cfg_file.write_text(json.dumps({"db": {"pool": 10}}))

    async def go():
        cfg_b = Config("app", addr=b.data_dir / "meshd.sock", file=cfg_file,
                       env_prefix="MESHDTEST_")
        cfg_a = Config("app", addr=a.data_dir / "meshd.sock")

        async def watch():
            async for value in cfg_b.watch("db"):
                seen.append(value)
                if len(seen) == 2:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(0.5)
            await cfg_a.set("db.host", "db1")
            await trio.sleep(0.5)
            await cfg_a.set("db", {"host": "db2", "port": 5432})
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

    async def bounded():
        with trio.fail_after(20):
            await go()

    trio.run(bounded)
    assert seen[0] == {"host": "db1", "pool": 10}
    assert seen[1] == {"host": "db2", "port": 5432, "pool": 10}
    out = cli(a, "config", "get", "db", "--namespace", "app", "--json")
    assert json.loads(out.stdout) == {"host": "db2", "port": 5432}


def test_bad_input(cluster):
    a = cluster.add("a", env=FAST)
    r = cli(a, "store", "read", "x", "--database", "nodb")
    assert r.returncode == 1 and r.stderr.strip() == "404 not found: no database 'nodb'"
    cli(a, "store", "write", "k", "v")
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
        cli(a, "store", "write", f"k{i}", f"v{i}", "--table", "t1")
    cli(a, "store", "counter", "c", "4", "--table", "t1")
    dump = cli(a, "store", "export", "--table", "t1").stdout
    assert len(dump.strip().splitlines()) == 6
    r = cli(a, "store", "import", "--table", "t2", stdin=dump)
    assert r.returncode == 0, r.stderr
    again = cli(a, "store", "export", "--table", "t2").stdout
    assert sorted(dump.splitlines()) == sorted(again.splitlines())
    bad = cli(a, "store", "import", "--table", "t3", stdin="not json\n")
    assert bad.returncode == 1 and "line 1" in bad.stderr
    time.sleep(0)
