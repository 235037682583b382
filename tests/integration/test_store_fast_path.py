"""store.write and store.read of a Redis database through the SDK's multiplexed connection
take the fast path (answered from the engine's callback, no task per request): the same
answers and errors as the ordinary path, the same checks first, and anything it cannot take
goes the ordinary way."""

from __future__ import annotations

import pytest
import trio

from meshd.errors import MeshError

from .cluster import Cluster, control
from .engine_servers import redis, why_no_redis
from .test_store_backends import FAST, dsn_file, meshd

pytestmark = pytest.mark.skipif(why_no_redis() is not None, reason=why_no_redis() or "")


async def ctl(node, op: str, **args):
    """A control call on a connection of its own (the ordinary path), from trio."""
    return await trio.to_thread.run_sync(lambda: control(node.data_dir, op, **args))


async def fast_count(node) -> int:
    return (await ctl(node, "status"))["stats"]["store_fast_path"]


def test_writes_and_reads_of_an_engine_database_take_the_fast_path(tmp_path):
    from meshd_sdk import Store

    with redis(tmp_path / "redis") as server:
        (tmp_path / "mesh").mkdir()
        c = Cluster(tmp_path / "mesh")
        try:
            a = c.add("a", env=FAST)
            out = meshd(a, "store", "databases", "create", "shop", "--backend", "redis",
                        "--dsn-file", dsn_file(tmp_path, server.url))
            assert out.returncode == 0, out.stderr
            sock = a.data_dir / "meshd.sock"

            async def through_sdk() -> None:
                store = Store(database="shop", table="t", addr=sock)
                try:
                    for _ in range(2):  # the first may connect the engine the ordinary way
                        rec = await store.write("k", b"v1", metadata={"m": 1}, ttl=600)
                    assert rec["value"] == b"v1" and rec["metadata"] == {"m": 1}
                    assert rec["written_by"] == "a" and rec["expiry"] is not None
                    before = await fast_count(a)
                    rec = await store.write("k", b"v2", metadata={"m": 2})
                    got = await store.read("k")
                    assert await fast_count(a) == before + 2  # both on the fast path
                    assert rec["value"] == b"v2" and rec["expiry"] is None
                    assert got == [rec]
                    # the ordinary path (a connection of its own) sees the same record
                    assert await ctl(a, "store.read", database="shop", table="t",
                                     key="k") == [rec]
                    with pytest.raises(MeshError) as err:
                        await store.read("missing")
                    assert err.value.status == 404 and "missing" in err.value.detail
                    # a scan is not the fast path's: the ordinary way answers it
                    before = await fast_count(a)
                    assert [r["key"] for r in await store.read(prefix="")] == ["k"]
                    assert await fast_count(a) == before
                    # bad input goes the ordinary way, which says what is wrong
                    with pytest.raises(MeshError) as err:
                        await store.write("", b"x")
                    assert err.value.status == 400
                finally:
                    await store.aclose()

                # the same checks first: a token that is no token is refused (401)
                bad = Store(database="shop", table="t", addr=sock, token="not-a-token")
                try:
                    before = await fast_count(a)
                    with pytest.raises(MeshError) as err:
                        await bad.write("k", b"x")
                    assert err.value.status == 401 and await fast_count(a) == before
                finally:
                    await bad.aclose()
                assert (await ctl(a, "store.read", database="shop", table="t",
                                  key="k"))[0]["value"] == b"v2"

            trio.run(through_sdk)

            async def engine_down() -> None:
                store = Store(database="shop", table="t", addr=sock)
                try:
                    with trio.fail_after(15), pytest.raises(MeshError) as err:
                        await store.write("k", b"v3")
                    assert err.value.status == 503 and "redis" in err.value.detail
                finally:
                    await store.aclose()

            server.stop()
            trio.run(engine_down)
        finally:
            c.close()
