"""The real engines the store's backends are tested against start on loopback in temporary
dirs, answer their own clients, and are gone after (tests/integration/engine_servers.py)."""

from __future__ import annotations

import socket

import pytest

from .engine_servers import postgres, redis, why_no_postgres, why_no_redis


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return True
    return False


@pytest.mark.skipif(why_no_postgres() is not None, reason=why_no_postgres() or "")
def test_postgres_starts_answers_and_stops(tmp_path):
    import psycopg

    with postgres(tmp_path / "pg") as server:
        with psycopg.connect(server.url, connect_timeout=10) as conn:
            conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int)")
            conn.execute("INSERT INTO t VALUES ('a', 1)")
        server.stop()
        assert refused(server.port)
        server.start()  # back on its port, with its data
        with psycopg.connect(server.url, connect_timeout=10) as conn:
            assert conn.execute("SELECT v FROM t WHERE k = 'a'").fetchone() == (1,)
    assert refused(server.port)


@pytest.mark.skipif(why_no_redis() is not None, reason=why_no_redis() or "")
def test_redis_starts_answers_and_stops(tmp_path):
    import redis as redis_client

    with redis(tmp_path / "redis") as server:
        r = redis_client.Redis.from_url(server.url, socket_timeout=10)
        assert r.incrby("n", 2) == 2 and r.get("n") == b"2"
        r.close()
        server.stop()
        assert refused(server.port)
        server.start()
        r = redis_client.Redis.from_url(server.url, socket_timeout=10)
        assert r.ping()
        r.close()
    assert refused(server.port)
