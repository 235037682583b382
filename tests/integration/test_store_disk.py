"""Issue 22: a daemon keeps its store records on disk with a bounded cache: it holds more
records than its cache, reads every one back right, across a kill -9 and a restart, and
serves them to a node that joins later (anti-entropy reading keys of buckets from disk)."""

from __future__ import annotations

import trio

from meshd_sdk import Store

from .cluster import control, wait_for

# a cache of about 25 records of 100-byte values: almost every read goes to SQLite
SMALL_CACHE = {"MESHD_STORE_SYNC_INTERVAL": "1", "MESHD_STORE_CACHE_BYTES": "20000"}
KEYS = 1500


def _value(i: int) -> bytes:
    return (b"%06d-" % i) * 14 + b"xx"  # 100 bytes


async def _write_all(sock) -> None:
    store = Store(addr=sock, table="big")
    limiter = trio.CapacityLimiter(32)

    async def one(i: int) -> None:
        async with limiter:
            await store.write(f"key-{i:05d}", _value(i))

    async with trio.open_nursery() as nursery:
        for i in range(KEYS):
            nursery.start_soon(one, i)
    await store.incr("hits", 5)
    await store.add("team", "ada")
    await store.write("gone", b"x")
    await store.delete("gone")
    await store.write("ttl-long", b"kept", ttl=3600)
    await store.write("ttl-short", b"expires", ttl=1)
    await store.aclose()


async def _get(sock, key: str) -> bytes | None:
    store = Store(addr=sock, table="big")
    try:
        return await store.get(key)
    finally:
        await store.aclose()


async def _read_all(sock) -> dict[str, bytes | None]:
    store = Store(addr=sock, table="big")
    got: dict[str, bytes | None] = {}
    try:
        for i in range(KEYS):
            got[f"key-{i:05d}"] = await store.get(f"key-{i:05d}")
        for i in reversed(range(0, KEYS, 3)):  # again, in another order: evicted by now
            assert await store.get(f"key-{i:05d}") == got[f"key-{i:05d}"]
    finally:
        await store.aclose()
    return got


def _check(daemon) -> None:
    sock = daemon.data_dir / "meshd.sock"
    got = trio.run(_read_all, sock)
    assert got == {f"key-{i:05d}": _value(i) for i in range(KEYS)}
    keys = control(daemon.data_dir, "store.list", table="big", prefix="key-001")
    assert keys == [f"key-{i:05d}" for i in range(100, 200)]
    # a value with a TTL read back from disk; an expired one is gone (wait for its expiry)
    assert trio.run(_get, sock, "ttl-long") == b"kept"
    wait_for(lambda: trio.run(_get, sock, "ttl-short") is None, 30, "ttl-short expired")
    assert len(control(daemon.data_dir, "store.list", table="big")) == KEYS + 3
    # pages of the listing
    assert control(daemon.data_dir, "store.list", table="big", prefix="key-", limit=3,
                   offset=2) == ["key-00002", "key-00003", "key-00004"]
    assert control(daemon.data_dir, "store.list", table="big", suffix="7",
                   limit=2) == ["key-00007", "key-00017"]
    assert control(daemon.data_dir, "store.counter", table="big", key="hits")["counter"] == 5
    assert control(daemon.data_dir, "store.set", table="big", key="team",
                   op="members")["members"] == ["ada"]
    assert control(daemon.data_dir, "store.list", table="big", prefix="gone") == []


def test_more_records_than_the_cache_holds_read_back_after_kill9_and_restart(cluster):
    a = cluster.add("a", env=SMALL_CACHE)
    trio.run(_write_all, a.data_dir / "meshd.sock")
    _check(a)
    a.kill9()  # every write above was acknowledged: it must all be on disk
    a.start()
    _check(a)
    b = cluster.add("b", join=[a.addr], env=SMALL_CACHE)
    wait_for(lambda: len(control(b.data_dir, "store.list", table="big")) == KEYS + 3, 60,
             "every record on the node that joined later")
    _check(b)
