"""Databases on engines under failure: an engine going down and coming back, a node killed
mid-write, credentials kept out of sight, bindings refused, and `meshd store migrate` under a
concurrent write load (real PostgreSQL and Redis, real daemons)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from meshd.errors import MeshError

from .cluster import control, wait_for
from .engine_servers import postgres, redis, why_no_postgres, why_no_redis
from .test_store_backends import bound, dsn_file, meshd, two

SERVERS = {"postgres": (postgres, why_no_postgres), "redis": (redis, why_no_redis)}
BACKENDS = pytest.mark.parametrize("backend", ["postgres", "redis"])


def server_for(backend: str, root: Path):
    start, why_not = SERVERS[backend]
    if why_not() is not None:
        pytest.fail(why_not())
    return start(root / backend)


def with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    user = "postgres" if scheme.startswith("postgres") else ""
    if "@" in rest:
        user, rest = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{rest}"


def bind(node, name: str, backend: str, dsn: str, *others) -> None:
    """Bind on `node`; return once `others` serve it from the engine too."""
    out = meshd(node, "store", "databases", "create", name, "--backend", backend,
                "--dsn-file", dsn)
    assert out.returncode == 0, out.stderr
    bound((node, *others), name, backend)


@BACKENDS
def test_engine_down_is_503_with_the_cause_and_service_resumes_when_it_is_back(backend,
                                                                                 tmp_path):
    with server_for(backend, tmp_path) as server:
        c, a, b = two(tmp_path / "mesh")
        try:
            bind(a, "orders", backend, dsn_file(tmp_path, server.url), b)
            control(a.data_dir, "store.write", database="orders", key="k1", value=b"1")
            server.stop()
            started = time.monotonic()
            with pytest.raises(MeshError) as err:
                control(b.data_dir, "store.write", database="orders", key="k2", value=b"2")
            assert err.value.status == 503 and backend in err.value.detail, err.value
            assert time.monotonic() - started < 30  # bounded: never a hang
            out = meshd(a, "store", "read", "k1", "--database", "orders")
            assert out.returncode == 1 and "503" in out.stderr and "Traceback" not in out.stderr
            server.start()
            # the same daemons, not restarted: service resumes
            for node in (a, b):
                wait_for(lambda n=node: control(n.data_dir, "store.write", database="orders",
                                                key="k3", value=b"3")["value"] == b"3",
                         30, f"writes through {node.name} again")
            assert a.proc.poll() is None and b.proc.poll() is None
        finally:
            c.close()


@BACKENDS
def test_nothing_acknowledged_is_lost_when_a_node_is_killed_mid_write(backend, tmp_path):
    with server_for(backend, tmp_path) as server:
        c, a, b = two(tmp_path / "mesh")
        try:
            bind(a, "ledger", backend, dsn_file(tmp_path, server.url), b)
            acked: list[str] = []
            stop = threading.Event()

            def writer() -> None:
                n = 0
                while not stop.is_set() and n < 5000:
                    key = f"k{n:05d}"
                    try:
                        control(a.data_dir, "store.write", database="ledger", key=key,
                                value=key.encode())
                    except (MeshError, OSError):
                        return
                    except BaseException:  # the daemon vanished mid-call
                        return
                    acked.append(key)
                    n += 1

            t = threading.Thread(target=writer)
            t.start()
            wait_for(lambda: len(acked) >= 50, 30, "50 acknowledged writes")
            a.kill9()
            stop.set()
            t.join(30)
            assert len(acked) >= 50
            keys = set(control(b.data_dir, "store.list", database="ledger"))
            lost = [k for k in acked if k not in keys]
            assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:5]}"
        finally:
            c.close()


@BACKENDS
def test_the_dsn_is_never_shown_nor_logged(backend, tmp_path):
    password = "s3cret-Pw-42"
    with server_for(backend, tmp_path) as server:
        c, a, b = two(tmp_path / "mesh")
        try:
            url = with_password(server.url, password)
            if backend == "redis":  # the server must ask for it, or redis-py refuses AUTH
                import redis as redis_client

                r = redis_client.Redis.from_url(server.url)
                r.config_set("requirepass", password)
                r.close()
            bind(a, "vault", backend, dsn_file(tmp_path, url), b)
            control(b.data_dir, "store.write", database="vault", key="k", value=b"v")
            server.stop()  # errors now: their causes must not carry the password
            for node in (a, b):
                with pytest.raises(MeshError) as err:
                    control(node.data_dir, "store.read", database="vault", key="k")
                assert err.value.status == 503 and password not in str(err.value)
            server.start()
            if backend == "redis":
                wait_for(lambda: _set_password(server.url, password), 10, "password set")
            outs = [meshd(n, *args) for n in (a, b)
                    for args in (("store", "databases", "--json"), ("status", "--json"),
                                 ("logs", "--json"), ("members", "--json"))]
            assert all(password not in o.stdout + o.stderr for o in outs)
            assert all("vault" in o.stdout for o in outs[0::4])
            # the bindings' own database is refused even to the node's operator
            for args in (("store", "list", "--database", "engines", "--table", "databases"),
                         ("store", "read", "vault", "--database", "engines", "--table",
                          "databases"),
                         ("store", "export", "--database", "engines", "--table",
                          "databases")):
                out = meshd(a, *args)
                assert (out.returncode, out.stdout) == (1, ""), (args, out.stdout)
                assert out.stderr.startswith("403 forbidden: the engines database"), args
            c.close()
            for node in (a, b):
                assert password not in Path(node.log).read_text(errors="replace")
        finally:
            c.close()


def _set_password(url: str, password: str) -> bool:
    import redis as redis_client

    r = redis_client.Redis.from_url(url)
    try:
        r.config_set("requirepass", password)
        return True
    finally:
        r.close()


def test_bindings_that_cannot_work_are_refused_and_nothing_is_bound(tmp_path):
    c, a, b = two(tmp_path / "mesh")
    try:
        def create(name: str, backend: str, url: str):
            return meshd(a, "store", "databases", "create", name, "--backend", backend,
                         "--dsn-file", dsn_file(tmp_path, url))

        # nothing listens there: 503 with the cause, and no binding
        out = create("nowhere", "postgres", "postgresql://postgres@127.0.0.1:9/postgres")
        assert out.returncode == 1 and "503" in out.stderr, out.stderr
        out = create("nowhere2", "redis", "redis://127.0.0.1:9/0")
        assert out.returncode == 1 and "503" in out.stderr, out.stderr
        out = meshd(a, "store", "databases", "--json")
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert not {"nowhere", "nowhere2"} & {r["name"] for r in listed}
        # meshd's own databases stay embedded
        out = create("auth", "redis", "redis://127.0.0.1:9/0")
        assert out.returncode == 1 and "403" in out.stderr and "stays embedded" in out.stderr
        # a database with embedded data is moved with migrate, not rebound
        control(a.data_dir, "store.write", database="full", key="k", value=b"v")
        out = create("full", "redis", "redis://127.0.0.1:9/0")
        assert out.returncode == 1 and "409" in out.stderr and "migrate" in out.stderr
        # a DSN that is not one
        out = create("bad", "redis", "http://example")
        assert out.returncode == 1 and "400" in out.stderr
        # a DSN file that is missing or empty: a clear error, not a traceback
        out = meshd(a, "store", "databases", "create", "x", "--backend", "redis",
                    "--dsn-file", str(tmp_path / "missing"))
        assert out.returncode == 1 and "cannot read the DSN file" in out.stderr
        (tmp_path / "empty").write_text("")
        out = meshd(a, "store", "databases", "create", "x", "--backend", "redis",
                    "--dsn-file", str(tmp_path / "empty"))
        assert out.returncode == 1 and "must hold one line" in out.stderr
        assert all("Traceback" not in o for o in (out.stderr,))
        # node b holds no issuer key: its operator is no admin of the cluster (bindings are
        # records signed by a signer; a member cannot make one)
        out = meshd(b, "store", "databases", "create", "x", "--backend", "redis",
                    "--dsn-file", dsn_file(tmp_path, "redis://127.0.0.1:9/0"))
        assert out.returncode == 1 and out.stderr.startswith("403") \
            and "holds no issuer key" in out.stderr, out.stderr
    finally:
        c.close()


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_migrate_under_a_concurrent_write_load_loses_nothing(backend, tmp_path):
    with server_for(backend, tmp_path) as server:
        c, a, b = two(tmp_path / "mesh")
        try:
            for i in range(300):
                control(a.data_dir, "store.write", database="orders", table="t",
                        key=f"old{i:03d}", value=b"old")
            control(a.data_dir, "store.counter", database="orders", table="t", key="hits",
                    delta=100)
            control(a.data_dir, "store.set", database="orders", table="t", key="tags",
                    op="add", member="before")
            wait_for(lambda: len(control(b.data_dir, "store.list", database="orders",
                                         table="t")) == 302, 20, "b has the data")
            last: dict[str, bytes] = {}
            hits = {"n": 100}
            lock = threading.Lock()
            stop = threading.Event()

            def load(node, name: str) -> None:
                n = 0
                while not stop.is_set() and n < 3000:
                    key, value = f"{name}{n % 50:02d}", f"{name}-{n}".encode()
                    try:
                        control(node.data_dir, "store.write", database="orders", table="t",
                                key=key, value=value)
                        control(node.data_dir, "store.counter", database="orders",
                                table="t", key="hits", delta=1)
                    except MeshError as exc:  # nothing may fail during a migration
                        raise AssertionError(f"{name}: {exc}") from exc
                    with lock:
                        last[key] = value
                        hits["n"] += 1
                    n += 1

            errors: list[BaseException] = []

            def run(node, name):
                try:
                    load(node, name)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(n, name))
                       for n, name in ((a, "a"), (b, "b"))]
            for t in threads:
                t.start()
            time.sleep(1)
            out = meshd(a, "store", "migrate", "orders", "--to", backend, "--dsn-file",
                        dsn_file(tmp_path, server.url), "--grace", "3", "--json",
                        timeout=180)
            time.sleep(1)  # writes go on after the switch, now on the engine
            stop.set()
            for t in threads:
                t.join(60)
            assert out.returncode == 0, out.stderr
            assert not errors, errors
            done = json.loads(out.stdout.splitlines()[-1])
            assert done["phase"] == "done" and done["backend"] == backend
            rows = {r["name"]: r["backend"] for r in json.loads(
                meshd(b, "store", "databases", "--json").stdout)}
            assert rows["orders"] == backend
            for node in (a, b):
                recs = {r["key"]: r for r in control(node.data_dir, "store.read",
                                                     database="orders", table="t",
                                                     prefix="")}
                assert sum(k.startswith("old") for k in recs) == 300
                wrong = {k: (recs.get(k, {}).get("value"), v) for k, v in last.items()
                         if recs.get(k, {}).get("value") != v}
                assert not wrong, f"{len(wrong)} writes lost: {list(wrong.items())[:3]}"
                assert recs["hits"]["counter"] == hits["n"]
                assert recs["tags"]["members"] == ["before"]
            assert len(last) == 100 and hits["n"] > 100
        finally:
            c.close()
