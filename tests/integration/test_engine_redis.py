"""The Redis engine against a real redis-server (meshd/store/engines/redis.py): every
operation of the Engine protocol, its data model, watches, and Redis going down and back."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from meshd.store.engines import redis as engine_mod
from meshd.store.engines.base import EngineDown, Query, live
from meshd.store.engines.redis import RedisEngine, name

from .cluster import free_port
from .engine_servers import redis, why_no_redis

pytestmark = pytest.mark.skipif(why_no_redis() is not None, reason=why_no_redis() or "")

ODD_KEYS = ["a:b", "a:b:c", "*", "[x", "ключ", "日本:*[]", "a", "é", "f"]


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with redis(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def raw(server):
    import redis as redis_client

    r = redis_client.Redis.from_url(server.url, socket_timeout=5)
    r.flushall()
    yield r
    r.close()


@pytest.fixture(params=["resp", "threads"])
async def engine(request, server, raw, nursery):
    """The engine as a node runs it ("resp": `run` running, single-key operations on the
    multiplexed connection) and before `run` started ("threads": all on redis-py)."""
    eng = RedisEngine(server.url, pool=4, timeout=5.0)
    if request.param == "resp":
        await nursery.start(eng.run, lambda *ev: None, lambda *k: False)
        assert eng._mux is not None
    try:
        yield eng
    finally:
        await eng.close()


def meshd_keys(raw) -> list[bytes]:
    return sorted(raw.scan_iter(match=b"meshd:*"))


async def test_round_trip_of_odd_keys_and_names(engine, raw):
    for i, key in enumerate(ODD_KEYS):
        rec = await engine.write("d:b", "t:*", key, f"v{i}".encode(), {"n": i, "k": key},
                                 None, (1000 + i, i), "node-a")
        assert rec == {"key": key, "value": f"v{i}".encode(), "metadata": {"n": i, "k": key},
                       "expiry": None, "written_by": "node-a", "version": [1000 + i, i]}
    for i, key in enumerate(ODD_KEYS):
        assert await engine.read("d:b", "t:*", Query(key=key), now_ms()) == [
            {"key": key, "value": f"v{i}".encode(), "metadata": {"n": i, "k": key},
             "expiry": None, "written_by": "node-a", "version": [1000 + i, i]}]
    # every key, in the embedded store's (code point) order
    assert await engine.list_keys("d:b", "t:*", Query(), now_ms()) == sorted(ODD_KEYS)
    recs = await engine.read("d:b", "t:*", Query(), now_ms())
    assert [r["key"] for r in recs] == sorted(ODD_KEYS)
    assert await engine.read("d:b", "t:*", Query(key="missing"), now_ms()) == []
    assert await engine.read("d:b", "nope", Query(), now_ms()) == []
    # names whose parts hold ':' cannot collide: (a:1, b, c) and (a, 1:b, c) are two records
    await engine.write("a:1", "b", "c", b"first", {}, None, (1, 0), "n")
    await engine.write("a", "1:b", "c", b"second", {}, None, (1, 0), "n")
    assert (await engine.read("a:1", "b", Query(key="c"), now_ms()))[0]["value"] == b"first"
    assert (await engine.read("a", "1:b", Query(key="c"), now_ms()))[0]["value"] == b"second"
    assert name("v", "a:1", "b", "c") != name("v", "a", "1:b", "c")
    assert name("v", "a:1", "b", "c") == b"meshd:v:3:a:11:b1:c"
    # overwriting replaces value, metadata and version
    rec = await engine.write("a", "1:b", "c", b"third", {"x": [1, None]}, None, (2, 3), "m")
    assert rec["value"] == b"third" and rec["metadata"] == {"x": [1, None]}
    assert rec["version"] == [2, 3] and rec["written_by"] == "m"
    # everything meshd keeps is under meshd:
    assert all(k.startswith(b"meshd:") for k in raw.keys(b"*"))
    assert await engine.tables("d:b") == ["t:*"]


async def test_ttl_expiry(engine, raw):
    exp = now_ms() + 400
    rec = await engine.write("db", "t", "k", b"v", {}, exp, (1, 0), "n")
    assert rec["expiry"] == exp
    await engine.write("db", "t", "keep", b"v", {}, None, (1, 0), "n")
    assert 0 < raw.pttl(name("v", "db", "t", "k")) <= 400  # PEXPIREAT: Redis removes it
    assert (await engine.read("db", "t", Query(key="k"), now_ms()))[0]["expiry"] == exp
    # reads filter what is expired at their now, before Redis removed it
    assert await engine.read("db", "t", Query(key="k"), exp) == []
    assert await engine.list_keys("db", "t", Query(), exp) == ["keep"]
    # a value's expiry takes neither its counter nor its members
    await engine.counter("db", "t", "k", 2, "n")
    await engine.set_change("db", "t", "k", ["m"], [], "n")
    assert await engine.read("db", "t", Query(key="k"), exp) == [
        {"key": "k", "counter": 2, "members": ["m"]}]
    await engine.write("db", "t2", "gone", b"v", {}, now_ms() + 200, (1, 0), "n")
    assert await engine.tables("db") == ["t", "t2"]
    await trio.sleep(0.45)
    assert not raw.exists(name("v", "db", "t", "k"))
    assert await engine.counter("db", "t", "k", 0, "n") == 2
    # a table holding only expired keys is no table; its index entry is removed lazily
    assert await engine.tables("db") == ["t"]
    assert raw.zcard(name("i", "db", "t2")) == 0
    assert await engine.list_keys("db", "t2", Query(), now_ms()) == []
    # a write whose expiry has passed leaves nothing
    await engine.write("db", "t3", "old", b"v", {}, now_ms() - 1, (1, 0), "n")
    assert await engine.read("db", "t3", Query(key="old"), now_ms()) == []
    assert not raw.exists(name("i", "db", "t3"))


async def test_counters(engine, raw):
    assert await engine.counter("db", "t", "c", 0, "n") == 0
    assert await engine.list_keys("db", "t", Query(), now_ms()) == []  # a read creates none
    assert await engine.counter("db", "t", "c", 5, "n") == 5
    assert await engine.counter("db", "t", "c", -7, "n") == -2
    assert await engine.counter("db", "t", "c", 0, "n") == -2
    assert await engine.read("db", "t", Query(key="c"), now_ms()) == [{"key": "c", "counter": -2}]
    assert await engine.tables("db") == ["t"]
    rec = await engine.write("db", "t", "c", b"v", {}, None, (1, 0), "n")
    assert rec["counter"] == -2  # a write returns the whole record
    async with trio.open_nursery() as nursery:  # HINCRBY is atomic: no lost increments
        for _ in range(20):
            nursery.start_soon(engine.counter, "db", "t", "c", 1, "n")
    assert await engine.counter("db", "t", "c", 0, "n") == 18
    assert await engine.delete("db", "t", "c", "n") is True
    # back at 0 a counter holds nothing: the key is gone
    assert await engine.counter("db", "t", "z", 3, "n") == 3
    assert await engine.counter("db", "t", "z", -3, "n") == 0
    assert await engine.list_keys("db", "t", Query(), now_ms()) == []
    assert await engine.tables("db") == []
    assert meshd_keys(raw) == []


async def test_sets_and_delete(engine, raw):
    assert await engine.members("db", "t", "s") == []
    assert await engine.set_change("db", "t", "s", ["b", "a", "c:*"], [], "n") == \
        ["a", "b", "c:*"]
    assert await engine.set_change("db", "t", "s", [], ["b"], "n") == ["a", "c:*"]
    # removals first: what is removed and added in one change is present after
    assert await engine.set_change("db", "t", "s", ["x"], ["x", "a"], "n") == ["c:*", "x"]
    assert await engine.members("db", "t", "s") == ["c:*", "x"]
    assert await engine.read("db", "t", Query(key="s"), now_ms()) == [
        {"key": "s", "members": ["c:*", "x"]}]
    assert await engine.set_change("db", "t", "s", [], ["c:*", "x"], "n") == []
    assert await engine.list_keys("db", "t", Query(), now_ms()) == []
    # delete removes value, counter and members, and says whether anything was there
    await engine.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
    await engine.counter("db", "t", "k", 4, "n")
    await engine.set_change("db", "t", "k", ["m"], [], "n")
    await engine.write("db", "t", "other", b"v", {}, None, (1, 0), "n")
    assert await engine.delete("db", "t", "k", "n") is True
    assert await engine.read("db", "t", Query(key="k"), now_ms()) == []
    assert await engine.counter("db", "t", "k", 0, "n") == 0
    assert await engine.members("db", "t", "k") == []
    assert await engine.delete("db", "t", "k", "n") is False
    assert await engine.list_keys("db", "t", Query(), now_ms()) == ["other"]
    assert await engine.delete("db", "t", "other", "n") is True
    assert meshd_keys(raw) == []  # nothing left behind: no index, no table entry


async def test_prefix_suffix_contains_paging(engine, monkeypatch):
    monkeypatch.setattr(engine_mod, "BATCH", 4)  # scans cross many batches
    commands: list[bytes] = []
    execute = engine._r.execute_command

    def spy(*args, **kwargs):
        commands.append(str(args[0]).upper().encode())
        return execute(*args, **kwargs)

    monkeypatch.setattr(engine._r, "execute_command", spy)
    keys = [f"k{i:02d}" for i in range(25)] + ["k1:x", "k1*", "k1[", "kä", "kä1", "k\uffff",
                                                "j", "l", "é", "éé", "ka", "k"]
    for key in keys:
        await engine.write("db", "t", key, key.encode(), {}, None, (1, 0), "n")
    # holes in the index: an expired value and a counter back at 0
    await engine.write("db", "t", "k05", b"x", {}, now_ms() - 1, (2, 0), "n")
    await engine.counter("db", "t", "k06", 1, "n")
    await engine.delete("db", "t", "k06", "n")
    alive = sorted(set(keys) - {"k05", "k06"})
    queries = [Query(), Query(prefix="k1"), Query(prefix="k"), Query(prefix="kä"),
               Query(prefix="é"), Query(prefix="zz"), Query(suffix="1"),
               Query(contains="1"), Query(prefix="k", suffix="x"),
               Query(prefix="k", limit=5), Query(prefix="k", offset=3, limit=4),
               Query(prefix="k0", offset=2), Query(contains="0", offset=1, limit=3),
               Query(offset=100), Query(limit=1), Query(prefix="k\uffff")]
    for q in queries:
        want = q.page([k for k in alive if q.matches(k)])
        assert await engine.list_keys("db", "t", q, now_ms()) == want, q
        recs = await engine.read("db", "t", q, now_ms())
        assert [r["key"] for r in recs] == want, q
        assert all(r["value"] == r["key"].encode() for r in recs)
    assert b"KEYS" not in commands and b"SCAN" not in commands


async def test_tables(engine):
    assert await engine.tables("db") == []
    for tbl in ("b", "a:x", "é", "a"):
        await engine.write("db", tbl, "k", b"v", {}, None, (1, 0), "n")
    await engine.write("db:", "other", "k", b"v", {}, None, (1, 0), "n")
    assert await engine.tables("db") == ["a", "a:x", "b", "é"]
    assert await engine.tables("db:") == ["other"]
    await engine.delete("db", "a:x", "k", "n")
    assert await engine.tables("db") == ["a", "b", "é"]


async def test_guarded_copy_never_overwrites_newer(engine):
    await engine.write("db", "t", "k", b"new", {"m": 1}, None, (100, 5), "node-a")
    assert await engine.copy_value("db", "t", "k", b"old", {}, None, (100, 4), "x") is False
    assert await engine.copy_value("db", "t", "k", b"old", {}, None, (99, 9), "x") is False
    assert (await engine.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"new"
    assert await engine.copy_delete("db", "t", "k", (100, 4)) is False
    assert (await engine.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"new"
    assert await engine.copy_value("db", "t", "k", b"newer", {"m": 2}, None, (100, 6),
                                   "node-b") is True
    assert await engine.read("db", "t", Query(key="k"), now_ms()) == [
        {"key": "k", "value": b"newer", "metadata": {"m": 2}, "expiry": None,
         "written_by": "node-b", "version": [100, 6]}]
    exp = now_ms() + 60_000
    assert await engine.copy_value("db", "t", "fresh", b"v", {}, exp, (1, 0), "x") is True
    assert (await engine.read("db", "t", Query(key="fresh"), now_ms()))[0]["expiry"] == exp
    assert await engine.copy_delete("db", "t", "k", (101, 0)) is True
    assert await engine.read("db", "t", Query(key="k"), now_ms()) == []
    assert await engine.copy_delete("db", "t", "k", (200, 0)) is False  # nothing to remove
    assert await engine.list_keys("db", "t", Query(), now_ms()) == ["fresh"]


async def test_drop(engine, raw):
    for tbl in ("t1", "t:2"):
        for key in ("a", "b:*", "c"):
            await engine.write("gone", tbl, key, b"v", {}, None, (1, 0), "n")
    await engine.counter("gone", "t1", "counted", 1, "n")
    await engine.set_change("gone", "t:2", "set", ["m"], [], "n")
    await engine.write("gone:", "t1", "a", b"v", {}, None, (1, 0), "n")  # another database
    await engine.write("kept", "t1", "a", b"v", {}, None, (1, 0), "n")
    assert await engine.drop("gone") == 8
    assert await engine.tables("gone") == []
    assert await engine.read("gone", "t1", Query(), now_ms()) == []
    assert await engine.tables("gone:") == ["t1"]
    assert await engine.tables("kept") == ["t1"]
    left = {k for k in meshd_keys(raw)}
    assert not any(b":4:gone" in k and b":5:gone:" not in k for k in left), left
    assert await engine.drop("gone") == 0


async def test_watch_reports_every_change(server, raw):
    engine = RedisEngine(server.url, pool=2, timeout=5.0)
    events: list[tuple] = []
    arrived = trio.Event()

    def on_change(db, tbl, key, rec, by):
        events.append((db, tbl, key, rec, by))
        arrived.set()

    async def change(op, *args):
        # one change at a time: a watch reads the record when the notification arrives
        nonlocal arrived
        arrived = trio.Event()
        before = len(events)
        await op(*args)
        with trio.fail_after(5):
            await arrived.wait()
        assert len(events) == before + 1
        return events[-1]

    other = RedisEngine(server.url, pool=2, timeout=5.0)  # another node on the same Redis
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run, on_change, lambda *k: True)
            ev = await change(other.write, "db", "t", "k:*", b"v", {"a": 1}, None, (1, 2),
                              "node-b")
            assert ev == ("db", "t", "k:*", {"key": "k:*", "value": b"v", "metadata": {"a": 1},
                                             "expiry": None, "written_by": "node-b",
                                             "version": [1, 2]}, "node-b")
            assert await change(other.counter, "db", "t", "c", 3, "node-b") == \
                ("db", "t", "c", {"key": "c", "counter": 3}, "node-b")
            assert await change(other.set_change, "db", "t", "s", ["m"], [], "node-b") == \
                ("db", "t", "s", {"key": "s", "members": ["m"]}, "node-b")
            assert await change(other.delete, "db", "t", "k:*", "node-b") == \
                ("db", "t", "k:*", None, "node-b")
            await other.set_change("db", "t", "s", [], ["nope"], "node-b")  # no change: none
            assert await change(other.set_change, "db", "t", "s", [], ["m"], "node-c") == \
                ("db", "t", "s", None, "node-c")
            assert await change(other.counter, "db", "t", "c", -3, "node-b") == \
                ("db", "t", "c", None, "node-b")
            ev = await change(other.copy_value, "db", "t2", "é", b"x", {}, None, (5, 0), "n")
            assert ev[:3] == ("db", "t2", "é") and live(ev[3]) and ev[4] == "n"
            assert await change(engine.copy_delete, "db", "t2", "é", (6, 0)) == \
                ("db", "t2", "é", None, "")
            await trio.sleep(0.2)
            assert len(events) == 8  # nothing else was reported
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled_at < 2.0  # run notices cancellation soon
    finally:
        await other.close()
        await engine.close()


async def test_down_then_back_with_the_same_engine(tmp_path):
    with redis(tmp_path / "redis") as srv:
        eng = RedisEngine(srv.url, pool=2, timeout=2.0)
        events: list[tuple] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(eng.run, lambda *ev: events.append(ev), lambda *k: True)
            await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
            srv.stop()
            for op in (eng.write("db", "t", "k", b"v", {}, None, (2, 0), "n"),
                       eng.read("db", "t", Query(), now_ms()), eng.tables("db"),
                       eng.counter("db", "t", "c", 1, "n"), eng.drop("db")):
                with trio.fail_after(4), pytest.raises(EngineDown) as err:
                    await op
                assert err.value.status == 503 and "redis" in err.value.detail
                assert srv.url not in err.value.detail
            srv.start()  # empty again (no persistence): the same engine object works again
            with trio.fail_after(5):
                assert (await eng.write("db", "t", "k", b"w", {}, None, (3, 0), "n"))[
                    "value"] == b"w"
            assert await eng.list_keys("db", "t", Query(), now_ms()) == ["k"]
            # the watch resubscribed: changes after the restart are reported again
            with trio.fail_after(8):
                while not any(ev[3] and ev[3].get("value") == b"again" for ev in events):
                    await eng.write("db", "t", "k", b"again", {}, None, (4, 0), "n")
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        await eng.close()


async def test_errors_never_show_the_password():
    port = free_port()  # nothing listens there
    url = f"redis://meshd:s3cret-pw@127.0.0.1:{port}/0"
    eng = RedisEngine(url, pool=2, timeout=1.0)
    with trio.fail_after(3), pytest.raises(EngineDown) as err:
        await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
    assert err.value.status == 503 and "s3cret-pw" not in str(err.value)
    assert "s3cret-pw" not in err.value.detail
    # whatever a driver puts in its message, the URL and its password are blanked
    leaked = eng._down(ValueError(f"cannot reach {url} (redis://u:s3cret-pw@h/1)"))
    assert "s3cret-pw" not in leaked.detail and "redis" in leaked.detail
    # a down engine never holds up meshd's start
    async with trio.open_nursery() as nursery:
        with trio.fail_after(3):
            await nursery.start(eng.run, lambda *ev: None, lambda *k: True)
        nursery.cancel_scope.cancel()
    await eng.close()
    with pytest.raises(EngineDown) as err:
        RedisEngine("redis://u:s3cret-pw@[::1:6379/0")
    assert "s3cret-pw" not in err.value.detail


async def test_a_silent_server_is_bounded_by_timeout():
    with socket.socket() as lst:  # accepts connections (backlog) but never answers
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        eng = RedisEngine(f"redis://127.0.0.1:{lst.getsockname()[1]}/0", pool=2, timeout=0.5)
        start = trio.current_time()
        with pytest.raises(EngineDown) as err:
            await eng.read("db", "t", Query(key="k"), now_ms())
        assert trio.current_time() - start < 2.0
        assert err.value.status == 503
        await eng.close()


async def running(eng: RedisEngine, nursery) -> RedisEngine:
    await nursery.start(eng.run, lambda *ev: None, lambda *k: False)
    return eng


async def test_one_connection_keeps_replies_in_order_through_cancelled_callers(server, raw,
                                                                               nursery):
    """Many callers share one pipelined connection: each gets its own reply, also when
    callers around it were cancelled while waiting (their replies are read and dropped)."""
    eng = await running(RedisEngine(server.url, pool=2, timeout=5.0), nursery)
    keys = [f"k{i}" for i in range(200)]
    for i, key in enumerate(keys):
        await eng.write("db", "t", key, f"v{i}".encode(), {"i": i}, None, (i + 1, 0), "n")
    got: dict[str, bytes] = {}

    async def read(key: str) -> None:
        got[key] = (await eng.read("db", "t", Query(key=key), now_ms()))[0]["value"]

    async def cancelled(key: str) -> None:
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled at its first checkpoint: after queueing or before
            await eng.read("db", "t", Query(key=key), now_ms())

    async with trio.open_nursery() as inner:
        for i, key in enumerate(keys):
            inner.start_soon(read if i % 3 else cancelled, key)
    assert got == {k: f"v{i}".encode() for i, k in enumerate(keys) if i % 3}
    # the connection is the same one and still in step
    conn = eng._mux._conn
    assert conn is not None and not conn.closed and not conn.waiting
    assert (await eng.read("db", "t", Query(key="k0"), now_ms()))[0]["value"] == b"v0"
    assert eng._mux._conn is conn


async def test_error_reply_fails_its_call_only_and_scripts_reload(server, raw, nursery):
    """A record another client overwrote with the wrong type fails that call with 503; the
    calls after it on the same connection are fine; scripts flushed from Redis are loaded
    again (NOSCRIPT) without applying anything twice."""
    eng = await running(RedisEngine(server.url, pool=2, timeout=5.0), nursery)
    await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
    raw.set(name("v", "db", "t", "bad"), b"not a hash")
    with pytest.raises(EngineDown) as err:
        await eng.read("db", "t", Query(key="bad"), now_ms())
    assert err.value.status == 503 and "WRONGTYPE" in err.value.detail
    conn = eng._mux._conn
    assert (await eng.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"v"
    assert eng._mux._conn is conn and not conn.closed
    raw.script_flush()
    assert await eng.counter("db", "t", "c", 5, "n") == 5  # EVALSHA, NOSCRIPT, EVAL once
    assert await eng.counter("db", "t", "c", 0, "n") == 5
    assert (await eng.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"v"


async def test_running_engine_down_and_silent_are_bounded_and_redacted(nursery):
    port = free_port()  # nothing listens there
    url = f"redis://meshd:s3cret-pw@127.0.0.1:{port}/0"
    eng = await running(RedisEngine(url, pool=2, timeout=1.0), nursery)
    with trio.fail_after(3), pytest.raises(EngineDown) as err:
        await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
    assert err.value.status == 503 and "s3cret-pw" not in err.value.detail
    with socket.socket() as lst:  # accepts connections (backlog) but never answers
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        silent = await running(RedisEngine(f"redis://127.0.0.1:{lst.getsockname()[1]}/0",
                                           pool=2, timeout=0.5), nursery)
        for _ in range(2):  # a timed-out connection is closed; the next call tries anew
            start = trio.current_time()
            with pytest.raises(EngineDown) as err:
                await silent.read("db", "t", Query(key="k"), now_ms())
            assert trio.current_time() - start < 2.0 and err.value.status == 503


async def test_tls_url_with_the_servers_ca(tmp_path, nursery):
    """rediss:// with ssl_ca_certs: the hot paths, the watch and the blocking client all
    speak TLS; a CA that did not sign the server's certificate is refused."""
    from .test_tls import make_pki

    pki = make_pki(tmp_path / "pki")
    with redis(tmp_path / "redis", tls=(pki.cert, pki.key, pki.ca)) as srv:
        assert srv.url.startswith("rediss://")
        events: list[tuple] = []
        eng = RedisEngine(srv.url, pool=2, timeout=5.0)
        await nursery.start(eng.run, lambda *ev: events.append(ev), lambda *k: True)
        await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
        assert (await eng.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"v"
        assert await eng.list_keys("db", "t", Query(), now_ms()) == ["k"]  # redis-py, TLS
        with trio.fail_after(5):
            while not events:
                await trio.sleep(0.05)
        assert events[0][:3] == ("db", "t", "k")
        # a CA that did not sign it, or a name the certificate does not hold: refused
        for url in (srv.url.replace(str(pki.ca), str(pki.other_ca)),
                    srv.url.replace("127.0.0.1", "localhost")):
            wrong = await running(RedisEngine(url, pool=2, timeout=2.0), nursery)
            with trio.fail_after(5), pytest.raises(EngineDown) as err:
                await wrong.read("db", "t", Query(key="k"), now_ms())
            assert err.value.status == 503
        # unless the URL says not to check
        lax = await running(RedisEngine(srv.url.replace("127.0.0.1", "localhost").replace(
            str(pki.ca), str(pki.other_ca)) + "&ssl_cert_reqs=none", pool=2, timeout=2.0),
            nursery)
        assert (await lax.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"v"
        with pytest.raises(EngineDown) as err:
            RedisEngine(srv.url + "&ssl_no_such_option=1")
        assert "ssl_no_such_option" in err.value.detail
        nursery.cancel_scope.cancel()


async def test_a_forged_change_message_reports_what_redis_holds(server, raw, nursery):
    """Anyone who may connect can PUBLISH on the change channel: a message that says a live
    key is gone (or names a key that holds nothing) is checked against Redis."""
    events: list[tuple] = []
    eng = RedisEngine(server.url, pool=2, timeout=5.0)
    await nursery.start(eng.run, lambda *ev: events.append(ev), lambda *k: True)
    await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
    with trio.fail_after(5):
        while not events:
            await trio.sleep(0.02)
    events.clear()
    raw.publish(eng.channel, b'1["db","t","k","liar"]')  # "gone", but it is not
    raw.publish(eng.channel, b'0["db","t","nothing","liar"]')  # "changed", holds nothing
    raw.publish(eng.channel, b"0[not json")
    with trio.fail_after(5):
        while len(events) < 2:
            await trio.sleep(0.02)
    assert events[0][:3] == ("db", "t", "k") and events[0][3]["value"] == b"v"
    assert events[1][:4] == ("db", "t", "nothing", None)
    with trio.fail_after(5):
        while eng.bad_changes < 1:
            await trio.sleep(0.02)


async def test_acl_user_and_password_on_both_clients(tmp_path, nursery):
    """A URL naming an ACL user authenticates as that user on the pipelined connection,
    the watch and the blocking client alike; a wrong password is a 503 that never shows it."""
    with redis(tmp_path / "redis") as srv:
        import redis as redis_client

        admin = redis_client.Redis.from_url(srv.url)
        admin.execute_command("ACL", "SETUSER", "meshd", "on", ">s3cret-pw", "~meshd:*",
                              "&meshd:*", "+@all")
        admin.execute_command("ACL", "SETUSER", "default", "off")
        good = srv.url.replace("redis://", "redis://meshd:s3cret-pw@")
        events: list[tuple] = []
        eng = RedisEngine(good, pool=2, timeout=5.0)
        await nursery.start(eng.run, lambda *ev: events.append(ev), lambda *k: True)
        await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
        assert (await eng.read("db", "t", Query(key="k"), now_ms()))[0]["value"] == b"v"
        assert await eng.list_keys("db", "t", Query(), now_ms()) == ["k"]
        with trio.fail_after(5):
            while not events:
                await trio.sleep(0.02)
        bad = await running(RedisEngine(good.replace("s3cret-pw", "wrong-pw"), pool=2,
                                        timeout=2.0), nursery)
        with pytest.raises(EngineDown) as err:
            await bad.read("db", "t", Query(key="k"), now_ms())
        assert err.value.status == 503 and "wrong-pw" not in err.value.detail
        nursery.cancel_scope.cancel()
