"""Attack suite, issue 21: databases on PostgreSQL/Redis and durable topics on NATS JetStream.

What is attacked (ARCHITECTURE.md §9: a member acts as a node, never as admin nor as
another node; credentials are never logged; nothing from outside or a member may crash a
node; every wait is bounded):
- who may bind a database to an engine, or reach the `engines` database (it holds DSNs):
  clients with non-admin tokens, and a member gossiping a binding record;
- hostile engines and other clients of an engine: junk on the Postgres NOTIFY channel and
  the Redis change channel, junk in Redis hashes, a malformed DSN, a malformed topic
  definition gossiped by a member;
- engines that accept TCP and never answer, or stall in the middle of a session;
- credentials in logs when a DSN is malformed.

Tests marked `xfail(strict=True, raises=AssertionError)` state the correct behaviour and fail
today (each names the finding): they turn into a failing XPASS once the protection exists,
and the marker is then removed. Real daemons; real PostgreSQL, Redis and nats-server from
engine_servers.py (skipped with the reason when one is not installed).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd.secure.keyring import parse_secret

from .attacks import RoguePeer
from .cluster import (
    Cluster,
    Daemon,
    LoopbackServer,
    control,
    control_stream,
    free_port,
    wait_for,
    wait_for_async,
)
from .engine_servers import nats, postgres, redis, why_no_nats, why_no_postgres, why_no_redis
from .test_store_backends import dsn_file, meshd

FAST = {"MESHD_STORE_SYNC_INTERVAL": "1", "MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1"}
NEEDS_PG = pytest.mark.skipif(why_no_postgres() is not None, reason=why_no_postgres() or "")
NEEDS_REDIS = pytest.mark.skipif(why_no_redis() is not None, reason=why_no_redis() or "")
NEEDS_NATS = pytest.mark.skipif(why_no_nats() is not None, reason=why_no_nats() or "")
NOWHERE = {"postgres": "postgresql://postgres@127.0.0.1:9/postgres",
           "redis": "redis://127.0.0.1:9/0"}
BOUND = 30.0  # seconds within which an engine that does not answer must be a 503


# --- helpers -----------------------------------------------------------------------------------


def one(root: Path) -> tuple[Cluster, Daemon]:
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster(root)
    return c, c.add("a", env=FAST)


class SetupFailed(RuntimeError):
    """The attack could not be set up: never mistaken for the failure an xfail expects
    (those are AssertionErrors)."""


def setup(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except AssertionError as exc:
        raise SetupFailed(str(exc)) from None


def bind(node: Daemon, root: Path, name: str, backend: str, dsn: str) -> None:
    out = meshd(node, "store", "databases", "create", name, "--backend", backend,
                "--dsn-file", dsn_file(root, dsn))
    if out.returncode != 0:
        raise SetupFailed(f"binding {name} to {backend} failed: {out.stderr}")


def as_token(node: Daemon, token: str | None, op: str, /, remote: bool = False,
             **args: Any) -> Any:
    """`op` with `token` as the request's token (control(..., token=) would send it as an
    argument, which no op reads)."""
    async def go() -> Any:
        client = ControlClient(node.data_dir / "meshd.sock", token=token, remote=remote)
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()
    return trio.run(go)


def status_of(node: Daemon, token: str | None, op: str, /, remote: bool = False,
              **args: Any) -> int:
    try:
        as_token(node, token, op, remote, **args)
    except MeshError as exc:
        return exc.status
    return 200


def serving(node: Daemon) -> None:
    """The daemon is up and answers (a crash shows the end of its log)."""
    assert node.proc.poll() is None, f"{node.name} died:\n{node.log_tail(3000)}"
    assert control(node.data_dir, "status")["name"] == node.name


def survives(node: Daemon, attack: Callable[[], Any]) -> None:
    """Run `attack` (which talks to `node`); the node losing its control socket on the way
    is the failure looked for, said as one (an AssertionError with the end of its log)."""
    try:
        attack()
    except (MeshError, OSError, AssertionError) as exc:  # (a stream that ended: asserted)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(15)  # a node on its way down answers its last calls with errors
        if node.proc.poll() is not None:
            raise AssertionError(f"{node.name} died during the attack ({exc}):\n"
                                 f"{node.log_tail(3000)}") from None
        raise
    serving(node)


def backends(node: Daemon) -> dict[str, str]:
    return {r["name"]: r["backend"]
            for r in control(node.data_dir, "store.databases", detail=True)}


async def gossip(c: Cluster, node: Daemon, entries: list[list[Any]]) -> None:
    """Join as a rogue member (the cluster secret, an identity of its own) and push store
    records to `node` as replication does."""
    rogue = RoguePeer(parse_secret(c.secret), claim=f"127.0.0.1:{free_port()}")
    await rogue.connect(node.addr)
    if not await rogue.join("rogue"):
        raise SetupFailed("the rogue could not join (a holder of the secret is a member)")
    cid = await rogue.open("store")
    await rogue.send(cid, cbor2.dumps({"t": "batch", "e": entries, "fwd": True}))
    await trio.sleep(0.5)
    await rogue.aclose()


def lww(value: bytes, ahead_ms: int = 0) -> dict[str, Any]:
    return {"lww": [[int(time.time() * 1000) + ahead_ms, 0, "rogue"], value, {}, None]}


def timed(fn: Callable[[], Any], bound: float) -> tuple[Any, float]:
    """(what `fn` returned or raised, seconds it took); ("hung", bound) if it did not
    return within `bound` seconds (its thread is left behind; the daemon's end frees it)."""
    box: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)
        box.append(time.monotonic() - started)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    return (box[0], box[1]) if len(box) == 2 else ("hung", bound)


class Silent(LoopbackServer):
    """Accepts TCP connections and never says a word (nor closes them)."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)


class Freezer:
    """A TCP proxy on loopback to `port`; once frozen it passes nothing more either way and
    keeps every connection open (an engine that stalls mid-session: a hung server, a
    network that drops packets)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.frozen = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if not self.frozen.is_set():
                threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):  # (ValueError: closed by close())
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.held.append(up)
            while True:
                ready, _, _ = select.select([conn, up], [], [], 0.1)
                if self.frozen.is_set():
                    time.sleep(0.1)
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (up if s is conn else conn).sendall(data)

    def close(self) -> None:
        self.sock.close()
        for s in self.held:
            with contextlib.suppress(OSError):
                s.close()


# --- 1. who may bind, and who may reach the engines database -----------------------------------


def test_non_admin_tokens_cannot_bind_migrate_or_reach_the_engines_database(tmp_path):
    """Service-scope and user tokens (the default rules grant services *:*:*) are refused
    binding, migrating and every store op on the engines database; a remote caller without a
    token is a 401. Refused before the engine is reached (403, not a 503 from the probe),
    and nothing is bound."""
    c, a = one(tmp_path / "mesh")
    try:
        control(a.data_dir, "auth.accounts.create", id="svc", secret="svc-secret-1234",
                scopes=["service"])
        control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1234",
                scopes=["ops"])
        control(a.data_dir, "auth.rules.create", id="ops-store", resource="store:*:*",
                scope="ops", access="granted", priority=20)
        tokens = [control(a.data_dir, "auth.token.create", account=acc, ttl=600)["token"]
                  for acc in ("svc", "ops")]
        control(a.data_dir, "store.write", database="orders", key="k", value=b"v")
        engines = {"database": "engines", "table": "databases"}
        attempts = [
            ("store.databases.create", {"database": "fresh", "backend": "redis",
                                        "dsn": NOWHERE["redis"]}),
            ("store.databases.create", {"database": "fresh", "backend": "postgres",
                                        "dsn": NOWHERE["postgres"], "namespace": "team"}),
            ("store.write", {**engines, "key": "orders", "value": json.dumps(
                {"backend": "redis", "dsn": NOWHERE["redis"], "state": "active"}).encode()}),
            ("store.read", {**engines, "key": "orders"}),
            ("store.read", engines),
            ("store.list", engines),
            ("store.delete", {**engines, "key": "orders"}),
            ("store.counter", {**engines, "key": "orders", "delta": 1}),
            ("store.set", {**engines, "key": "orders", "op": "add", "member": "x"}),
            # a durable topic on an outside NATS server sends its messages there: admins
            # only, though services hold topic:*:admin by the default rules
            ("broker.topics.create", {"topic": "orders.paid", "durable": True,
                                      "backend": "nats", "url": "nats://127.0.0.1:9"}),
        ]
        for token in tokens:
            for op, args in attempts:
                assert status_of(a, token, op, **args) == 403, (op, args)
                assert status_of(a, token, op, remote=True, **args) == 403, (op, args)
                assert status_of(a, None, op, remote=True, **args) == 401, (op, args)

        async def streams(token: str) -> list[Any]:
            """Each stream op's outcome: a stream answers "streaming" first, so a refusal
            comes as the stream's error, before any event."""
            got: list[Any] = []
            for op, args in (("store.migrate", {"database": "orders", "to": "redis",
                                                "dsn": NOWHERE["redis"]}),
                             ("store.watch", engines)):
                client = ControlClient(a.data_dir / "meshd.sock", token=token)
                try:
                    with trio.fail_after(10):
                        async for ev in client.stream(op, **args):
                            got.append(("event", ev))
                            break
                except MeshError as exc:
                    got.append(exc.status)
                finally:
                    await client.aclose()
            return got

        for token in tokens:
            assert trio.run(streams, token) == [403, 403]
        assert backends(a) == {"orders": "embedded"}
        assert control(a.data_dir, "broker.topics")["durable"] == []
        serving(a)
    finally:
        c.close()


def test_a_member_cannot_bind_databases_by_gossiping_engines_records(tmp_path):
    """Binding is an admin act; a member acts as a node. A rogue member pushes bindings
    (an existing embedded database with data, and a new one) to a server of its own; every
    node must go on serving both from the embedded store."""
    c, a = one(tmp_path / "mesh")
    try:
        control(a.data_dir, "store.write", database="orders", key="old", value=b"kept")
        evil = json.dumps({"backend": "redis", "dsn": "redis://127.0.0.1:9/0",
                           "state": "active", "by": "admin", "at": time.time()}).encode()
        trio.run(gossip, c, a, [["engines", "databases", "orders", lww(evil)],
                                ["engines", "databases", "payments", lww(evil)],
                                ["rogueprobe", "store", "k", lww(b"1")]])
        # the batch was taken (a member may write user data as a node): the probe is there
        setup(wait_for, lambda: control(a.data_dir, "store.read", database="rogueprobe",
                                        key="k"), 15, "the rogue's batch merged")
        assert backends(a).get("orders") == "embedded", backends(a)
        assert "payments" not in backends(a) or backends(a)["payments"] == "embedded"
        rec = control(a.data_dir, "store.read", database="orders", key="old")
        assert rec[0]["value"] == b"kept"
        control(a.data_dir, "store.write", database="payments", key="card", value=b"4111")
        serving(a)
    finally:
        c.close()


# --- 2. hostile engines and other clients of them ------------------------------------------------


def _pg_notify(url: str, payload: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify('meshd_kv', %s)", (payload,))


PG_JUNK = {
    # json.loads raises RecursionError (not ValueError) in postgres.py heard()
    "deep": "[" * 3000,
    # wanted() calls key.startswith on a number when a watch of every database is open
    "not-text": json.dumps([1, 2, 3, False, "meshd:x"]),
    # _app_node() calls .startswith on a number
    "app-not-text": json.dumps(["orders", "store", "k", False, 5]),
}


@NEEDS_PG
@pytest.mark.parametrize("junk", sorted(PG_JUNK))
def test_junk_on_the_postgres_notify_channel_does_not_crash_the_node(junk, tmp_path):
    with postgres(tmp_path / "pg") as server:
        c, a = one(tmp_path / "mesh")
        try:
            bind(a, tmp_path, "orders", "postgres", server.url)
            control(a.data_dir, "store.write", database="orders", key="k", value=b"v")

            async def attack() -> None:
                async with control_stream(a.data_dir, "store.watch") as events:
                    await trio.to_thread.run_sync(_pg_notify, server.url, PG_JUNK[junk])
                    # notifications arrive in order: a change after the junk proves the
                    # listener went past it
                    await trio.to_thread.run_sync(lambda: control(
                        a.data_dir, "store.write", database="orders", key="after",
                        value=b"1"))
                    await events.next(lambda ev: ev.get("key") == "after", 15,
                                      "the change after the junk")
            survives(a, lambda: trio.run(attack))
            assert control(a.data_dir, "store.read", database="orders", key="k")[0][
                "value"] == b"v"
        finally:
            c.close()


@NEEDS_REDIS
@pytest.mark.parametrize("junk", ["deep", "bad-version", "deep-metadata"])
def test_junk_on_the_redis_change_channel_does_not_crash_the_node(junk, tmp_path):
    import redis as redis_py

    from meshd.store.engines.redis import name

    with redis(tmp_path / "redis") as server:
        c, a = one(tmp_path / "mesh")
        try:
            bind(a, tmp_path, "orders", "redis", server.url)
            control(a.data_dir, "store.write", database="orders", key="k", value=b"v")
            r = redis_py.Redis.from_url(server.url)

            def hostile() -> None:
                if junk == "deep":
                    r.publish("meshd:changes:0", b"0" + b"[" * 3000)
                    return
                field, value = ("w", "junk") if junk == "bad-version" else ("m", "[" * 3000)
                r.hset(name("v", "orders", "store", "k"), field, value)
                r.publish("meshd:changes:0", b'0["orders","store","k","elsewhere"]')

            async def attack() -> None:
                async with control_stream(a.data_dir, "store.watch",
                                          database="orders") as events:
                    await trio.to_thread.run_sync(hostile)
                    await trio.to_thread.run_sync(lambda: control(
                        a.data_dir, "store.write", database="orders", key="after",
                        value=b"1"))
                    await events.next(lambda ev: ev.get("key") == "after", 15,
                                      "the change after the junk")
            try:
                survives(a, lambda: trio.run(attack))
            finally:
                r.close()
            # a record another client broke is an error of that read, not of the node
            with contextlib.suppress(MeshError):
                control(a.data_dir, "store.read", database="orders", key="k")
            serving(a)
        finally:
            c.close()


@NEEDS_REDIS
def test_a_redis_dsn_with_an_unknown_option_is_refused_and_the_node_stays_up(tmp_path):
    with redis(tmp_path / "redis") as server:
        c, a = one(tmp_path / "mesh")
        try:
            out = meshd(a, "store", "databases", "create", "orders", "--backend", "redis",
                        "--dsn-file", dsn_file(tmp_path, server.url + "?foo=bar"))
            assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
            assert out.stderr.startswith(("400", "503")), out.stderr
            time.sleep(2)
            serving(a)
            assert "orders" not in backends(a)
        finally:
            c.close()


# --- 3. engines that never answer --------------------------------------------------------------


@pytest.mark.parametrize("backend", [
    pytest.param("postgres", marks=NEEDS_PG), pytest.param("redis", marks=NEEDS_REDIS)])
def test_an_engine_that_accepts_and_never_answers_is_a_503_within_bounds(backend, tmp_path):
    silent = Silent()
    c, a = one(tmp_path / "mesh")
    try:
        dsn = NOWHERE[backend].replace(":9/", f":{silent.port}/")
        got, took = timed(lambda: meshd(a, "store", "databases", "create", "mute",
                                        "--backend", backend, "--dsn-file",
                                        dsn_file(tmp_path, dsn), timeout=BOUND * 2), BOUND)
        assert got != "hung" and took < BOUND, took
        assert got.returncode == 1 and got.stderr.startswith("503"), got.stderr
        assert "mute" not in backends(a)
        serving(a)
    finally:
        c.close()
        silent.sock.close()


@NEEDS_NATS
def test_a_nats_server_that_never_answers_is_a_503_within_bounds(tmp_path):
    silent = Silent()
    c, a = one(tmp_path / "mesh")
    try:
        got, took = timed(lambda: control(a.data_dir, "broker.topics.create", topic="mute",
                                          durable=True, backend="nats",
                                          url=f"nats://u:pw-S3cret@127.0.0.1:{silent.port}"),
                          BOUND)
        assert isinstance(got, MeshError) and got.status == 503 and took < BOUND, (got, took)
        assert "pw-S3cret" not in got.detail
        serving(a)
    finally:
        c.close()
        silent.sock.close()


@pytest.mark.parametrize("backend", [
    pytest.param("postgres", marks=NEEDS_PG),
    pytest.param("redis", marks=NEEDS_REDIS)])
def test_an_engine_that_stalls_mid_session_is_a_503_within_bounds(backend, tmp_path):
    start = postgres if backend == "postgres" else redis
    with start(tmp_path / backend) as server:
        proxy = Freezer(server.port)
        c, a = one(tmp_path / "mesh")
        try:
            bind(a, tmp_path, "orders", backend,
                 server.url.replace(f":{server.port}", f":{proxy.port}"))
            control(a.data_dir, "store.write", database="orders", key="k", value=b"v")
            proxy.frozen.set()
            for op, args in (("store.write", {"key": "k2", "value": b"v"}),
                             ("store.read", {"key": "k"}),
                             ("store.counter", {"key": "n", "delta": 1})):
                got, _ = timed(lambda op=op, args=args: control(
                    a.data_dir, op, database="orders", **args), BOUND)
                assert got != "hung", f"{op} still waiting after {BOUND} s"
                assert isinstance(got, MeshError) and got.status == 503, (op, got)
            serving(a)
            # the rest of the node is not held up by the stalled engine
            control(a.data_dir, "store.write", database="elsewhere", key="k", value=b"v")
        finally:
            c.close()
            proxy.close()


# --- 4. durable topics on NATS: a member's malformed definition ---------------------------------


@NEEDS_NATS
async def test_a_member_gossiping_a_malformed_nats_definition_does_not_crash_the_node(
        tmp_path):
    from meshd_sdk import Client

    root = tmp_path
    with nats(root / "nats") as server:
        (root / "mesh").mkdir()
        c = Cluster(root / "mesh")
        a = c.add("a", env=FAST)
        try:
            await trio.to_thread.run_sync(lambda: control(
                a.data_dir, "broker.topics.create", topic="js.t", durable=True,
                backend="nats", url=server.url))
            try:
                async with Client(a.data_dir / "meshd.sock").subscribe("js.t", durable="d"):
                    await trio.sleep(1)  # the node serves the consumer of d
                    bad = json.dumps({"backend": "nats", "url": 5, "durable": True,
                                      "replicas": 1, "max_deliver": 5, "ack_wait": 30}).encode()
                    await gossip(c, a, [["broker", "topics", "default/js.t", lww(bad, 1000)]])

                    async def taken() -> bool:
                        client = ControlClient(a.data_dir / "meshd.sock")
                        try:
                            rec = await client.call("store.read", database="broker",
                                                    table="topics", key="default/js.t")
                        finally:
                            await client.aclose()
                        return json.loads(rec[0]["value"]).get("url") == 5
                    try:
                        await wait_for_async(taken, 15, "the rogue's definition merged")
                    except AssertionError as exc:
                        raise SetupFailed(str(exc)) from None
                    await trio.sleep(2)  # the discoverer looks every 0.25 s
            except Exception as exc:  # the node went away under the subscription
                if a.proc.poll() is not None:
                    raise AssertionError(f"a died ({exc!r}):\n{a.log_tail(3000)}") from None
                raise
            await trio.to_thread.run_sync(serving, a)
        finally:
            await trio.to_thread.run_sync(c.close)


# --- 5. credentials in logs ---------------------------------------------------------------------


@NEEDS_PG
def test_a_malformed_dsn_password_never_reaches_the_logs(tmp_path):
    secret = "Pw%zzS3cretValue"  # a raw % in a URL: an easy mistake with real passwords
    c, a = one(tmp_path / "mesh")
    try:
        out = meshd(a, "store", "databases", "create", "x", "--backend", "postgres",
                    "--dsn-file", dsn_file(tmp_path,
                                           f"postgresql://postgres:{secret}@127.0.0.1:9/p"))
        assert out.returncode == 1 and out.stderr.startswith(("400", "503")), out.stderr
        ring = json.dumps(control(a.data_dir, "debug.logs", limit=1000), default=str)
        assert secret not in ring
        c.close()
        assert secret not in Path(a.log).read_text(errors="replace")
    finally:
        c.close()
