"""One store suite over every backend: embedded, PostgreSQL and Redis (real servers from
engine_servers.py, real daemons), through two nodes.

A database on an engine is created with `meshd store databases create shop --backend B
--dsn-file F` on node a; every operation then behaves as on the embedded store, through
either node. Reads on the other node are waited for (the embedded store replicates; an
engine answers at once), so the same assertions hold for all three.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshd.errors import MeshError

from .cluster import Cluster, Daemon, control, wait_for
from .engine_servers import EngineServer, postgres, redis, why_no_postgres, why_no_redis

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1"}
DB = "shop"


@dataclass
class Mesh:
    backend: str
    a: Daemon
    b: Daemon
    server: EngineServer | None

    def call(self, node: Daemon, name: str, /, **args):
        return control(node.data_dir, name, database=DB, **args)


def meshd(node: Daemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd_cli", *args, "--data-dir",
                           str(node.data_dir)], capture_output=True, text=True,
                          timeout=timeout)


def dsn_file(root: Path, url: str) -> str:
    path = root / "dsn"
    path.write_text(url + "\n")
    path.chmod(0o600)
    return str(path)


def two(root: Path) -> tuple[Cluster, Daemon, Daemon]:
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster(root)
    a = c.add("a", env=FAST)
    b = c.add("b", join=[a.addr], env=FAST)
    c.wait_converged(30)
    return c, a, b


SERVERS = {"postgres": (postgres, why_no_postgres), "redis": (redis, why_no_redis)}


def bound(nodes: tuple[Daemon, ...], name: str, backend: str) -> None:
    """Wait until every node in `nodes` serves `name` from `backend`: the binding reaches
    other nodes by replication, and a write before that lands in the embedded store."""
    def seen(node: Daemon) -> bool:
        return any(r.get("name") == name and r.get("backend") == backend
                   for r in control(node.data_dir, "store.databases", detail=True))
    wait_for(lambda: all(seen(n) for n in nodes), 30, f"{name} bound to {backend} everywhere")


@pytest.fixture(scope="module", params=["embedded", "postgres", "redis"])
def mesh(request, tmp_path_factory) -> Iterator[Mesh]:
    backend = request.param
    root = tmp_path_factory.mktemp(backend)
    if backend == "embedded":
        c, a, b = two(root / "mesh")
        try:
            yield Mesh(backend, a, b, None)
        finally:
            c.close()
        return
    start, why_not = SERVERS[backend]
    if why_not() is not None:
        pytest.fail(why_not())
    with start(root / backend) as server:
        c, a, b = two(root / "mesh")
        try:
            out = meshd(a, "store", "databases", "create", DB, "--backend", backend,
                        "--dsn-file", dsn_file(root, server.url))
            assert out.returncode == 0, out.stderr
            bound((a, b), DB, backend)
            yield Mesh(backend, a, b, server)
        finally:
            c.close()


def read(m: Mesh, node: Daemon, key: str, table: str = "store"):
    """The record of `key` on `node`, or None (a 404)."""
    try:
        return m.call(node, "store.read", table=table, key=key)[0]
    except MeshError as exc:
        if exc.status == 404:
            return None
        raise


def test_the_listing_shows_each_database_with_its_backend(mesh):
    mesh.call(mesh.a, "store.write", table="t0", key="k", value=b"v")
    want = {"name": DB, "backend": mesh.backend}
    for node in (mesh.a, mesh.b):
        wait_for(lambda n=node: want in json.loads(
            meshd(n, "store", "databases", "--json").stdout), 10, "the listing")
    assert DB in control(mesh.b.data_dir, "store.databases")
    wait_for(lambda: "t0" in mesh.call(mesh.b, "store.tables"), 10, "table t0 on b")


def test_write_on_one_node_reads_the_same_record_on_the_other(mesh):
    wrote = mesh.call(mesh.a, "store.write", table="t1", key="greeting", value=b"hello",
                      metadata={"lang": "en"})
    assert wrote["value"] == b"hello" and wrote["written_by"] == "a"
    wait_for(lambda: read(mesh, mesh.b, "greeting", "t1") is not None, 10, "greeting on b")
    rec = read(mesh, mesh.b, "greeting", "t1")
    assert rec["value"] == b"hello" and rec["metadata"] == {"lang": "en"}
    assert rec["written_by"] == "a" and rec["version"] == wrote["version"]
    mesh.call(mesh.b, "store.write", table="t1", key="greeting", value=b"hi")
    wait_for(lambda: read(mesh, mesh.a, "greeting", "t1")["value"] == b"hi", 10, "hi on a")
    assert read(mesh, mesh.a, "greeting", "t1")["written_by"] == "b"
    # the CLI reads it the same way
    out = meshd(mesh.a, "store", "read", "greeting", "--database", DB, "--table", "t1",
                "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["value"] == "hi", out.stderr


def test_delete_removes_value_counter_and_set_and_a_second_delete_is_404(mesh):
    mesh.call(mesh.a, "store.write", table="t2", key="gone", value=b"x")
    mesh.call(mesh.a, "store.counter", table="t2", key="gone", delta=3)
    mesh.call(mesh.a, "store.set", table="t2", key="gone", op="add", member="m")
    assert mesh.call(mesh.a, "store.delete", table="t2", key="gone") == {"deleted": "gone"}
    assert read(mesh, mesh.a, "gone", "t2") is None
    wait_for(lambda: read(mesh, mesh.b, "gone", "t2") is None, 10, "gone on b")
    with pytest.raises(MeshError) as err:
        mesh.call(mesh.b, "store.delete", table="t2", key="gone")
    assert err.value.status == 404
    assert mesh.call(mesh.a, "store.counter", table="t2", key="gone")["counter"] == 0
    assert mesh.call(mesh.a, "store.set", table="t2", key="gone", op="members")["members"] \
        == []


def test_prefix_suffix_contains_limit_and_offset(mesh):
    keys = ["user/1", "user/2", "user/10", "order/1", "user/3x", "us"]
    for k in keys:
        mesh.call(mesh.a, "store.write", table="t3", key=k, value=k.encode())
    want = sorted(k for k in keys if k.startswith("user/"))
    wait_for(lambda: mesh.call(mesh.b, "store.list", table="t3", prefix="user/") == want,
             10, "the listing on b")
    assert mesh.call(mesh.b, "store.list", table="t3", prefix="user/", limit=2) == want[:2]
    assert mesh.call(mesh.b, "store.list", table="t3", prefix="user/", offset=1,
                     limit=2) == want[1:3]
    assert mesh.call(mesh.b, "store.list", table="t3", suffix="/1") == ["order/1", "user/1"]
    assert mesh.call(mesh.b, "store.list", table="t3", contains="3") == ["user/3x"]
    rows = mesh.call(mesh.b, "store.read", table="t3", prefix="user/1")
    assert [(r["key"], r["value"]) for r in rows] == [("user/1", b"user/1"),
                                                      ("user/10", b"user/10")]
    # odd keys are keys like any other
    odd = "a:b*c[d]%_\\é/😀"
    mesh.call(mesh.a, "store.write", table="t3", key=odd, value=b"odd")
    wait_for(lambda: read(mesh, mesh.b, odd, "t3") is not None, 10, "odd key on b")
    assert mesh.call(mesh.b, "store.list", table="t3", prefix="a:b*") == [odd]


def test_a_record_with_a_ttl_expires(mesh):
    mesh.call(mesh.a, "store.write", table="t4", key="short", value=b"s", ttl=1.0)
    mesh.call(mesh.a, "store.write", table="t4", key="long", value=b"l", ttl=600)
    rec = read(mesh, mesh.a, "short", "t4")
    assert rec is not None and rec["expiry"] is not None
    wait_for(lambda: read(mesh, mesh.b, "short", "t4") is None
             and read(mesh, mesh.b, "long", "t4") is not None, 15, "short expired on b")
    assert mesh.call(mesh.a, "store.list", table="t4") == ["long"]


def test_counters_from_both_nodes_add_up_exactly(mesh):
    def bump(node: Daemon, n: int) -> None:
        for _ in range(n):
            mesh.call(node, "store.counter", table="t5", key="hits", delta=1)

    threads = [threading.Thread(target=bump, args=(node, 25)) for node in (mesh.a, mesh.b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    mesh.call(mesh.a, "store.counter", table="t5", key="hits", delta=-7)
    for node in (mesh.a, mesh.b):
        wait_for(lambda n=node: mesh.call(n, "store.counter", table="t5",
                                          key="hits")["counter"] == 43, 15, "43 hits")
    assert read(mesh, mesh.b, "hits", "t5")["counter"] == 43


def test_set_members_added_and_removed_through_both_nodes(mesh):
    def members(node: Daemon) -> list[str]:
        return mesh.call(node, "store.set", table="t6", key="tags", op="members")["members"]

    assert mesh.call(mesh.a, "store.set", table="t6", key="tags", op="add",
                     member="red")["members"] == ["red"]
    mesh.call(mesh.b, "store.set", table="t6", key="tags", op="add", member="blue")
    wait_for(lambda: members(mesh.a) == ["blue", "red"], 10, "both on a")
    mesh.call(mesh.a, "store.set", table="t6", key="tags", op="remove", member="red")
    wait_for(lambda: members(mesh.b) == ["blue"], 10, "red removed on b")
    with pytest.raises(MeshError) as err:
        mesh.call(mesh.a, "store.set", table="t6", key="tags", op="add", member="")
    assert err.value.status == 400


def test_a_watch_on_one_node_sees_writes_and_deletes_made_through_the_other(mesh):
    proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", "store", "watch", "--database",
                             DB, "--table", "t7", "--prefix", "w/", "--json", "--data-dir",
                             str(mesh.b.data_dir)], stdout=subprocess.PIPE, text=True)
    try:
        seen: list[dict] = []

        def reader() -> None:
            assert proc.stdout is not None
            for text in proc.stdout:
                seen.append(json.loads(text))

        threading.Thread(target=reader, daemon=True).start()

        def wrote() -> bool:  # written until the watch (started asynchronously) sees it
            mesh.call(mesh.a, "store.write", table="t7", key="w/1", value=b"one")
            return any(e["key"] == "w/1" and not e["deleted"] for e in seen)
        wait_for(wrote, 20, "the watch sees w/1")
        mesh.call(mesh.a, "store.write", table="t7", key="other", value=b"not watched")
        mesh.call(mesh.a, "store.delete", table="t7", key="w/1")
        wait_for(lambda: any(e["key"] == "w/1" and e["deleted"] for e in seen), 10,
                 "the delete")
        first = next(e for e in seen if e["key"] == "w/1")
        assert first["database"] == DB and first["table"] == "t7"
        assert first["origin"] == "replica" and first["record"]["value"] == "one"
        assert all(e["key"].startswith("w/") for e in seen)
    finally:
        proc.terminate()
        proc.wait(10)
