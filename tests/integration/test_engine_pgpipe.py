"""The PostgreSQL engine's pipelined connections (meshd/store/engines/pgpipe.py) against a
real server: answers reach their own callers, a failing statement fails only its call, a
row lock held by another client holds up only the calls behind it, and a stalled
connection is closed at its oldest call's deadline."""

from __future__ import annotations

import time

import pytest
import trio

from meshd.errors import MeshError
from meshd.store.engines.base import EngineDown, Query
from meshd.store.engines.postgres import PostgresEngine

from .engine_servers import postgres, why_no_postgres

pytestmark = pytest.mark.skipif(why_no_postgres() is not None,
                                reason=why_no_postgres() or "")


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with postgres(tmp_path_factory.mktemp("pg")) as srv:
        yield srv


async def running(server, nursery, timeout: float = 5.0) -> PostgresEngine:
    eng = PostgresEngine(server.url, "node-a", pool=4, timeout=timeout)
    await nursery.start(eng.run, lambda *ev: None, lambda *k: False)
    assert eng._pipeline is not None
    return eng


async def test_answers_reach_their_callers_through_cancelled_ones_and_errors(server, nursery):
    eng = await running(server, nursery)
    keys = [f"o{i}" for i in range(150)]
    for i, key in enumerate(keys):
        await eng.write("db", "t", key, f"v{i}".encode(), {"i": i}, None, (i + 1, 0), "n")
    got: dict[str, tuple] = {}

    async def read(key: str) -> None:
        rec = (await eng.read("db", "t", Query(key=key), now_ms()))[0]
        got[key] = (rec["value"], rec["metadata"])

    async def cancelled(key: str) -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await eng.read("db", "t", Query(key=key), now_ms())

    async def failing(i: int) -> None:
        # metadata PostgreSQL's jsonb refuses (\u0000): that statement fails, alone
        with pytest.raises(EngineDown) as err:
            await eng.write("db", "t", f"bad{i}", b"v", {"x": "\x00"}, None, (1, 0), "n")
        assert err.value.status == 503 and "unsupported Unicode" in err.value.detail
        # a key with NUL is refused before it is sent (libpq would cut it short)
        with pytest.raises(MeshError) as bad:
            await eng.write("db", "t", f"bad\x00{i}", b"v", {}, None, (1, 0), "n")
        assert bad.value.status == 400

    async with trio.open_nursery() as inner:
        for i, key in enumerate(keys):
            inner.start_soon(read if i % 3 else cancelled, key)
            if i % 10 == 0:
                inner.start_soon(failing, i)
    assert got == {k: (f"v{i}".encode(), {"i": i}) for i, k in enumerate(keys) if i % 3}
    conns = eng._pipeline._conns
    assert conns and all(not c.closed for c in conns)
    # counters, sets and deletes on the same connections answer their own callers too
    assert await eng.counter("db", "t", "c", 5, "n") == 5
    assert await eng.counter("db", "t", "c", 0, "n") == 5
    assert await eng.set_change("db", "t", "s", ["b", "a", "a"], [], "n") == ["a", "b"]
    assert await eng.set_change("db", "t", "s", [], ["a"], "n") == ["b"]
    assert await eng.members("db", "t", "s") == ["b"]
    assert await eng.delete("db", "t", "o1", "n") is True
    assert await eng.delete("db", "t", "o1", "n") is False
    await eng.close()


async def test_a_row_lock_holds_up_only_the_calls_behind_it(server, nursery):
    """Another client holds a row lock: the write to that row waits (until lock_timeout =
    the engine's timeout, then 503), while writes to other rows go on another connection."""
    import psycopg

    eng = await running(server, nursery, timeout=3.0)
    await eng.write("db", "t", "locked", b"v", {}, None, (1, 0), "n")
    other = await trio.to_thread.run_sync(lambda: psycopg.connect(server.url))
    try:
        await trio.to_thread.run_sync(lambda: other.execute(
            "SELECT 1 FROM meshd_kv WHERE db = 'db' AND tbl = 't' AND key = 'locked' "
            "FOR UPDATE"))
        outcome: list = []

        async def blocked() -> None:
            start = trio.current_time()
            with pytest.raises(EngineDown) as err:
                await eng.write("db", "t", "locked", b"w", {}, None, (2, 0), "n")
            outcome.append((trio.current_time() - start, err.value.status))

        async with trio.open_nursery() as inner:
            inner.start_soon(blocked)
            await trio.sleep(0.5)  # the first connection is held up now
            start = trio.current_time()
            for i in range(20):
                await eng.write("db", "t", f"free{i}", b"v", {}, None, (1, 0), "n")
            assert trio.current_time() - start < 2.0  # not behind the locked row
        assert outcome and outcome[0][1] == 503 and outcome[0][0] < 5.0
        assert len(eng._pipeline._conns) >= 2
    finally:
        await trio.to_thread.run_sync(other.close)
        await eng.close()


async def test_down_and_back_on_the_same_engine_object(tmp_path, nursery):
    with postgres(tmp_path / "pg") as srv:
        eng = await running(srv, nursery, timeout=2.0)
        await eng.write("db", "t", "k", b"v", {}, None, (1, 0), "n")
        srv.stop()
        for _ in range(2):
            with trio.fail_after(6), pytest.raises(EngineDown) as err:
                await eng.read("db", "t", Query(key="k"), now_ms())
            assert err.value.status == 503 and srv.url not in err.value.detail
        srv.start()
        with trio.fail_after(10):
            while True:
                try:
                    rows = await eng.read("db", "t", Query(key="k"), now_ms())
                    break
                except EngineDown:
                    await trio.sleep(0.2)
        assert rows[0]["value"] == b"v"
        await eng.close()


async def test_a_forged_notice_reports_what_postgresql_holds(server, nursery):
    """Anyone who may connect can NOTIFY the channel: a notice saying a live key was
    deleted is checked against the table (and junk is counted, never fatal)."""
    import json

    import psycopg

    events: list[tuple] = []
    eng = PostgresEngine(server.url, "node-a", pool=2, timeout=5.0)
    await nursery.start(eng.run, lambda *ev: events.append(ev), lambda *k: True)
    await eng.write("fdb", "t", "k", b"v", {}, None, (1, 0), "n")
    with trio.fail_after(5):
        while not events:
            await trio.sleep(0.02)
    events.clear()

    def notify(payload: str) -> None:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify('meshd_kv', %s)", (payload,))

    await trio.to_thread.run_sync(notify, json.dumps(["fdb", "t", "k", True, "meshd:liar"]))
    await trio.to_thread.run_sync(notify, "[" * 3000)
    await trio.to_thread.run_sync(notify, json.dumps(["fdb", "t", "none", False, "x"]))
    with trio.fail_after(5):
        while len(events) < 2:
            await trio.sleep(0.02)
    assert events[0][:3] == ("fdb", "t", "k") and events[0][3]["value"] == b"v"
    assert events[0][4] == "liar"
    assert events[1][:4] == ("fdb", "t", "none", None)
    assert eng.bad_notices == 1
    await eng.close()
